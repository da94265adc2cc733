"""What each speed change bought, and how far the book preset's training step could go: the step with and without
the reduced-sine Snake and the fused attention, and with whole parts of the network removed, timed side by side.

Run: python benchmarks/bench_levers.py [--rounds 15] [--save]
All programs are compiled first, then timed in turns (one step of each per round), so that every variant sees the same
machine state; the table reports medians and the fraction of a dense matmul peak measured in the same run.
- levers: the same function computed the old way or the new way: Snake as x + sin^2(alpha x) / alpha with jnp.sin,
  attention and LayerNorm through Equinox's own calls (`ThroughEquinox`);
- bounds: not the same function. Starting from the current model, remove the attention scores (keep the q, k, v and
  output projections), then Snake, then LayerNorm. What is left is dense layers and residual adds: its fraction of
  the peak bounds what any cleverer attention or activation could reach at this width.
--save writes benchmarks/results/levers.json, which chapter 8 prints.
"""

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bench_model import matmul_peak  # this folder is on sys.path when the script runs
from sepreformer_book.dual_path import ThroughEquinox, TransformerBlock, apply_rowwise, project_qkv, vmapped_grouped
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.snake import Snake

RESULTS = Path(__file__).parent / "results" / "levers.json"


class JnpSinSnake(eqx.Module):
    """The textbook Snake with jnp.sin and autodiff's derivatives (alpha near 1 here, so the division is safe)."""

    alpha: jax.Array

    def __call__(self, x):
        return x + jnp.sin(self.alpha * x) ** 2 / self.alpha


class DenseOnlyBlock(eqx.Module):
    """A TransformerBlock's dense layers alone: its q, k, v and output projections with no attention between them."""

    block: TransformerBlock
    normalise: bool = eqx.field(static=True)

    def __call__(self, x, valid=None):
        b, attn = self.block, self.block.attn
        norm = (lambda layer, v: apply_rowwise(layer, v)) if self.normalise else (lambda layer, v: v)
        q, k, v = project_qkv(attn, norm(b.norm1, x))
        x = x + b.scale1 * apply_rowwise(attn.output_proj, q + k + v)
        return x + b.scale2 * apply_rowwise(b.ff, norm(b.norm2, x))

    def grouped(self, x, valid, axis):
        return vmapped_grouped(self, x, valid, axis)


BOUNDS = {  # name -> (replace Snake by the identity?, keep LayerNorm?)
    "fused, attention scores removed": (False, True),
    "  and Snake removed": (True, True),
    "  and LayerNorm removed": (True, False),
}


def bound_variant(model, *, drop_snake: bool, normalise: bool):
    if drop_snake:
        model = replace(model, Snake, lambda s: eqx.nn.Identity())
    return replace(model, TransformerBlock, lambda b: DenseOnlyBlock(b, normalise))


def replace(tree, kind, make):
    """`tree` with every node of type `kind` replaced by make(node)."""
    return jax.tree_util.tree_map(lambda n: make(n) if isinstance(n, kind) else n, tree,
                                  is_leaf=lambda n: isinstance(n, kind))


def loud(model):
    """The model with every LayerScale set to 1, so that every sub-layer shows in the output."""
    ones = lambda b: eqx.tree_at(lambda t: (t.scale1, t.scale2), b, (jnp.ones_like(b.scale1), jnp.ones_like(b.scale2)))
    return replace(model, TransformerBlock, ones)  # reaches the blocks inside ThroughEquinox wrappers too


def count(tree, kind) -> int:
    return sum(isinstance(n, kind) for n in jax.tree_util.tree_leaves(tree, is_leaf=lambda n: isinstance(n, kind)))


def variant(model, *, reduced_snake: bool, fused_attention: bool):
    if not reduced_snake:  # first: a replaced TransformerBlock would hide its Snakes from the second pass
        model = replace(model, Snake, lambda s: JnpSinSnake(s.alpha))
    if not fused_attention:
        model = replace(model, TransformerBlock, ThroughEquinox)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="book", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--save", action="store_true", help=f"write {RESULTS.relative_to(Path(__file__).parents[1])}")
    args = parser.parse_args()
    config = PRESETS[args.preset]
    model = SepReformer(config, key=jax.random.key(0))
    mixture = jax.random.normal(jax.random.key(1), (args.batch, int(round(args.seconds * config.sample_rate)))) * 0.1
    print(f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores; preset {args.preset}, "
          f"batch {args.batch} x {args.seconds:g} s")

    peak = matmul_peak()
    print(f"dense float32 matmul peak (2048x2048, jitted, best of 10): {peak:.1f} GFLOP/s")

    def compile_step(tree):
        params, static = eqx.partition(tree, eqx.is_array)
        loss = lambda p, x: jnp.mean(jnp.square(jax.vmap(eqx.combine(p, static))(x)))
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, mixture).compile()
        return compiled, params, float(compiled.cost_analysis()["flops"])

    programs, kinds, outputs = {}, {}, {}
    for reduced_snake in (False, True):
        for fused_attention in (False, True):
            name = f"Snake {'reduced sine' if reduced_snake else 'jnp.sin'}, attention {'fused' if fused_attention else 'through Equinox'}"
            swapped = variant(model, reduced_snake=reduced_snake, fused_attention=fused_attention)
            counts = {kind.__name__: count(swapped, kind) for kind in (JnpSinSnake, ThroughEquinox)}
            assert (counts["JnpSinSnake"] > 0) != reduced_snake and (counts["ThroughEquinox"] > 0) != fused_attention
            programs[name], kinds[name] = compile_step(swapped), "lever"
            # LayerScale 1 for the comparison only: at its initial 1e-4 the blocks barely change the output
            outputs[name] = jax.vmap(loud(swapped))(mixture)
    for name, (drop_snake, normalise) in BOUNDS.items():
        stripped = bound_variant(model, drop_snake=drop_snake, normalise=normalise)
        assert count(stripped, DenseOnlyBlock) > 0 and (count(stripped, Snake) == 0) == drop_snake
        programs[name], kinds[name] = compile_step(stripped), "bound"
    reference = next(iter(outputs.values()))
    max_gap = max(float(jnp.max(jnp.abs(out - reference))) for out in outputs.values())
    print(f"the four lever variants compute the same separation: max |difference| {max_gap:.1e}")
    assert max_gap < 1e-5

    seconds = {name: [] for name in programs}
    for compiled, params, _ in programs.values():
        jax.block_until_ready(compiled(params, mixture))
    for _ in range(args.rounds):
        for name, (compiled, params, _) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, mixture))
            seconds[name].append(time.perf_counter() - start)

    before = next(iter(programs))
    rows = []
    print(f"\n{'kind':>5} | {'variant':>45} | {'median ms':>9} | {'GFLOP':>6} | {'GFLOP/s':>7} | {'of peak':>7} | "
          f"{'speed-up':>8}")
    for name, times in seconds.items():
        median = float(np.median(times))
        flops = programs[name][2]
        row = {"kind": kinds[name], "variant": name, "median_s": median, "min_s": float(min(times)), "flops": flops,
               "of_peak": flops / median / 1e9 / peak, "speedup": float(np.median(seconds[before])) / median}
        rows.append(row)
        print(f"{row['kind']:>5} | {name:>45} | {median * 1e3:9.1f} | {flops / 1e9:6.2f} | {flops / median / 1e9:7.1f} | "
              f"{row['of_peak']:7.2f} | {row['speedup']:7.2f}x")
    if args.save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        result = {"finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "jax": jax.__version__,
                  "cpu_count": os.cpu_count(), "preset": args.preset, "batch": args.batch, "seconds": args.seconds,
                  "rounds": args.rounds, "matmul_peak_gflops": peak, "max_output_gap": max_gap, "rows": rows}
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, RESULTS)
        print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
