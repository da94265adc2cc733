"""What the randomised choir and augmentation buy on voices the model never heard: train variants of the recipe for
the same wall-clock budget, one after another in one run, and score each on the held-out-voices corpus.

    python benchmarks/bench_generalisation.py [--budget-minutes 10] [--variants today,randomised,...]
                                              [--save benchmarks/results/generalisation.json]

Variants (the `book` model and run settings, batch 2 x 1 s, learning rate 2e-3, cosine decay over the budget):

    today               the renderer before randomisation (benchmarks/legacy_choir.py), no augmentation
    randomised          the randomised choir (the book's corpus), no augmentation
    augmented           the randomised choir with augmentation: the book's recipe
    remixed             as augmented, and one part in five taken from another song (Augment.remix = 0.2)
    dry                 as augmented, but every song dry (what rooms buy)
    one-source          as augmented, but one glottal source family (what the second family buys)
    wider               as augmented, with a wider model (dim 96, feed-forward 384): what capacity buys in the time
    deeper              as augmented, with a second reconstruction block (as the original tutorial)

and what makes the randomised choir hard to learn, from the first renderer's side (no augmentation; legacy_choir.py's
`simplify` holds today's renderer's factors as the first renderer did):

    plain               today's voice model with every factor held: one timbre per part, steady singing, dry
    plain-pulse         as plain, the harmonic source in sine phase (a pulse) instead of random phases
    plain-pulse-formants  as plain-pulse, through the first renderer's three parallel formants, not the cascade
    plain-timbre        as plain, but each singer's timbre drawn at random (sources, tract, tilt, colour, level)

    python benchmarks/bench_generalisation.py --variants today,plain,plain-pulse,plain-pulse-formants,plain-timbre,\
        randomised --budget-minutes 3 --save benchmarks/results/voice.json

    randomised-formants the randomised choir, every factor drawn, but through the first renderer's parallel formants

    python benchmarks/bench_generalisation.py --variants randomised,randomised-formants --budget-minutes 3 \
        --save benchmarks/results/formants.json

and whether the book's learning rate suits the randomised choir (no augmentation, as randomised):

    lr-1e-3, lr-4e-3, lr-8e-3   as randomised, with this peak learning rate instead of 2e-3

    python benchmarks/bench_generalisation.py --variants randomised,lr-1e-3,lr-4e-3,lr-8e-3 --budget-minutes 3 \
        --save benchmarks/results/learning_rate.json

and what the batch's shape buys (no augmentation, as randomised):

    segment-2s          one 2-s segment a step instead of two 1-s ones: the same audio, twice the context
    batch-4             four 1-s segments a step: twice the audio, slower steps

    python benchmarks/bench_generalisation.py --variants randomised,segment-2s,batch-4 --budget-minutes 3 \
        --save benchmarks/results/batch.json

Each variant trains in its own process; the corpora of the variants that need their own are rendered once under
data/bench-generalisation/. Every model is scored on whole songs of three test sets: the test split of the corpus it
trained on, the randomised choir's test split, and the held-out-voices corpus (the same test chorales sung with a
source family, vowels and rooms that no variant trains on). Leave the machine otherwise idle.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from legacy_choir import PLAIN_SONGS, SINGER_FACTORS

# corpus: "legacy", or overrides of TRAINING_CHOIR; augment: None (off), or overrides of Augment(); model (optional):
# overrides of the book's ModelConfig; voice (optional): arguments of legacy_choir.simplify; run (optional): overrides
# of the book profile's run settings (learning_rate, warmup_steps, batch_size, segment_seconds)
VARIANTS = {
    "today": dict(corpus="legacy", augment=None),
    "randomised": dict(corpus={}, augment=None),
    "augmented": dict(corpus={}, augment={}),
    "remixed": dict(corpus={}, augment={"remix": 0.2}),
    "dry": dict(corpus={"dry_fraction": 1.0}, augment={}),
    "one-source": dict(corpus={"sources": ["harmonic"]}, augment={}),
    "wider": dict(corpus={}, augment={}, model={"dim": 96, "ff_dim": 384}),
    "deeper": dict(corpus={}, augment={}, model={"num_rec_blocks": 2}),
    "plain": dict(corpus=PLAIN_SONGS, augment=None, voice={}),
    "plain-pulse": dict(corpus=PLAIN_SONGS, augment=None, voice={"pulses": True}),
    "plain-pulse-formants": dict(corpus=PLAIN_SONGS, augment=None, voice={"pulses": True, "parallel_tract": True}),
    "plain-timbre": dict(corpus=PLAIN_SONGS, augment=None, voice={"keep": ["timbre"]}),
    "randomised-formants": dict(corpus={}, augment=None, voice={"keep": list(SINGER_FACTORS), "parallel_tract": True}),
    "lr-1e-3": dict(corpus={}, augment=None, run={"learning_rate": 1e-3}),
    "lr-4e-3": dict(corpus={}, augment=None, run={"learning_rate": 4e-3}),
    "lr-8e-3": dict(corpus={}, augment=None, run={"learning_rate": 8e-3}),
    "segment-2s": dict(corpus={}, augment=None, run={"batch_size": 1, "segment_seconds": 2.0}),
    "batch-4": dict(corpus={}, augment=None, run={"batch_size": 4}),
}
DEFAULT_VARIANTS = ("today", "randomised", "augmented", "remixed", "dry", "one-source")

CASE = r"""
import json, sys, time, warnings
from dataclasses import asdict, replace
from pathlib import Path
import equinox as eqx, jax
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
sys.path.insert(0, str(Path(sys.argv[3])))
from sepreformer_book import choir
from sepreformer_book.config import PROFILES, atomic_write
from sepreformer_book.data import Augment, JaCappellaDataset, training_iterator
from sepreformer_book.evaluate import evaluate_model, mean_over_parts, summarise
from sepreformer_book.fit import OptimizerConfig, make_optimizer, step
from sepreformer_book.model import SepReformer, model_config_for

name, variant, budget_s = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[4])
profile = PROFILES["book"]
config = replace(model_config_for("book"), **variant.get("model", {}))
rate = config.sample_rate
run = {"batch_size": profile.batch_size, "segment_seconds": profile.segment_seconds, **profile.run,
       **variant.get("run", {})}
book_root = choir.ensure_corpus(profile, progress=False)
held_out_root = choir.ensure_held_out_corpus(profile, progress=False)
if variant["corpus"] == {} and "voice" not in variant:
    root = book_root
else:
    import legacy_choir
    root = choir.data_home() / "bench-generalisation" / (variant["corpus"] if variant["corpus"] == "legacy" else name)
    if "voice" in variant:
        legacy_choir.simplify(choir, **variant["voice"])  # the workers fork after this, so they sing this way
    if variant["corpus"] == "legacy":
        choir.render_song = legacy_choir.render_song  # the workers fork after this, so they sing the old way
        singers = replace(choir.TRAINING_CHOIR, vocal_percussion=0.0)
    else:
        singers = replace(choir.TRAINING_CHOIR, **{k: tuple(v) if isinstance(v, list) else v
                                                   for k, v in variant["corpus"].items()})
    expected = dict(songs=profile.corpus_songs, seconds=profile.corpus_seconds, seed=0, choir=asdict(singers))
    if not choir.is_complete_corpus(root, **expected):
        choir.make_corpus(root, profile.corpus_songs, profile.corpus_seconds, seed=0, choir=singers, progress=False)
        if variant["corpus"] == "legacy" or "voice" in variant:  # say in its manifest which renderer sang it
            manifest = json.loads((root / choir.CORPUS_MARKER).read_text())
            manifest["renderer"] = "benchmarks/legacy_choir.py" + (
                f" simplify({json.dumps(variant['voice'])})" if "voice" in variant else "")
            atomic_write(root / choir.CORPUS_MARKER, lambda f: f.write(json.dumps(manifest, indent=1).encode()))

train_set = JaCappellaDataset(root, sample_rate=rate, split="train")
batch_size, segment = run["batch_size"], int(run["segment_seconds"] * rate)
augment = None if variant["augment"] is None else Augment(**variant["augment"])

def fresh(optimizer):
    model = SepReformer(config, key=jax.random.key(0))
    return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))

probe = make_optimizer(OptimizerConfig(learning_rate=run["learning_rate"]))
batches = training_iterator(train_set, segment, batch_size, seed=0, augment=augment)
model, state = fresh(probe)
model, state, metrics = step(model, state, jax.device_put(next(batches)), probe)
jax.block_until_ready(metrics)
tick = time.perf_counter()
for _ in range(20):
    model, state, metrics = step(model, state, jax.device_put(next(batches)), probe)
jax.block_until_ready(metrics)
total_steps = max(int(budget_s * 20 / (time.perf_counter() - tick)), 100)
optimizer = make_optimizer(OptimizerConfig(learning_rate=run["learning_rate"], warmup_steps=run["warmup_steps"],
                                           decay_steps=total_steps))
batch = jax.device_put(next(batches))
jax.block_until_ready(step(*fresh(optimizer), batch, optimizer))  # compile outside the clock
model, state = fresh(optimizer)
batches = training_iterator(train_set, segment, batch_size, seed=0, augment=augment)
clock, steps = 0.0, 0
while clock < budget_s:
    tick = time.perf_counter()
    model, state, metrics = step(model, state, jax.device_put(next(batches)), optimizer)
    jax.block_until_ready(metrics)
    clock += time.perf_counter() - tick
    steps += 1
scores = {}
for label, test_root in (("own test", root), ("randomised test", book_root), ("held-out voices", held_out_root)):
    test_set = JaCappellaDataset(test_root, sample_rate=rate, split="test")
    scores[label] = mean_over_parts(summarise(evaluate_model(model, test_set), test_set.stems))
print(json.dumps({"steps": steps, "seconds": clock, "scores": scores}))
"""


def run_case(case: str, name: str, variant: dict, budget_s: float) -> dict:
    """Train one variant in a fresh Python running `case` (its peak memory is its own); the JSON it prints last."""
    done = subprocess.run([sys.executable, "-c", case, name, json.dumps(variant), str(Path(__file__).parent),
                           str(budget_s)], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"variant {name} failed (exit {done.returncode}); see its error above")
    return json.loads(done.stdout.strip().splitlines()[-1])


# (a, b, what a has and b has not): the steps from the first renderer to the randomised choir
HARD_STEPS = (
    ("today", "plain", "the first renderer's voice rather than today's (both plain)"),
    ("plain-pulse", "plain", "a pulse rather than random harmonic phases"),
    ("plain-pulse-formants", "plain-pulse", "three parallel formants rather than the cascade"),
    ("plain", "plain-timbre", "one timbre per part rather than random timbre"),
    ("plain", "randomised", "every factor held rather than randomised"),
    ("randomised-formants", "randomised", "parallel formants rather than the cascade (all randomised)"),
)


def what_makes_it_hard(results: dict) -> dict[str, float]:
    """For each step of HARD_STEPS whose two variants ran: own-test score of a minus that of b (dB)."""
    own = {name: result["scores"]["own test"] for name, result in results.items()}
    return {what: own[a] - own[b] for a, b, what in HARD_STEPS if a in own and b in own}


def variant_arguments(
    description: str, variants: dict, default_variants: tuple[str, ...], budget_minutes: float
) -> tuple[argparse.Namespace, list[str]]:
    """The command line of a training ablation: --budget-minutes, --variants (checked against `variants`), --save."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--budget-minutes", type=float, default=budget_minutes, help="training minutes per variant")
    parser.add_argument("--variants", default=",".join(default_variants),
                        help=f"comma-separated, from {', '.join(variants)}")
    parser.add_argument("--save", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in variants]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(variants)}")
    if args.budget_minutes <= 0:
        parser.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    return args, names


def main() -> None:
    args, names = variant_arguments(__doc__.splitlines()[0], VARIANTS, DEFAULT_VARIANTS, 10.0)
    results = {}
    for name in names:
        results[name] = run_case(CASE, name, VARIANTS[name], args.budget_minutes * 60)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    labels = list(next(iter(results.values()))["scores"])
    print(f"\nmean SI-SDRi over parts (dB) after {args.budget_minutes:g} training minutes each, whole test songs:\n")
    print("| variant | steps | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name, result in results.items():
        print(f"| {name} | {result['steps']} | " + " | ".join(f"{result['scores'][k]:.2f}" for k in labels) + " |")
    hard = what_makes_it_hard(results)
    if hard:
        print("\nwhat makes the corpus hard to learn (on each variant's own test songs):")
        for what, gain in hard.items():
            print(f"  {what}: {gain:+.2f} dB")
    base = results.get("augmented")
    if base:
        print("\nwhat each factor buys on held-out voices (the variant with it minus the one without):")
        for name, factor in (("today", "randomised choir and augmentation together"), ("randomised", "augmentation"),
                             ("remixed", "not remixing"), ("dry", "rooms"), ("one-source", "a second source family")):
            if name in results:
                gain = base["scores"]["held-out voices"] - results[name]["scores"]["held-out voices"]
                print(f"  {factor}: {gain:+.2f} dB")
        for name, factor in (("wider", "a wider model"), ("deeper", "a second reconstruction block")):
            if name in results:  # here the variant has the factor and augmented has not
                gain = results[name]["scores"]["held-out voices"] - base["scores"]["held-out voices"]
                print(f"  {factor} (in the same time): {gain:+.2f} dB")
    if args.save:
        from sepreformer_book.config import atomic_write

        payload = {"budget_minutes": args.budget_minutes, "variants": {name: VARIANTS[name] for name in names},
                   "results": results, "what makes it hard": hard}
        atomic_write(args.save, lambda f: f.write(json.dumps(payload, indent=1).encode()))


if __name__ == "__main__":
    main()
