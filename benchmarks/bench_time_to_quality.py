"""Time to quality on this machine: train recipes from scratch for a wall-clock budget, score held-out SI-SDRi at
fixed training times, and print when each first reaches the target (default +2 dB mean over the parts).
The default budget and target suit the randomised choir, on which no recipe gets far in half an hour.

    python benchmarks/bench_time_to_quality.py [--budget-minutes 30] [--eval-every 60] [--recipes baseline,fast]
                                               [--stop-minutes fast=20] [--save benchmarks/results/time_to_quality.json]
    python benchmarks/bench_time_to_quality.py --speed-only        # steps/s, GFLOP/s and memory, no training to quality

Each recipe runs in its own process (its peak memory is its own), one after the other, on the `book` corpus
(the randomised choir's synthetic chorales, no augmentation; scored on fixed segments of its test split). The
training clock excludes evaluation. The learning-rate schedule follows the budget: the first steps measure the
speed, and the cosine decay is set to end when the budget does (if the probe underestimated the speed, training goes
on at the final learning rate until the budget is spent).
`--stop-minutes NAME=M` ends a recipe's run after M training minutes without shortening its schedule, so a recipe
that is only watched until it passes the target still trains with the same schedule as the others.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# name -> model overrides of the book preset, and run settings. "baseline" is the seed's block layout at 8 kHz
# (K=16, S=8, 2+2 blocks, dim 64) with the seed's batch of 4 x 2 s, as in ../shared/notes/cpu-training.md; "fast" is
# the layout and schedule the book preset and profile adopted from this benchmark (chapters 5 and 8).
SEED_LAYOUT = dict(kernel_size=16, stride=8, num_rec_blocks=2)
RECIPES = {
    "baseline": dict(model=SEED_LAYOUT, batch_size=4, segment_seconds=2.0, learning_rate=1e-3, warmup_steps=200),
    "seed-layout-small-batch": dict(model=SEED_LAYOUT, batch_size=2, segment_seconds=1.0, learning_rate=1e-3,
                                    warmup_steps=200),
    "fast": dict(model=dict(kernel_size=32, stride=16, num_rec_blocks=1), batch_size=2, segment_seconds=1.0,
                 learning_rate=2e-3, warmup_steps=50),
}

CASE = r"""
import json, resource, sys, time
import warnings
import equinox as eqx, jax
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # CPU cannot reuse every donated buffer
from dataclasses import replace
from sepreformer_book.config import active_profile
from sepreformer_book.choir import ensure_corpus
from sepreformer_book.data import JaCappellaDataset, training_iterator
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.fit import OptimizerConfig, lower_step, make_optimizer, step
from sepreformer_book.training import validate, validation_batches

recipe, budget_s, eval_every_s, speed_only = json.loads(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
stop_s = min(budget_s, float(sys.argv[5]))
config = replace(PRESETS["book"], **recipe["model"])
rate, batch_size = config.sample_rate, recipe["batch_size"]
segment = int(recipe["segment_seconds"] * rate)
root = ensure_corpus(active_profile("book"), progress=False)
train_set = JaCappellaDataset(root, sample_rate=rate, split="train")
test_set = JaCappellaDataset(root, sample_rate=rate, split="test")
held_out = validation_batches(test_set, 2 * rate, 4, 48)  # 48 fixed 2-s segments of the test songs

def fresh(optimizer):
    model = SepReformer(config, key=jax.random.key(0))
    return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))

# 1. speed probe (also gives the FLOPs of one compiled step)
batches = training_iterator(train_set, segment, batch_size, seed=0)
probe_optimizer = make_optimizer(OptimizerConfig(learning_rate=recipe["learning_rate"]))
model, state = fresh(probe_optimizer)
batch = jax.device_put(next(batches))
flops = sum(program.compile().cost_analysis()["flops"] for program in lower_step(model, state, batch, probe_optimizer))
model, state, metrics = step(model, state, batch, probe_optimizer)
jax.block_until_ready(metrics)
start = time.perf_counter()
probe_steps = 20
for _ in range(probe_steps):
    model, state, metrics = step(model, state, jax.device_put(next(batches)), probe_optimizer)
jax.block_until_ready(metrics)
steps_per_s = probe_steps / (time.perf_counter() - start)
result = {"steps_per_s": steps_per_s, "flops_per_step": flops, "gflops_per_s": flops * steps_per_s / 1e9,
          "audio_s_per_s": steps_per_s * batch_size * recipe["segment_seconds"]}
if not speed_only:
    # 2. the timed run: schedule length from the measured speed
    total_steps = max(int(budget_s * steps_per_s), 100)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=recipe["learning_rate"],
                                               warmup_steps=min(recipe["warmup_steps"], total_steps // 10),
                                               decay_steps=total_steps))
    jax.block_until_ready(step(*fresh(optimizer), batch, optimizer))  # compile outside the clock (step donates its inputs)
    model, state = fresh(optimizer)
    batches = training_iterator(train_set, segment, batch_size, seed=0)
    clock, steps, curve, next_eval = 0.0, 0, [], eval_every_s
    while clock < stop_s:  # past total_steps (a slow probe) the schedule holds its final learning rate
        tick = time.perf_counter()
        model, state, metrics = step(model, state, jax.device_put(next(batches)), optimizer)
        jax.block_until_ready(metrics)
        clock += time.perf_counter() - tick
        steps += 1
        if clock >= next_eval or clock >= stop_s:
            scores = validate(model, held_out)
            curve.append({"seconds": clock, "steps": steps, **scores})
            print(json.dumps({"recipe": sys.argv[6], "seconds": round(clock), "steps": steps,
                              "mean_si_sdri": round(curve[-1]["mean_si_sdri"], 2)}), file=sys.stderr, flush=True)
            next_eval += eval_every_s
    result.update(curve=curve, total_steps=total_steps, steps_done=steps)
result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps(result))
"""


def run_recipe(name: str, budget_s: float, eval_every_s: float, speed_only: bool, stop_s: float) -> dict:
    done = subprocess.run([sys.executable, "-c", CASE, json.dumps(RECIPES[name]), str(budget_s), str(eval_every_s),
                           "1" if speed_only else "0", str(stop_s), name], stdout=subprocess.PIPE, text=True)
    if done.returncode:  # its traceback went to stderr, which the recipe shares with this script
        raise SystemExit(f"recipe {name} failed (exit {done.returncode}); see its error above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_to(curve: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose mean SI-SDRi reached `target`."""
    return next((point["seconds"] for point in curve if point["mean_si_sdri"] >= target), None)


def main() -> None:
    from bench_model import matmul_peak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--eval-every", type=float, default=60.0, help="training seconds between evaluations")
    parser.add_argument("--recipes", default="baseline,fast")
    parser.add_argument("--target", type=float, default=2.0, help="mean SI-SDRi (dB) to reach")
    parser.add_argument("--stop-minutes", default="fast=20", help="NAME=M,...: end these recipes after M training minutes "
                        "(their schedules still follow --budget-minutes)")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument("--save", type=Path, help="also write every measurement (curves per part) to this JSON file")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = [name for name in names if name not in RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    stops = {name: float(minutes) * 60 for name, minutes in
             (item.split("=") for item in args.stop_minutes.split(",") if item)}
    if set(stops) - set(RECIPES):
        parser.error(f"--stop-minutes: unknown recipe(s) {', '.join(set(stops) - set(RECIPES))}")
    peak = matmul_peak()
    results = {name: run_recipe(name, args.budget_minutes * 60, args.eval_every, args.speed_only,
                                stops.get(name, args.budget_minutes * 60)) for name in names}
    if args.save:
        from sepreformer_book.choir import CORPUS_MARKER, synthetic_corpus_root
        from sepreformer_book.config import active_profile, atomic_write
        from sepreformer_book.model import PRESETS

        manifest = json.loads((synthetic_corpus_root(active_profile("book")) / CORPUS_MARKER).read_text())
        corpus = {key: manifest[key] for key in ("songs", "seconds", "seed")}
        corpus["split"] = {name: len(songs) for name, songs in manifest["split"].items()}
        record = dict(arguments=vars(args) | {"save": str(args.save)}, matmul_peak_gflops=peak,
                      base_preset=asdict(PRESETS["book"]),  # what each recipe's model overrides apply to
                      corpus=corpus,  # the book corpus the recipes trained and were scored on
                      cpu_count=os.cpu_count(), recipes={name: RECIPES[name] for name in names}, results=results,
                      finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        args.save.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.save, lambda f: f.write(json.dumps(record, indent=1).encode()))
    print(f"matmul peak of this JAX on this machine: {peak:.0f} GFLOP/s; {os.cpu_count()} CPU cores")
    print(f"{'recipe':10} {'steps/s':>7} {'audio s/s':>9} {'GFLOP/s':>8} {'of peak':>7} {'peak RSS GB':>11}  settings")
    for name, r in results.items():
        print(f"{name:10} {r['steps_per_s']:7.2f} {r['audio_s_per_s']:9.2f} {r['gflops_per_s']:8.1f} "
              f"{r['gflops_per_s'] / peak:7.2f} {r['peak_rss_gb']:11.2f}  {json.dumps(RECIPES[name])}")
    if args.speed_only:
        return
    from sepreformer_book.config import STEM_NAMES

    print(f"\nheld-out mean SI-SDRi (dB) by training time; target {args.target:+.1f} dB")
    for name, r in results.items():
        points = "  ".join(f"{p['seconds'] / 60:4.1f} min {p['mean_si_sdri']:+5.2f}" for p in r["curve"])
        print(f"{name:10} {points}")
    print(f"\n{'recipe':10} {'steps':>6} {'time to target':>14} " + " ".join(f"{n[:9]:>9}" for n in STEM_NAMES)
          + f" {'mean':>6}   (final per-part SI-SDRi, dB)")
    reached = {}
    for name, r in results.items():
        reached[name] = time_to(r["curve"], args.target)
        final = r["curve"][-1]
        when = f"{reached[name] / 60:.1f} min" if reached[name] is not None else "not reached"
        print(f"{name:10} {r['steps_done']:6d} {when:>14} " + " ".join(f"{final[f'si_sdri/{n}']:9.2f}" for n in STEM_NAMES)
              + f" {final['mean_si_sdri']:6.2f}")
    base, *others = names
    for name in others:
        if reached[base] is not None and reached[name] is not None:
            print(f"time to {args.target:+.0f} dB: {name} {reached[name] / 60:.1f} min vs {base} {reached[base] / 60:.1f} "
                  f"min: {reached[base] / reached[name]:.1f}x sooner")
        elif reached[name] is not None:
            print(f"{name} reached {args.target:+.0f} dB in {reached[name] / 60:.1f} min; {base} did not within "
                  f"{stops.get(base, args.budget_minutes * 60) / 60:g} min: more than "
                  f"{stops.get(base, args.budget_minutes * 60) / reached[name]:.1f}x sooner")
        else:
            print(f"{name} did not reach {args.target:+.0f} dB within the budget")


if __name__ == "__main__":
    main()
