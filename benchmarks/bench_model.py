"""Benchmark of the SepReformer presets on this machine: time, memory, achieved GFLOP/s and where the work goes.

Run: python benchmarks/bench_model.py  [--presets ci,book,full]
Each preset runs in its own subprocess, so that its peak resident memory (ru_maxrss) is its own. A dense float32
matmul measured in the same run gives the machine's practical peak; the ratio achieved/peak says how well the model's
compiled program uses the CPU. FLOPs come from XLA's cost analysis of the compiled programs.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from sepreformer_book.conv import frame_count, padded_length
from sepreformer_book.model import PRESETS, SepReformer, parameter_count

# (batch, seconds of audio per item) for each preset; full uses a shortened segment to stay within a few minutes
WORKLOAD = {"ci": (2, 0.5), "book": (2, 1.0), "full": (1, 0.25)}


def best_time(fn, *args, repeats):
    fn(*args)  # compile + warm
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def compiled_cost(fn, *args):
    compiled = fn.lower(*args).compile()
    return compiled, float(compiled.cost_analysis()["flops"])


def jit_module(module, call=lambda m, x: m(x)):
    params, static = eqx.partition(module, eqx.is_array)
    return params, jax.jit(lambda p, x: call(eqx.combine(p, static), x))


def matmul_peak(size=2048, repeats=10):
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    seconds = best_time(jax.jit(jnp.dot), a, b, repeats=repeats)
    return 2 * size**3 / seconds / 1e9


def shaped_matmul_rates(config, batch, seconds, repeats=50):  # each takes about a millisecond: many repeats
    """GFLOP/s of plain matmuls with the shapes the preset's blocks multiply: the most its matmuls could reach here."""
    samples = int(round(seconds * config.sample_rate))
    frames = frame_count(padded_length(samples, config.kernel_size, config.stride), config.kernel_size, config.stride)
    rows, chunks, head = batch * frames, -(-frames // config.chunk_size), config.dim // config.num_heads
    shapes = {  # name -> (batch of products, m, k, n)
        "feed-forward in": (1, rows, config.dim, config.ff_dim),
        "feed-forward out": (1, rows, config.ff_dim, config.dim),
        "q, k, v projections": (1, rows, config.dim, 3 * config.dim),
        "intra-chunk scores": (batch * chunks * config.num_heads, config.chunk_size, head, config.chunk_size),
        "inter-chunk scores": (batch * config.chunk_size * config.num_heads, chunks, head, chunks),
    }
    rates = {}
    for name, (b, m, k, n) in shapes.items():
        left = jax.random.normal(jax.random.key(0), (b, m, k))
        right = jax.random.normal(jax.random.key(1), (b, k, n))
        seconds_taken = best_time(jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y)), left, right, repeats=repeats)
        rates[f"{name} {b} x ({m}x{k})({k}x{n})"] = 2 * b * m * k * n / seconds_taken / 1e9
    return rates


def without_ff(block):
    """The same dual-path block with both feed-forwards replaced by the identity (no FLOPs)."""
    identity = eqx.nn.Lambda(lambda v: v)
    return eqx.tree_at(lambda b: (b.intra_block.ff, b.inter_block.ff), block, (identity, identity))


def run_preset(name):
    config = PRESETS[name]
    batch, seconds = WORKLOAD[name]
    num_samples = int(round(seconds * config.sample_rate))
    repeats = 2 if name == "full" else 5
    model = SepReformer(config, key=jax.random.key(0))
    mixture = jax.random.normal(jax.random.key(1), (batch, num_samples)) * 0.1
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, x):  # stand-in loss: the real one (chapter 06) adds a few STFTs, small next to the model
        return jnp.mean(jnp.square(jax.vmap(eqx.combine(p, static))(x)))

    forward = jax.jit(lambda p, x: jax.vmap(eqx.combine(p, static))(x))
    train = jax.jit(jax.value_and_grad(loss))
    fwd_compiled, fwd_flops = compiled_cost(forward, params, mixture)
    train_compiled, train_flops = compiled_cost(train, params, mixture)
    fwd_s = best_time(fwd_compiled, params, mixture, repeats=repeats)
    train_s = best_time(train_compiled, params, mixture, repeats=repeats)

    # breakdown of one forward pass of one item: conv front/back end, attention, feed-forward, split
    x = mixture[0]
    h = jax.eval_shape(model.encoder, jnp.pad(x, (0, padded_length(num_samples, config.kernel_size, config.stride) - num_samples)))
    frames = jax.random.normal(jax.random.key(2), h.shape)
    enc_p, enc_f = jit_module(model.encoder)
    dec_p, dec_f = jit_module(model.decoder)
    blk = model.sep_blocks[0] if model.sep_blocks else model.rec_blocks[0]
    blk_p, blk_f = jit_module(blk)
    att_p, att_f = jit_module(without_ff(blk))
    spl_p, spl_f = jit_module(model.split)
    block_calls = config.num_sep_blocks + config.num_rec_blocks * config.num_stems
    enc_c, enc_flops = compiled_cost(enc_f, enc_p, x)
    dec_c, dec_flops = compiled_cost(dec_f, dec_p, frames)
    blk_c, blk_flops = compiled_cost(blk_f, blk_p, frames)
    att_c, att_flops = compiled_cost(att_f, att_p, frames)
    spl_c, spl_flops = compiled_cost(spl_f, spl_p, frames)
    conv_s = best_time(enc_c, enc_p, x, repeats=repeats) + config.num_stems * best_time(dec_c, dec_p, frames, repeats=repeats)
    blk_s = best_time(blk_c, blk_p, frames, repeats=repeats)
    att_s = best_time(att_c, att_p, frames, repeats=repeats)
    parts = {
        "convolutions": (enc_flops + config.num_stems * dec_flops, conv_s),
        "attention": (block_calls * att_flops, block_calls * att_s),
        "feed-forward": (block_calls * (blk_flops - att_flops), block_calls * max(blk_s - att_s, 0.0)),
        "split": (spl_flops, best_time(spl_c, spl_p, frames, repeats=repeats)),
    }
    return {
        "preset": name, "parameters": parameter_count(model), "batch": batch, "seconds": seconds,
        "frames": int(h.shape[0]), "fwd_s": fwd_s, "train_s": train_s, "fwd_flops": fwd_flops,
        "train_flops": train_flops, "parts": parts,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="ci,book,full", help="comma-separated presets (ci, book, full)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_preset(args.child)))
        return
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    print(f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores")
    peak = matmul_peak()
    print(f"dense float32 matmul peak (2048x2048, jitted, best of 10): {peak:.1f} GFLOP/s\n")
    results = []
    for name in presets:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True)
        if out.returncode:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  ({name} measured in {time.perf_counter() - start:.0f} s)")

    print(f"\n{'preset':>6} | {'params':>9} | {'batch x s':>9} | {'fwd s/s audio':>13} | {'fwd+bwd s':>9} | "
          f"{'fwd+bwd s/s audio':>17} | {'GFLOP fwd+bwd':>13} | {'GFLOP/s':>8} | {'/ matmul peak':>13} | {'peak RSS MB':>11}")
    for r in results:
        audio = r["batch"] * r["seconds"]
        achieved = r["train_flops"] / r["train_s"] / 1e9
        print(f"{r['preset']:>6} | {r['parameters']:>9,} | {r['batch']:>2} x {r['seconds']:<4} | "
              f"{r['fwd_s'] / audio:>13.3f} | {r['train_s']:>9.3f} | {r['train_s'] / audio:>17.3f} | "
              f"{r['train_flops'] / 1e9:>13.1f} | {achieved:>8.1f} | {achieved / peak:>13.2f} | {r['peak_rss_mb']:>11.0f}")
    for r in results:
        fwd_achieved = r["fwd_flops"] / r["fwd_s"] / 1e9
        print(f"\n{r['preset']}: forward {fwd_achieved:.1f} GFLOP/s ({fwd_achieved / peak:.2f} of peak); "
              f"where one item's forward goes ({r['frames']} frames):")
        total_flops = sum(f for f, _ in r["parts"].values())
        total_time = sum(t for _, t in r["parts"].values())
        print(f"  {'part':>14} | {'GFLOP':>8} | {'share':>6} | {'ms (modules timed alone)':>24} | {'share':>6} | {'GFLOP/s':>8}")
        for part, (flops, seconds) in r["parts"].items():
            rate = flops / seconds / 1e9 if seconds > 0 else float("nan")
            print(f"  {part:>14} | {flops / 1e9:>8.3f} | {flops / total_flops:>6.1%} | {seconds * 1e3:>24.1f} | "
                  f"{seconds / total_time:>6.1%} | {rate:>8.1f}")
    print("\nThe ceiling the shapes set: plain jitted matmuls of the sizes each preset's blocks multiply, timed alone.")
    for name in presets:
        batch, seconds = WORKLOAD[name]
        print(f"  {name} (batch {batch} x {seconds} s):")
        for shape, rate in shaped_matmul_rates(PRESETS[name], batch, seconds).items():
            print(f"    {shape:>52} | {rate:7.1f} GFLOP/s | {rate / peak:5.2f} of peak")


if __name__ == "__main__":
    main()
