"""Hand-written backward passes for the products whose weight gradients make XLA copy activations: do they make
the training step faster?

Run: python benchmarks/bench_backward_forms.py [--preset full] [--rounds 7]
A profile of the `full` preset's update program shows much of its time in copies that lay activations out
transposed, because a weight gradient dW = X^T dY (and attention's dV = P^T dO, dK = dS^T Q) contracts the long
axis of both operands. Each variant below computes the same step with a custom VJP that writes those products in
another form, so that XLA may transpose the smaller operand or the result instead:
- dense-transposed-grad: every dense layer of the transformer blocks (through `apply_rowwise`) returns
  (X^T dY)^T computed as dY-columns by X-columns with the small result transposed;
- attention-einsum: attention's backward as einsums, the contraction axes left for XLA to place;
- attention-transposed-results: attention's dK and dV computed transposed (Q^T dS, dO^T P), then turned back.
Every variant is compiled first, its first loss and gradient norm compared with the plain step's, then all are
timed in turns (one step of each per round). Nothing is saved: the speed appendix reports the outcome.
"""

import argparse
import contextlib
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bench_peer import TRAIN_BATCHES, noise_batch  # this folder is on sys.path when the script runs
from sepreformer_book import dual_path, fit
from sepreformer_book.model import PRESETS, SepReformer

@jax.custom_vjp
def _dense(x, weight):
    return x @ weight.T


def _dense_forward(x, weight):
    return x @ weight.T, (x, weight)


def _dense_backward(saved, d_y):
    x, weight = saved
    rows_x, rows_dy = x.reshape(-1, x.shape[-1]), d_y.reshape(-1, d_y.shape[-1])
    return d_y @ weight, jnp.einsum("rn,rk->kn", rows_dy, rows_x).T


_dense.defvjp(_dense_forward, _dense_backward)
_plain_apply_rowwise = dual_path.apply_rowwise


def _apply_rowwise_transposed_grad(layer, x):
    """Installed as `dual_path.apply_rowwise`: the plain one's Sequential branch calls back into it by that name."""
    if isinstance(layer, eqx.nn.Linear):
        y = _dense(x, layer.weight)
        return y if layer.bias is None else y + layer.bias
    return _plain_apply_rowwise(layer, x)


def _attention_backward_einsum(saved, d_out):
    q, k, v, weights, out = saved
    d_weights = jnp.einsum("...te,...se->...ts", d_out, v)
    d_logits = weights * (d_weights - jnp.sum(d_out * out, axis=-1, keepdims=True))
    d_q = jnp.einsum("...ts,...sd->...td", d_logits, k)
    d_k = jnp.einsum("...ts,...td->...sd", d_logits, q)
    return d_q, d_k, jnp.einsum("...ts,...te->...se", weights, d_out), None


def _attention_backward_transposed_results(saved, d_out):
    q, k, v, weights, out = saved
    d_weights = d_out @ jnp.swapaxes(v, -1, -2)
    d_logits = weights * (d_weights - jnp.sum(d_out * out, axis=-1, keepdims=True))
    d_k_transposed = jnp.swapaxes(q, -1, -2) @ d_logits
    d_v_transposed = jnp.swapaxes(d_out, -1, -2) @ weights
    return (d_logits @ k, jnp.swapaxes(d_k_transposed, -1, -2), jnp.swapaxes(d_v_transposed, -1, -2), None)


def _attention_with(backward):
    attention = jax.custom_vjp(lambda q, k, v, valid: dual_path._attention_forward(q, k, v, valid)[0])
    attention.defvjp(dual_path._attention_forward, backward)
    return attention


@contextlib.contextmanager
def _replaced(name: str, value):
    old = getattr(dual_path, name)
    setattr(dual_path, name, value)
    try:
        yield
    finally:
        setattr(dual_path, name, old)


VARIANTS = {
    "plain": contextlib.nullcontext,
    "dense-transposed-grad": lambda: _replaced("apply_rowwise", _apply_rowwise_transposed_grad),
    "attention-einsum": lambda: _replaced("_softmax_attention", _attention_with(_attention_backward_einsum)),
    "attention-transposed-results": lambda: _replaced(
        "_softmax_attention", _attention_with(_attention_backward_transposed_results)),
}


def compiled_step(preset: str, variant: str, batch: dict):
    """A step function of its own (fresh jits, traced while the variant is in place) and its first metrics."""
    forward = jax.jit(fit._forward_program.__wrapped__, static_argnums=2)
    update = jax.jit(fit._update_program.__wrapped__, static_argnums=4, donate_argnums=(0, 1))
    optimizer = fit.make_optimizer()
    model = SepReformer(PRESETS[preset], key=jax.random.key(0))
    arrays, rest = fit._split(model)
    state = {"opt": optimizer.init(eqx.filter(model, eqx.is_inexact_array)), "arrays": arrays}

    def run():
        loss, _, pullback = forward(state["arrays"], batch, rest)
        state["arrays"], state["opt"], grad_norm = update(state["arrays"], state["opt"], pullback, loss, optimizer)
        return jax.block_until_ready((loss, grad_norm))

    with VARIANTS[variant]():
        first = tuple(float(value) for value in run())
    return run, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(TRAIN_BATCHES), default="full")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    batch_size, seconds = TRAIN_BATCHES[args.preset]
    batch = noise_batch(PRESETS[args.preset], batch_size, seconds)
    runs, firsts = {}, {}
    for variant in VARIANTS:
        runs[variant], firsts[variant] = compiled_step(args.preset, variant, batch)
        runs[variant]()  # a warm step after compilation
    times = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant, run in runs.items():
            start = time.perf_counter()
            run()
            times[variant].append(time.perf_counter() - start)
    plain = np.median(times["plain"])
    print(f"{args.preset} training step, batch {batch_size} x {seconds:g} s, {os.cpu_count()} CPU cores, "
          f"{args.rounds} rounds in turns")
    print(f"{'variant':>28} | {'median':>9} | {'min':>9} | {'time / plain':>12} | first loss, grad norm: relative gap")
    loss0, norm0 = firsts["plain"]
    for variant, values in times.items():
        loss, norm = firsts[variant]
        print(f"{variant:>28} | {1e3 * np.median(values):6.1f} ms | {1e3 * min(values):6.1f} ms | "
              f"{np.median(values) / plain:12.3f} | {abs(loss - loss0) / abs(loss0):.0e}, "
              f"{abs(norm - norm0) / abs(norm0):.0e}")


if __name__ == "__main__":
    main()
