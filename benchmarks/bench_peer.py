"""The book's JAX library against a faithful PyTorch port of the same model (benchmarks/peer_torch.py): training steps,
a long forward pass and a whole song's windowed separation, timed side by side on the same machine.

Run:
    python benchmarks/bench_peer.py [--quick] [--rounds-scale 1.0] [--workloads book-train,full-train,...]
                                    [--threads N] [--save benchmarks/results/peer.json]

Needs PyTorch (`pip install -e ".[peer]"`; a CPU-only wheel is enough); without it the script says so and exits.

Workloads (all from the same weights: the JAX model's, copied into the port):
- book-train: one training step of the book preset, batch 2 x 1 s at 8 kHz: `sepreformer_book.fit.step` (two jitted
  programs: forward and composite loss; gradients, clipping, AdamW) against the port's step (forward + loss,
  backward, clipping, torch's fused CPU AdamW);
- full-train: the same for the full preset, batch 1 x 0.25 s at 44.1 kHz;
- forward-30s: the book model on one 30 s clip in one call (inference mode on the torch side);
- song-5min: windowed separation of a 5-minute song: `sepreformer_book.inference.separate_long` with the book's
  window and cross-fade, against the port's copy of it (the same window starts, batches and cross-fade).

Each workload runs three ways: JAX (ours), PyTorch eager, and torch.compile (mode default, static shapes). The
first call of each (compilation for JAX and torch.compile; torch.compile's into a fresh, empty inductor cache, so
cold, like JAX's, which keeps no cache on disk here) is timed on its own; then the three run in turns, one
call each per round (A, B, C, A, B, C, ...), so that each sees the same machine state; the table reports the median
and the min-max range over the rounds, and ours / torch.compile (below 1: ours is faster). torch uses --threads
intra-op threads (default: every core, as XLA's CPU client does) and flushes denormal floats to zero, as XLA's CPU
code does (`torch.set_flush_denormal(True)`, before any thread starts), so that both run the same arithmetic
(--keep-denormals leaves torch's default). The first call's results are compared across the three (loss, or max
|difference| of the outputs), so what is timed is known to compute the same thing.

Leave the machine otherwise idle. Load hurts the port far more than JAX: torch's OpenMP threads wait for each
other at the end of every operation, so losing one core to another process stalls them all, where XLA's thread pool
shares out the work (on the 2-core development machine, run under `nice` beside a notebook execution, the port's
training steps took 20 to 70 times as long as alone, the JAX step 2 to 5 times).

With --save, everything printed is also written as JSON, with the date, the versions, the CPU and the load
average at start and end (whether anything else ran meanwhile cannot be known; the load average is the best hint).
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone

import numpy as np

try:
    import torch
except ImportError:  # an optional peer: `make bench` runs every script, with or without it
    torch = None

WORKLOADS = ("book-train", "full-train", "forward-30s", "song-5min")
ROUNDS = {"book-train": 15, "full-train": 5, "forward-30s": 7, "song-5min": 3}
QUICK_ROUNDS = {"book-train": 3, "full-train": 2, "forward-30s": 2, "song-5min": 1}
TRAIN_BATCHES = {"book": (2, 1.0), "full": (1, 0.25)}  # each training workload's batch: items x seconds
IMPLS = ("jax", "eager", "compile")
LABELS = {"jax": "JAX (ours)", "eager": "torch eager", "compile": "torch.compile"}


def noise_batch(config, batch_size: int, seconds: float, seed: int = 0) -> dict:
    """batch_size items of `seconds` of noise stems at the preset's rate, every stem active and present."""
    rng = np.random.default_rng(seed)
    samples = int(round(seconds * config.sample_rate))
    stems = (0.1 * rng.standard_normal((batch_size, config.num_stems, samples))).astype(np.float32)
    flags = np.ones(stems.shape[:2], dtype=bool)
    return {"mixture": stems.sum(axis=1), "stems": stems, "active": flags, "present": flags.copy()}


def train_workload(preset: str, batch_size: int, seconds: float) -> dict:
    import equinox as eqx
    import jax
    import peer_torch as pt
    from sepreformer_book import fit
    from sepreformer_book.model import PRESETS, SepReformer

    config = PRESETS[preset]
    model = SepReformer(config, key=jax.random.key(0))
    batch = noise_batch(config, batch_size, seconds)
    torch_batch = pt.torch_batch(batch)
    eager_port, compiled_port = pt.from_jax(model), pt.from_jax(model)  # before fit.step donates `model`
    eager_step = pt.make_train_step(eager_port, pt.PeerOptimizer(eager_port))
    compiled_step = pt.make_train_step(compiled_port, pt.PeerOptimizer(compiled_port), compile=True)
    optimizer = fit.make_optimizer()
    state = [model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))]

    def jax_step():
        state[0], state[1], metrics = fit.step(state[0], state[1], batch, optimizer)
        jax.block_until_ready(metrics)  # the gradient norm comes from the step's second program: waits for both
        return float(metrics["loss"])

    return {"description": f"{preset} training step, batch {batch_size} x {seconds:g} s at {config.sample_rate} Hz",
            "kind": "loss", "runs": {"jax": jax_step, "eager": lambda: float(eager_step(torch_batch)["loss"]),
                                     "compile": lambda: float(compiled_step(torch_batch)["loss"])}}


def forward_workload(seconds: float = 30.0) -> dict:
    import jax
    import peer_torch as pt
    from sepreformer_book.fit import separate_batch
    from sepreformer_book.model import PRESETS, SepReformer

    config = PRESETS["book"]
    model = SepReformer(config, key=jax.random.key(0))
    clip = noise_batch(config, 1, seconds)["mixture"]
    port = pt.from_jax(model)
    compiled = torch.compile(port, dynamic=False)
    clip_t = torch.from_numpy(clip)

    def torch_forward(forward):
        with torch.inference_mode():
            return forward(clip_t).numpy()

    return {"description": f"book forward pass, one {seconds:g} s clip at {config.sample_rate} Hz in one call",
            "kind": "output", "runs": {"jax": lambda: np.asarray(separate_batch(model, clip)),
                                       "eager": lambda: torch_forward(port),
                                       "compile": lambda: torch_forward(compiled)}}


def song_workload(seconds: float = 300.0) -> dict:
    import jax
    import peer_torch as pt
    from sepreformer_book.inference import (BATCH_WINDOWS, OVERLAP_SECONDS, WINDOW_SECONDS, frame_grid,
                                            separate_long, window_starts, window_sizes)
    from sepreformer_book.model import PRESETS, SepReformer

    config = PRESETS["book"]
    model = SepReformer(config, key=jax.random.key(0))
    song = noise_batch(config, 1, seconds, seed=1)["mixture"][0]
    window, overlap = window_sizes(WINDOW_SECONDS, OVERLAP_SECONDS, config.sample_rate, frame_grid(model))
    port = pt.from_jax(model)
    compiled = torch.compile(port, dynamic=False)
    sizes = dict(window_samples=window, overlap_samples=overlap, batch_windows=BATCH_WINDOWS)
    windows = len(window_starts(song.size, window, overlap))
    return {"description": f"book windowed separation of a {seconds / 60:g}-minute song: {windows} windows of "
                           f"{window} samples, overlap {overlap}, {BATCH_WINDOWS} per call",
            "kind": "output", "runs": {"jax": lambda: separate_long(model, song, **sizes),
                                       "eager": lambda: pt.separate_long(port, song, **sizes),
                                       "compile": lambda: pt.separate_long(compiled, song, **sizes)}}


def make_workload(name: str) -> dict:
    if name == "book-train":
        return train_workload("book", *TRAIN_BATCHES["book"])
    if name == "full-train":
        return train_workload("full", *TRAIN_BATCHES["full"])
    if name == "forward-30s":
        return forward_workload(30.0)
    if name == "song-5min":
        return song_workload(300.0)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def timed(run):
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


@contextlib.contextmanager
def cold_inductor_cache():
    """A fresh, empty TorchInductor cache directory (deleted afterwards) and empty in-memory caches: torch.compile
    compiles everything, as in a first run on a new machine, not from the kernels an earlier run left in /tmp."""
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory(prefix="bench_peer_inductor_") as directory:
        try:
            from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
        except ImportError:  # older or newer torch: the environment variable alone
            original = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
            try:
                yield
            finally:
                if original is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = original
        else:
            with temporary_cache_dir(directory):
                yield
    torch._dynamo.reset()


def measure(name: str, rounds: int) -> dict:
    """First calls (timed alone; torch.compile's into a cold cache), one more untimed call each (not for the long
    song), then `rounds` interleaved rounds; the first calls' results compared with JAX's."""
    with cold_inductor_cache():
        return _measure(name, rounds)


def _measure(name: str, rounds: int) -> dict:
    workload = make_workload(name)
    runs = workload["runs"]
    first, results = {}, {}
    for impl in IMPLS:
        first[impl], results[impl] = timed(runs[impl])
        print(f"  {name}: first call {LABELS[impl]} {first[impl]:.2f} s", flush=True)
    if workload["kind"] == "loss":
        parity = {impl: {"loss": results[impl], "relative_difference": abs(results[impl] - results["jax"])
                         / abs(results["jax"])} for impl in IMPLS if impl != "jax"}
        parity["jax"] = {"loss": results["jax"]}
    else:
        parity = {impl: {"max_abs_difference": float(np.max(np.abs(results[impl] - results["jax"]))),
                         "max_abs_output": float(np.max(np.abs(results["jax"])))} for impl in IMPLS if impl != "jax"}
    if name != "song-5min":
        for impl in IMPLS:
            runs[impl]()
    times = {impl: [] for impl in IMPLS}
    for index in range(rounds):
        for impl in IMPLS:
            times[impl].append(timed(runs[impl])[0])
        print(f"  {name}: round {index + 1}/{rounds}: " + ", ".join(f"{LABELS[i]} {times[i][-1]:.3f} s" for i in IMPLS),
              flush=True)
    row = {"workload": name, "description": workload["description"], "rounds": rounds, "parity": parity}
    for impl in IMPLS:
        row[impl] = {"median_s": statistics.median(times[impl]), "min_s": min(times[impl]), "max_s": max(times[impl]),
                     "first_call_s": first[impl], "times_s": times[impl]}
    row["ours_over_eager"] = row["jax"]["median_s"] / row["eager"]["median_s"]
    row["ours_over_compile"] = row["jax"]["median_s"] / row["compile"]["median_s"]
    return row


def cell(stats: dict) -> str:
    return f"{stats['median_s']:8.3f} [{stats['min_s']:.3f}-{stats['max_s']:.3f}]"


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print(f"{'workload':<12} | {'JAX (ours) s':>24} | {'torch eager s':>24} | {'torch.compile s':>24} | "
          f"{'ours/eager':>10} | {'ours/compile':>12}")
    for row in rows:
        print(f"{row['workload']:<12} | {cell(row['jax']):>24} | {cell(row['eager']):>24} | "
              f"{cell(row['compile']):>24} | {row['ours_over_eager']:10.2f} | {row['ours_over_compile']:12.2f}")
    print("seconds per call: median [min-max] over the rounds; ratios of medians (below 1: ours is faster)")
    print("\nfirst call (compilation for JAX and torch.compile), seconds:")
    for row in rows:
        print(f"{row['workload']:<12} | JAX {row['jax']['first_call_s']:7.1f} | torch eager "
              f"{row['eager']['first_call_s']:7.1f} | torch.compile {row['compile']['first_call_s']:7.1f}")
    print("\nwhat each workload is, and how far the first calls agree with JAX's:")
    for row in rows:
        parity = row["parity"]
        if "jax" in parity:  # a training step: its loss
            agree = ", ".join(f"{LABELS[i]} loss {parity[i]['loss']:.6f} "
                              f"(relative {parity[i]['relative_difference']:.1e})" for i in ("eager", "compile"))
            agree = f"JAX loss {parity['jax']['loss']:.6f}; {agree}"
        else:
            agree = ", ".join(f"{LABELS[i]} max |difference| {parity[i]['max_abs_difference']:.1e}"
                              for i in ("eager", "compile"))
            agree += f" (outputs up to {parity['eager']['max_abs_output']:.2f})"
        print(f"{row['workload']:<12} | {row['rounds']} rounds | {row['description']}\n{'':<12} | {agree}")


def versions() -> dict:
    import equinox
    import jax
    import jaxlib
    import optax

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "equinox": equinox.__version__, "optax": optax.__version__, "torch": torch.__version__,
            "numpy": np.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a handful of rounds, for smoke-testing only")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds-scale", type=float, default=1.0, help="multiply every workload's rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all)")
    parser.add_argument("--save", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="leave torch's denormal floats alone; default: flush them to zero, as XLA does")
    args = parser.parse_args()
    if torch is None:
        print("bench_peer.py: skipped, PyTorch is not installed (pip install -e '.[peer]'; a CPU-only wheel will do)")
        return
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    for name in names:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    flush_denormal = torch.set_flush_denormal(not args.keep_denormals) and not args.keep_denormals
    torch.set_num_threads(args.threads)
    denormals = "flushed" if flush_denormal else "kept"
    # the STFTs of the loss are complex; inductor runs them as ATen calls and warns once per graph
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    from bench_model import cpu_model  # this folder is on sys.path when the script runs

    load_start = os.getloadavg()
    started = datetime.now(timezone.utc)
    print(f"bench_peer: {os.cpu_count()} CPU cores ({cpu_model()}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, denormals {denormals}, load average at start "
          + " ".join(f"{v:.2f}" for v in load_start) + (" (quick: too few rounds to trust)" if args.quick else ""),
          flush=True)
    table = QUICK_ROUNDS if args.quick else ROUNDS
    rows = [measure(name, max(1, round(table[name] * args.rounds_scale))) for name in names]
    load_end = os.getloadavg()
    header = (f"JAX (sepreformer_book) against a PyTorch port of the same model, {os.cpu_count()} CPU cores, "
              f"torch threads {torch.get_num_threads()}, denormals {denormals}; load average "
              f"{load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
              + ("; QUICK: a smoke test, not a measurement" if args.quick else ""))
    print_table(rows, header)
    if args.save:
        result = {"benchmark": "peer", "date": started.isoformat(timespec="seconds"), "quick": args.quick,
                  "versions": versions(), "cpu_count": os.cpu_count(), "cpu": cpu_model(),
                  "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                  "torch_flush_denormal": flush_denormal,
                  "loadavg_start": list(load_start), "loadavg_end": list(load_end),
                  "seconds": (datetime.now(timezone.utc) - started).total_seconds(), "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nsaved {args.save}")


if __name__ == "__main__":
    sys.exit(main())
