"""Benchmark of whole-song separation: windowed (chunked) against one pass over the whole song, book preset.

Run: python benchmarks/bench_separate.py  [--seconds 30,120,300] [--memory-budget-gb 8]
     python benchmarks/bench_separate.py --windows 1,2,4,8 [--song-seconds 60]
Each case runs in its own subprocess, so that its peak resident memory (ru_maxrss) is its own; the table also shows
the resident memory before separation (imports, model), so the increase is visible. Times exclude compilation
(reported apart). The whole-song pass is run only where XLA's compiled plan for it fits the memory budget; otherwise
the planned size is shown. The model is a freshly initialised book preset: weights do not change the cost.

With --windows, it times instead the windowed separation of one song for each window length (the cross-fade scaled
with the window, the same number of windows per call), in turns over a few rounds, and prints the time per minute of
audio: which window is fastest per second of audio. (Which one separates best is the evaluation chapter's question.)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

from sepreformer_book.inference import (BATCH_WINDOWS, OVERLAP_SECONDS, WINDOW_SECONDS, frame_grid,
                                        separate_long, unchunked_temp_bytes, window_sizes)
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.fit import separate_batch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_case(mode: str, seconds: float, budget_gb: float) -> dict:
    model = SepReformer(PRESETS["book"], key=jax.random.key(0))
    rate = model.config.sample_rate
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * rate))).astype(np.float32)
    result = {"mode": mode, "seconds": seconds, "rss_before_mb": peak_rss_mb()}
    if mode == "chunked":
        window, overlap = window_sizes(WINDOW_SECONDS, OVERLAP_SECONDS, rate, frame_grid(model))
        start = time.perf_counter()
        separate_long(model, audio[:window], window_samples=window, overlap_samples=overlap)  # compile only
        result["compile_s"] = time.perf_counter() - start
        start = time.perf_counter()
        separate_long(model, audio, window_samples=window, overlap_samples=overlap, batch_windows=BATCH_WINDOWS)
        result["run_s"] = time.perf_counter() - start
    else:
        planned = unchunked_temp_bytes(model, audio.size)
        result["planned_gb"] = planned / 1e9
        if planned / 1e9 > budget_gb:
            result["skipped"] = True
            return result
        start = time.perf_counter()
        np.asarray(separate_batch(model, audio[None]))  # compile + first run
        first_call = time.perf_counter() - start
        start = time.perf_counter()
        np.asarray(separate_batch(model, audio[None]))
        result["run_s"] = time.perf_counter() - start
        result["compile_s"] = first_call - result["run_s"]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def window_sweep(window_seconds: list[float], song_seconds: float, rounds: int = 3) -> None:
    model = SepReformer(PRESETS["book"], key=jax.random.key(0))
    rate = model.config.sample_rate
    audio = (0.1 * np.random.default_rng(0).standard_normal(int(song_seconds * rate))).astype(np.float32)
    sizes = {}
    for seconds in window_seconds:
        overlap_seconds = OVERLAP_SECONDS * seconds / WINDOW_SECONDS
        sizes[seconds] = window_sizes(seconds, overlap_seconds, rate, frame_grid(model))
        window, overlap = sizes[seconds]
        separate_long(model, audio[:window], window_samples=window, overlap_samples=overlap)  # compile
    times = {seconds: [] for seconds in sizes}
    for _ in range(rounds):
        for seconds, (window, overlap) in sizes.items():
            start = time.perf_counter()
            separate_long(model, audio, window_samples=window, overlap_samples=overlap)
            times[seconds].append(time.perf_counter() - start)
    print(f"windowed separation of a {song_seconds:g} s song, book preset, {BATCH_WINDOWS} windows per call, "
          f"median of {rounds} rounds")
    print(f"{'window s':>8} | {'overlap s':>9} | {'s per audio min':>15} | {'vs default':>10}")
    default = np.median(times[WINDOW_SECONDS]) if WINDOW_SECONDS in times else None
    for seconds, (window, overlap) in sizes.items():
        median = float(np.median(times[seconds]))
        relative = f"{median / default:>10.2f}" if default else f"{'':>10}"
        print(f"{window / rate:>8.3g} | {overlap / rate:>9.3g} | {median / song_seconds * 60:>15.2f} | {relative}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", default="30,120,300", help="comma-separated song lengths in seconds")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0,
                        help="run the whole-song pass only where XLA plans at most this much temporary memory")
    parser.add_argument("--windows", help="comma-separated window lengths in seconds: time the window sweep instead")
    parser.add_argument("--song-seconds", type=float, default=60.0, help="song length for --windows")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.windows:
        window_sweep([float(s) for s in args.windows.split(",") if s.strip()], args.song_seconds)
        return
    if args.child:
        print(json.dumps(run_case(args.child[0], float(args.child[1]), args.memory_budget_gb)))
        return
    lengths = [float(s) for s in args.seconds.split(",") if s.strip()]
    config = PRESETS["book"]
    print(f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores; book preset "
          f"(dim {config.dim}, {config.sample_rate} Hz); windows of {WINDOW_SECONDS} s, overlap {OVERLAP_SECONDS} s, "
          f"{BATCH_WINDOWS} windows per batch")
    results = {}
    for seconds in lengths:
        for mode in ("chunked", "unchunked"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(seconds),
                                  "--memory-budget-gb", str(args.memory_budget_gb)], capture_output=True, text=True)
            if out.returncode:
                print(f"{mode} {seconds:g} s: failed\n{out.stderr[-2000:]}")
                continue
            results[mode, seconds] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"\n{'audio':>7} | {'chunked s':>9} | {'RTF':>6} | {'s per audio min':>15} | {'vs shortest':>11} | "
          f"{'RSS before MB':>13} | {'peak RSS MB':>11} | {'whole-song s':>12} | {'whole peak MB':>13} | "
          f"{'whole/chunked time':>18} | {'whole/chunked memory':>20}")
    first = None
    for seconds in lengths:
        chunked = results.get(("chunked", seconds))
        whole = results.get(("unchunked", seconds))
        if chunked is None:
            continue
        per_minute = chunked["run_s"] / seconds * 60
        first = first or per_minute
        if whole is None:
            whole_cells = f"{'failed':>12} | {'':>13} | {'':>18} | {'':>20}"
        elif whole.get("skipped"):
            whole_cells = (f"{'not run':>12} | {'plan ' + format(whole['planned_gb'], '.1f') + ' GB':>13} | "
                           f"{'':>18} | {'':>20}")
        else:
            whole_cells = (f"{whole['run_s']:>12.2f} | {whole['peak_rss_mb']:>13.0f} | "
                           f"{whole['run_s'] / chunked['run_s']:>18.2f} | "
                           f"{whole['peak_rss_mb'] / chunked['peak_rss_mb']:>20.2f}")
        print(f"{seconds:>6g}s | {chunked['run_s']:>9.2f} | {chunked['run_s'] / seconds:>6.3f} | {per_minute:>15.2f} | "
              f"{per_minute / first:>11.2f} | {chunked['rss_before_mb']:>13.0f} | {chunked['peak_rss_mb']:>11.0f} | "
              + whole_cells)
    compiles = [r["compile_s"] for r in results.values() if "compile_s" in r]
    if compiles:
        print(f"\ncompilation (not in the times above): {min(compiles):.1f} to {max(compiles):.1f} s per process")
    print("RTF = separation time / audio duration (below 1: faster than real time). 'vs shortest' near 1 means the "
          "time grows linearly with the length.")


if __name__ == "__main__":
    main()
