"""What each speed change bought: the book preset's training step with and without the reduced-sine Snake and the
fused attention, timed side by side.

Run: python benchmarks/bench_levers.py [--rounds 15] [--save]
All four programs are compiled first, then timed in turns (one step of each per round), so that every variant sees
the same machine state; the table reports medians. The 'before' variants compute the same function the old way:
Snake as x + sin^2(alpha x) / alpha with jnp.sin, and attention and LayerNorm through Equinox's own calls
(`ThroughEquinox`). --save writes benchmarks/results/levers.json, which chapter 8 prints.
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

from sepreformer_book.dual_path import ThroughEquinox, TransformerBlock
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.snake import Snake

RESULTS = Path(__file__).parent / "results" / "levers.json"


class JnpSinSnake(eqx.Module):
    """The textbook Snake with jnp.sin and autodiff's derivatives (alpha near 1 here, so the division is safe)."""

    alpha: jax.Array

    def __call__(self, x):
        return x + jnp.sin(self.alpha * x) ** 2 / self.alpha


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

    programs, outputs = {}, {}
    for reduced_snake in (False, True):
        for fused_attention in (False, True):
            name = f"Snake {'reduced sine' if reduced_snake else 'jnp.sin'}, attention {'fused' if fused_attention else 'through Equinox'}"
            swapped = variant(model, reduced_snake=reduced_snake, fused_attention=fused_attention)
            counts = {kind.__name__: count(swapped, kind) for kind in (JnpSinSnake, ThroughEquinox)}
            assert (counts["JnpSinSnake"] > 0) != reduced_snake and (counts["ThroughEquinox"] > 0) != fused_attention
            params, static = eqx.partition(swapped, eqx.is_array)
            loss = lambda p, x, static=static: jnp.mean(jnp.square(jax.vmap(eqx.combine(p, static))(x)))
            compiled = jax.jit(jax.value_and_grad(loss)).lower(params, mixture).compile()
            programs[name] = (compiled, params, float(compiled.cost_analysis()["flops"]))
            # LayerScale 1 for the comparison only: at its initial 1e-4 the blocks barely change the output
            outputs[name] = jax.vmap(loud(swapped))(mixture)
    reference = next(iter(outputs.values()))
    max_gap = max(float(jnp.max(jnp.abs(out - reference))) for out in outputs.values())
    print(f"all variants compute the same separation: max |difference| {max_gap:.1e}")
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
    print(f"\n{'variant':>48} | {'median ms':>9} | {'min ms':>7} | {'GFLOP':>6} | {'speed-up':>8}")
    for name, times in seconds.items():
        median = float(np.median(times))
        row = {"variant": name, "median_s": median, "min_s": float(min(times)), "flops": programs[name][2],
               "speedup": float(np.median(seconds[before])) / median}
        rows.append(row)
        print(f"{name:>48} | {median * 1e3:9.1f} | {row['min_s'] * 1e3:7.1f} | {row['flops'] / 1e9:6.2f} | "
              f"{row['speedup']:7.2f}x")
    if args.save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        result = {"finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "jax": jax.__version__,
                  "cpu_count": os.cpu_count(), "preset": args.preset, "batch": args.batch, "seconds": args.seconds,
                  "rounds": args.rounds, "max_output_gap": max_gap, "rows": rows}
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, RESULTS)
        print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
