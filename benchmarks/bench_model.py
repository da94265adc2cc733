"""Benchmark of the SepReformer presets on this machine: time, memory, achieved GFLOP/s and where
the work goes.

Run:
    python benchmarks/bench_model.py [--presets ci,book,full] [--save benchmarks/results/model.json]

Each preset runs in its own subprocess, so that its peak resident memory (ru_maxrss) is its own.
Dense float32 matmuls and an in-place elementwise pass over 1 GiB, measured before and after the
presets in the same run, give the machine's practical matmul peak and memory bandwidth (the
roofline of the speed appendix); achieved / peak says how well the model's compiled program uses
the CPU. FLOPs and bytes come from XLA's cost analysis of the compiled programs.

With --save, everything the tables print is also written as JSON (plus the bytes XLA expects
each part to move), with the date, the JAX version, the CPU and the load average at start and
end: whether anything else ran meanwhile cannot be known, and the load average is the best hint.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from sepreformer_book.conv import frame_count, padded_length
from sepreformer_book.model import PRESETS, SepReformer, parameter_count

# (batch, seconds of audio per item) for each preset; full's segment is short to keep the run short
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


def cost_of(compiled):
    """XLA's cost analysis as a dict (older JAX versions return a one-element list)."""
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else cost


def compiled_cost(fn, *args):
    compiled = fn.lower(*args).compile()
    return compiled, float(cost_of(compiled)["flops"])


def compiled_bytes(compiled):
    return float(cost_of(compiled).get("bytes accessed", float("nan")))


def jit_module(module, call=lambda m, x: m(x)):
    params, static = eqx.partition(module, eqx.is_array)
    return params, jax.jit(lambda p, x: call(eqx.combine(p, static), x))


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rates(sizes=(512, 1024, 2048), repeats=20):
    """GFLOP/s of jitted dense float32 square matmuls; the best is this machine's practical peak.

    Several sizes and many repeats: one busy moment on a shared machine can halve a measurement."""
    rates = {}
    for size in sizes:
        a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
        rates[size] = 2 * size**3 / best_time(jax.jit(jnp.dot), a, b, repeats=repeats) / 1e9
    return rates


def matmul_peak(size=2048, repeats=10):
    """GFLOP/s of one jitted dense float32 square matmul (bench_levers.py and
    bench_time_to_quality.py divide by it)."""
    return matmul_rates((size,), repeats)[size]


def memory_bandwidth(size=2**28, repeats=20):
    """GB/s of a jitted, in-place (donated) a * 2 + 1 on 1 GiB of float32: each element is read once
    and written once.

    1 GiB is larger than any cache. Without donation every call allocates a fresh output, and the
    page faults, not the memory, set the pace."""
    step = jax.jit(lambda v: v * 2.0 + 1.0, donate_argnums=0)
    a = jax.random.normal(jax.random.key(0), (size,), jnp.float32)
    a = jax.block_until_ready(step(step(a)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a = jax.block_until_ready(step(a))
        times.append(time.perf_counter() - start)
    return 2 * 4 * size / min(times) / 1e9


def shaped_matmul_rates(config, batch, seconds, repeats=50):  # about 1 ms each: many repeats
    """Plain matmuls with the shapes the preset's blocks multiply, timed alone: the most its
    products could reach here. One record per shape: sizes, FLOPs, bytes (operands and result),
    GFLOP/s."""
    samples = int(round(seconds * config.sample_rate))
    padded = padded_length(samples, config.kernel_size, config.stride)
    frames = frame_count(padded, config.kernel_size, config.stride)
    rows, chunks = batch * frames, -(-frames // config.chunk_size)
    head, heads, size = config.dim // config.num_heads, config.num_heads, config.chunk_size
    shapes = {  # name -> (batch of products, m, k, n)
        "feed-forward in": (1, rows, config.dim, config.ff_dim),
        "feed-forward out": (1, rows, config.ff_dim, config.dim),
        "q, k, v projections": (1, rows, config.dim, 3 * config.dim),
        "intra-chunk scores": (batch * chunks * heads, size, head, size),
        "inter-chunk scores": (batch * size * heads, chunks, head, chunks),
    }
    product = jax.jit(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y))
    records = []
    for name, (b, m, k, n) in shapes.items():
        left = jax.random.normal(jax.random.key(0), (b, m, k))
        right = jax.random.normal(jax.random.key(1), (b, k, n))
        seconds_taken = best_time(product, left, right, repeats=repeats)
        flops = 2 * b * m * k * n
        records.append({"name": name, "shape": f"{b} x ({m}x{k})({k}x{n})", "b": b, "m": m, "k": k,
                        "n": n, "flops": flops, "bytes": 4 * b * (m * k + k * n + m * n),
                        "gflops_per_s": flops / seconds_taken / 1e9})
    return records


def without_ff(block):
    """The same dual-path block with both feed-forwards replaced by the identity (no FLOPs)."""
    identity = eqx.nn.Lambda(lambda v: v)
    return eqx.tree_at(lambda b: (b.intra_block.ff, b.inter_block.ff), block, (identity, identity))


def run_preset(name):
    config = PRESETS[name]
    batch, seconds = WORKLOAD[name]
    num_samples = int(round(seconds * config.sample_rate))
    # best of many calls: on a shared machine the fastest call is the one least disturbed by others
    repeats, part_repeats = (5, 10) if name == "full" else (20, 40)
    model = SepReformer(config, key=jax.random.key(0))
    mixture = jax.random.normal(jax.random.key(1), (batch, num_samples)) * 0.1
    params, static = eqx.partition(model, eqx.is_array)

    def loss(p, x):  # stand-in: the real loss (losses.py) adds a few STFTs, small next to the model
        return jnp.mean(jnp.square(jax.vmap(eqx.combine(p, static))(x)))

    forward = jax.jit(lambda p, x: jax.vmap(eqx.combine(p, static))(x))
    train = jax.jit(jax.value_and_grad(loss))
    fwd_compiled, fwd_flops = compiled_cost(forward, params, mixture)
    train_compiled, train_flops = compiled_cost(train, params, mixture)
    fwd_s = best_time(fwd_compiled, params, mixture, repeats=repeats)
    train_s = best_time(train_compiled, params, mixture, repeats=repeats)

    # one item's forward pass by part: convolutions (encoder, decoders), attention, feed-forward,
    # split
    x = mixture[0]
    padding = padded_length(num_samples, config.kernel_size, config.stride) - num_samples
    h = jax.eval_shape(model.encoder, jnp.pad(x, (0, padding)))
    frames = jax.random.normal(jax.random.key(2), h.shape)
    enc_p, enc_f = jit_module(model.encoder)
    dec_p, dec_f = jit_module(model.decoder)
    blk = model.sep_blocks[0] if model.sep_blocks else model.rec_blocks[0]
    blk_p, blk_f = jit_module(blk)
    att_p, att_f = jit_module(without_ff(blk))
    spl_p, spl_f = jit_module(model.split)
    block_calls = config.num_sep_blocks + config.num_rec_blocks * config.num_stems
    stems = config.num_stems
    enc_c, enc_flops = compiled_cost(enc_f, enc_p, x)
    dec_c, dec_flops = compiled_cost(dec_f, dec_p, frames)
    blk_c, blk_flops = compiled_cost(blk_f, blk_p, frames)
    att_c, att_flops = compiled_cost(att_f, att_p, frames)
    spl_c, spl_flops = compiled_cost(spl_f, spl_p, frames)
    conv_s = (best_time(enc_c, enc_p, x, repeats=part_repeats)
              + stems * best_time(dec_c, dec_p, frames, repeats=part_repeats))
    blk_s = best_time(blk_c, blk_p, frames, repeats=part_repeats)
    att_s = best_time(att_c, att_p, frames, repeats=part_repeats)
    spl_s = best_time(spl_c, spl_p, frames, repeats=part_repeats)
    enc_b, dec_b, blk_b, att_b, spl_b = map(compiled_bytes, (enc_c, dec_c, blk_c, att_c, spl_c))
    parts = {  # part -> (FLOPs, seconds, bytes accessed), one item's forward pass
        "convolutions": (enc_flops + stems * dec_flops, conv_s, enc_b + stems * dec_b),
        "attention": (block_calls * att_flops, block_calls * att_s, block_calls * att_b),
        "feed-forward": (block_calls * (blk_flops - att_flops),
                         block_calls * max(blk_s - att_s, 0.0),
                         block_calls * max(blk_b - att_b, 0.0)),
        "split": (spl_flops, spl_s, spl_b),
    }
    return {
        "preset": name, "parameters": parameter_count(model), "batch": batch, "seconds": seconds,
        "frames": int(h.shape[0]), "fwd_s": fwd_s, "train_s": train_s, "fwd_flops": fwd_flops,
        "train_flops": train_flops, "fwd_bytes": compiled_bytes(fwd_compiled),
        "train_bytes": compiled_bytes(train_compiled), "parts": parts,
        "repeats": {"step": repeats, "parts": part_repeats},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_child(name):
    """One measurement in a fresh process: a preset, or "machine" (matmul rates and bandwidth)."""
    out = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_tables(results, peak):
    print(f"\n{'preset':>6} | {'params':>9} | {'batch x s':>9} | {'fwd s/s audio':>13} | "
          f"{'fwd+bwd s':>9} | {'fwd+bwd s/s audio':>17} | {'GFLOP fwd+bwd':>13} | "
          f"{'GFLOP/s':>8} | {'/ matmul peak':>13} | {'peak RSS MB':>11}")
    for r in results:
        audio = r["batch"] * r["seconds"]
        achieved = r["train_flops"] / r["train_s"] / 1e9
        print(f"{r['preset']:>6} | {r['parameters']:>9,} | {r['batch']:>2} x {r['seconds']:<4} | "
              f"{r['fwd_s'] / audio:>13.3f} | {r['train_s']:>9.3f} | "
              f"{r['train_s'] / audio:>17.3f} | {r['train_flops'] / 1e9:>13.1f} | "
              f"{achieved:>8.1f} | {achieved / peak:>13.2f} | {r['peak_rss_mb']:>11.0f}")
    for r in results:
        fwd_achieved = r["fwd_flops"] / r["fwd_s"] / 1e9
        print(f"\n{r['preset']}: forward {fwd_achieved:.1f} GFLOP/s "
              f"({fwd_achieved / peak:.2f} of peak); where one item's forward goes "
              f"({r['frames']} frames):")
        total_flops = sum(f for f, _, _ in r["parts"].values())
        total_time = sum(t for _, t, _ in r["parts"].values())
        print(f"  {'part':>14} | {'GFLOP':>8} | {'share':>6} | {'ms (modules timed alone)':>24} | "
              f"{'share':>6} | {'GFLOP/s':>8} | {'FLOP/byte':>9}")
        for part, (flops, seconds, moved) in r["parts"].items():
            rate = flops / seconds / 1e9 if seconds > 0 else float("nan")
            print(f"  {part:>14} | {flops / 1e9:>8.3f} | {flops / total_flops:>6.1%} | "
                  f"{seconds * 1e3:>24.1f} | {seconds / total_time:>6.1%} | {rate:>8.1f} | "
                  f"{flops / moved:>9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="ci,book,full",
                        help="comma-separated presets (ci, book, full)")
    parser.add_argument("--save", help="also write the results as JSON to this path "
                                       "(e.g. benchmarks/results/model.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "machine":
        print(json.dumps({"square": matmul_rates(), "bandwidth": memory_bandwidth()}))
        return
    if args.child:
        print(json.dumps(run_preset(args.child)))
        return
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    load_start = os.getloadavg()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores "
          f"({cpu_model()})")
    # The machine's ceilings run in a child of their own (a child's ru_maxrss starts from its
    # parent's, so the parent must never hold the 1 GiB array), before and after the presets: the
    # better of the two is less likely to have met a busy moment.
    ceilings_before = run_child("machine")
    results = []
    for name in presets:
        start = time.perf_counter()
        try:
            results.append(run_child(name))
        except RuntimeError as error:
            print(f"{name}: failed\n{error}")
            continue
        print(f"  ({name} measured in {time.perf_counter() - start:.0f} s)")
    ceilings_after = run_child("machine")
    square = {int(n): max(rate, ceilings_after["square"][n])
              for n, rate in ceilings_before["square"].items()}
    peak = max(square.values())
    bandwidth = max(ceilings_before["bandwidth"], ceilings_after["bandwidth"])
    print("dense float32 square matmuls (jitted, best of 20, before and after the presets): "
          + ", ".join(f"{n}: {rate:.1f}" for n, rate in square.items())
          + f" GFLOP/s; peak {peak:.1f}")
    print(f"memory bandwidth (in-place a * 2 + 1 on 1 GiB of float32, jitted, best of 20): "
          f"{bandwidth:.1f} GB/s")

    print_tables(results, peak)
    print("\nThe ceiling the shapes set: plain jitted matmuls of the sizes each preset's blocks "
          "multiply, timed alone.")
    ceilings = {}
    for name in presets:
        batch, seconds = WORKLOAD[name]
        print(f"  {name} (batch {batch} x {seconds} s):")
        ceilings[name] = shaped_matmul_rates(PRESETS[name], batch, seconds)
        for row in ceilings[name]:
            label, rate = f"{row['name']} {row['shape']}", row["gflops_per_s"]
            print(f"    {label:>52} | {rate:7.1f} GFLOP/s | {rate / peak:5.2f} of peak | "
                  f"{row['flops'] / row['bytes']:5.1f} FLOP/byte")
    if args.save:
        for r in results:  # parts as records: the JSON reads without knowing the tuple order
            r["parts"] = {part: {"flops": f, "seconds": t, "bytes": b}
                          for part, (f, t, b) in r["parts"].items()}
        saved = {
            "benchmark": "bench_model.py", "presets_measured": presets, "date": started,
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "machine": platform.machine(),
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "note": "whether anything else ran meanwhile is unknowable; the 1, 5 and 15 minute "
                    "load averages at start and end are recorded instead",
            "matmul_peak_gflops_per_s": peak,
            "square_matmuls": [{"size": n, "gflops_per_s": rate} for n, rate in square.items()],
            "memory_bandwidth_gb_per_s": bandwidth,
            "ceilings_before": ceilings_before, "ceilings_after": ceilings_after,
            "workload": {name: {"batch": WORKLOAD[name][0], "seconds": WORKLOAD[name][1]}
                         for name in presets},
            "presets": results, "shaped_matmuls": ceilings,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save, "w") as f:
            json.dump(saved, f, indent=1)
        print(f"\nsaved to {args.save}")


if __name__ == "__main__":
    main()
