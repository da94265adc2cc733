"""benchmarks/bench_backward_forms.py times hand-written backward passes against autodiff's and the book's: each must
give the same gradients, or its timing would compare different computations."""

import functools
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_backward_forms as forms  # noqa: E402
from bench_peer import noise_batch  # noqa: E402

from sepreformer_book import fit  # noqa: E402
from sepreformer_book.model import PRESETS, SepReformer  # noqa: E402


def _gradients(model, batch):
    """The loss's gradients with respect to every parameter, and the text of the program computing them."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p):
        return fit.batch_loss(eqx.combine(p, static), batch)[0]

    gradient = jax.grad(loss)
    return jax.tree.leaves(jax.jit(gradient)(params)), str(jax.make_jaxpr(gradient)(params))


def _scales(model):
    return [s for b in model.sep_blocks + model.rec_blocks for t in (b.intra_block, b.inter_block)
            for s in (t.scale1, t.scale2)]


@functools.cache
def _case(layer_scale: float):
    """A ci-sized model with every LayerScale at `layer_scale`, a batch, and the plain gradients."""
    config = PRESETS["ci"]
    model = SepReformer(config, key=jax.random.key(1))
    model = eqx.tree_at(_scales, model, [jnp.full_like(s, layer_scale) for s in _scales(model)])
    batch = jax.tree.map(jnp.asarray, noise_batch(config, 2, 0.25, seed=3))
    return model, batch, _gradients(model, batch)


@pytest.mark.parametrize("variant", [name for name in forms.VARIANTS if name != "plain"])
def test_every_backward_form_gives_the_plain_gradients(variant):
    # LayerScale at 1 rather than 1e-4, so that attention and the feed-forward shape the gradients
    model, batch, (plain, plain_program) = _case(1.0)
    with forms.VARIANTS[variant]():
        changed, program = _gradients(model, batch)
    assert program != plain_program, f"{variant} left the program as it was"
    assert len(plain) == len(changed)
    for expected, got in zip(plain, changed):
        scale = float(jnp.max(jnp.abs(expected))) + 1e-12
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5 * scale)


def test_a_wrong_backward_form_is_caught():
    """The comparison above can fail: attention's backward with dV dropped gives other gradients."""

    def without_value_gradient(saved, d_out):
        d_q, d_k, d_v, d_valid = forms._attention_backward_einsum(saved, d_out)
        return d_q, d_k, jnp.zeros_like(d_v), d_valid

    model, batch, (plain, _) = _case(1.0)
    with forms._replaced("_softmax_attention", forms._attention_with(without_value_gradient)):
        changed, _ = _gradients(model, batch)
    assert any(not np.allclose(a, b, rtol=1e-4, atol=0) for a, b in zip(plain, changed))
