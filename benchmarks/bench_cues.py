"""Does the book model lack a cue for telling voices apart by pitch? Two probes on the randomised choir, each variant
trained for the same wall-clock budget, one after another in one run, and scored on whole test songs.

    python benchmarks/bench_cues.py [--budget-minutes 6.7] [--variants book,pitch-0.5,...]
                                    [--save benchmarks/results/cues.json]

With every singer's timbre drawn at random, a part can be told only by its register and its line, that is by pitch.
Two ways to hand the model pitch, neither available to the book's model as it is:

    book            the book's model and run (batch 2 x 1 s, learning rate 2e-3, no augmentation)
    pitch-0.5       the same model and a linear head on each part's frames after the split layer that names the
                    part's sung note (MIDI 24-96, or none); its cross-entropy, weighted 0.5, joins the loss. The
                    notes come from the renderer itself (each training song is sung again with the same seed and
                    must give the same audio); the head is dropped after training
    pitch-2         as pitch-0.5, with weight 2
    front-32ms-mask a front end that resolves harmonics: 256 learned filters of 32 ms (hop 4 ms) into the book's
                    64-wide separator through a linear bottleneck, and each part as a ReLU mask on the filters
    front-64ms-mask as front-32ms-mask with 64-ms filters (hop 8 ms, chunks of 16 frames)
    front-64ms-map  as front-64ms-mask, each part's filters predicted directly rather than as a mask

All variants read the same segments in the same order (a NumPy stream, seed 0); the schedule warms up for 50 steps
and decays over the steps a short speed probe says the budget holds. Each variant runs in its own process.
"""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench_generalisation import run_case, variant_arguments  # this folder is on sys.path when the script runs

LOWEST_NOTE, HIGHEST_NOTE = 24, 96  # MIDI; class 0 is "no note"
NOTE_CLASSES = HIGHEST_NOTE - LOWEST_NOTE + 2

VARIANTS = {
    "book": dict(kind="book"),
    "pitch-0.5": dict(kind="pitch", weight=0.5),
    "pitch-2": dict(kind="pitch", weight=2.0),
    "front-32ms-mask": dict(kind="front", kernel=256, stride=32, filters=256, chunk=32, mask=True),
    "front-64ms-mask": dict(kind="front", kernel=512, stride=64, filters=256, chunk=16, mask=True),
    "front-64ms-map": dict(kind="front", kernel=512, stride=64, filters=256, chunk=16, mask=False),
}
DEFAULT_VARIANTS = ("book", "pitch-0.5", "front-32ms-mask", "front-64ms-mask", "front-64ms-map")


def note_classes(
    notes: dict[str, list[tuple[float, float, float]]],
    stems: tuple[str, ...],
    start: int,
    frames: int,
    kernel: int,
    stride: int,
    sample_rate: int,
) -> np.ndarray:
    """(stems, frames) int32: the class of the note each part sings at the centre of each encoder frame of a
    segment that starts at sample `start` (0 where it sings none; a later note wins where two overlap)."""
    centres = (start + stride * np.arange(frames) + kernel / 2) / sample_rate
    classes = np.zeros((len(stems), frames), np.int32)
    for n, stem in enumerate(stems):
        for begin, end, pitch in notes.get(stem, []):
            note = int(np.clip(round(pitch), LOWEST_NOTE, HIGHEST_NOTE)) - LOWEST_NOTE + 1
            classes[n, (centres >= begin) & (centres < end)] = note
    return classes


def _sing_again(job: tuple[str, str]) -> tuple[str, dict, bool]:
    """Worker: render one song of the corpus at `root` again, recording the notes each part is given."""
    root, name = job
    from sepreformer_book import choir
    import soundfile as sf

    manifest = json.loads((Path(root) / choir.CORPUS_MARKER).read_text())
    heard: list[list] = []
    render_voice = choir.render_voice

    def listening(notes, *args, **kwargs):
        heard.append([tuple(float(v) for v in note) for note in notes])
        return render_voice(notes, *args, **kwargs)

    path = {p.stem: p for p in choir.chorale_paths()}[name]
    rng = choir.song_rng(manifest["seed"], name)
    choir.render_voice = listening  # render_song looks it up when it is called
    try:
        parts = choir.render_song(choir.read_chorale(path), manifest["seconds"], manifest["sample_rate"], rng,
                                  choir.TRAINING_CHOIR)
    finally:
        choir.render_voice = render_voice
    stored, _ = sf.read(Path(root) / choir.SYNTH_SUBSET / name / "alto.wav", dtype="int16")
    return name, dict(zip(choir.STEM_NAMES, heard)), bool(np.array_equal(stored, parts["alto"]))


def song_notes(root: Path, names: list[str]) -> dict[str, dict]:
    """The notes every part of these songs of the synthetic corpus at `root` sings, cached beside the corpus."""
    from multiprocessing import get_context
    from sepreformer_book.config import atomic_write

    cache = root.parent / "bench-cues" / f"{root.name}-notes.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [name for name in names if name not in known]
    if missing:
        with get_context("fork").Pool(min(os.cpu_count() or 1, 8)) as pool:
            sung = pool.map(_sing_again, [(str(root), name) for name in missing])
        changed = [name for name, _, same in sung if not same]
        if changed:
            raise SystemExit(f"{root}: singing {', '.join(changed[:3])} again gave different audio; was the corpus "
                             "made by another version of the renderer? Delete it and let ensure_corpus make it again.")
        known.update({name: notes for name, notes, _ in sung})
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: f.write(json.dumps(known).encode()))
    return {name: known[name] for name in names}


CASE = r"""
import json, sys, time, warnings
from pathlib import Path
import equinox as eqx, jax, jax.numpy as jnp, numpy as np, optax
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
sys.path.insert(0, sys.argv[3])
from bench_cues import NOTE_CLASSES, note_classes, song_notes
from sepreformer_book import choir
from sepreformer_book.config import PROFILES
from sepreformer_book.conv import Decoder, Encoder, frame_count, padded_length
from sepreformer_book.data import JaCappellaDataset, read_segment
from sepreformer_book.dual_path import DualPathBlock
from sepreformer_book.evaluate import evaluate_model, mean_over_parts, summarise
from sepreformer_book.fit import OptimizerConfig, make_optimizer
from sepreformer_book.losses import batch_composite_loss
from sepreformer_book.model import SepReformer, SplitLayer, model_config_for

name, variant, budget_s = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[4])
profile, config = PROFILES["book"], model_config_for("book")
rate = config.sample_rate
root = choir.ensure_corpus(profile, progress=False)
held_out_root = choir.ensure_held_out_corpus(profile, progress=False)
train_set = JaCappellaDataset(root, sample_rate=rate, split="train")
segment = int(profile.segment_seconds * rate)
kind = variant["kind"]


class WithNoteHead(eqx.Module):
    # the book's model, and a head that names each part's note from its frames after the split layer
    model: SepReformer
    head: eqx.nn.Linear

    def __call__(self, x):
        m, c = self.model, self.model.config
        h = m.encoder(jnp.pad(x, (0, padded_length(x.shape[0], c.kernel_size, c.stride) - x.shape[0])))
        for block in m.sep_blocks:
            h = block(h)
        parts = m.split(h)
        logits = parts @ self.head.weight.T + self.head.bias
        for block in m.rec_blocks:
            parts = jax.vmap(block)(parts)
        return jax.vmap(m.decoder)(parts)[:, : x.shape[0]], logits


class LongFilters(eqx.Module):
    # many long learned filters, a bottleneck to the separator's width and back, masks or direct prediction
    encoder: Encoder
    into: eqx.nn.Linear
    sep_blocks: list
    split: SplitLayer
    rec_blocks: list
    out: eqx.nn.Linear
    decoder: Decoder
    mask: bool = eqx.field(static=True)

    def __init__(self, v, key):
        c, keys = config, jax.random.split(key, 8)
        block = lambda k: DualPathBlock(c.dim, c.num_heads, c.ff_dim, v["chunk"], key=k)
        self.encoder = Encoder(v["filters"], v["kernel"], v["stride"], key=keys[0])
        self.into = eqx.nn.Linear(v["filters"], c.dim, key=keys[1])
        self.sep_blocks = [block(k) for k in keys[2 : 2 + c.num_sep_blocks]]
        self.split = SplitLayer(c.dim, c.num_stems, key=keys[4])
        self.rec_blocks = [block(k) for k in keys[5 : 5 + c.num_rec_blocks]]
        self.out = eqx.nn.Linear(c.dim, v["filters"], key=keys[6])
        self.decoder = Decoder(v["filters"], v["kernel"], v["stride"], key=keys[7])
        self.mask = v["mask"]

    def __call__(self, x):
        k, s = self.encoder.kernel_size, self.encoder.stride
        filtered = self.encoder(jnp.pad(x, (0, padded_length(x.shape[0], k, s) - x.shape[0])))
        h = filtered @ self.into.weight.T + self.into.bias
        for block in self.sep_blocks:
            h = block(h)
        parts = self.split(h)
        for block in self.rec_blocks:
            parts = jax.vmap(block)(parts)
        parts = parts @ self.out.weight.T + self.out.bias
        if self.mask:
            parts = jax.nn.relu(parts) * filtered
        return jax.vmap(self.decoder)(parts)[:, : x.shape[0]]


def fresh(optimizer):
    key = jax.random.key(0)
    if kind == "front":
        model = LongFilters(variant, key)
    else:
        model = SepReformer(config, key=key)
        if kind == "pitch":
            model = WithNoteHead(model, eqx.nn.Linear(config.dim, NOTE_CLASSES, key=jax.random.key(1)))
    return model, optimizer.init(eqx.filter(model, eqx.is_inexact_array))


if kind == "pitch":
    names = [ref.name.split("/")[-1] for ref in train_set.refs]
    notes = song_notes(root, names)
    frames = frame_count(padded_length(segment, config.kernel_size, config.stride), config.kernel_size,
                         config.stride)


def batches():
    rng = np.random.default_rng(0)
    while True:
        items = []
        for _ in range(profile.batch_size):
            ref = train_set.refs[int(rng.integers(len(train_set.refs)))]
            start = int(rng.integers(0, ref.length - segment + 1))
            item = read_segment(train_set, ref, start, segment)
            if kind == "pitch":
                item["notes"] = note_classes(notes[ref.name.split("/")[-1]], train_set.stems, start, frames,
                                             config.kernel_size, config.stride, rate)
            items.append(item)
        yield {key: np.stack([item[key] for item in items]) for key in items[0]}


def loss_fn(model, batch):
    out = jax.vmap(model)(batch["mixture"])
    estimates, logits = out if kind == "pitch" else (out, None)
    loss = batch_composite_loss(estimates, batch["stems"], batch["active"], batch["present"])
    if kind != "pitch":
        return loss, jnp.zeros(())
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["notes"])  # (B, N, L)
    present = jnp.broadcast_to(batch["present"][..., None], ce.shape)
    ce = jnp.sum(jnp.where(present, ce, 0.0)) / jnp.maximum(jnp.sum(present), 1)
    return loss + variant["weight"] * ce, ce


def make_step(optimizer):
    @eqx.filter_jit(donate="all")
    def step(model, state, batch):
        (loss, ce), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, batch)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, ce
    return step


probe = make_optimizer(OptimizerConfig(learning_rate=2e-3))
probe_step, stream = make_step(probe), batches()
model, state = fresh(probe)
model, state, ce = probe_step(model, state, next(stream))
jax.block_until_ready(ce)
tick = time.perf_counter()
for _ in range(20):
    model, state, ce = probe_step(model, state, next(stream))
jax.block_until_ready(ce)
total_steps = max(int(budget_s * 20 / (time.perf_counter() - tick)), 100)
optimizer = make_optimizer(OptimizerConfig(learning_rate=2e-3, warmup_steps=50, decay_steps=total_steps))
train_step, stream = make_step(optimizer), batches()
jax.block_until_ready(train_step(*fresh(optimizer), next(batches()))[2])  # compile outside the clock
model, state = fresh(optimizer)
clock, steps, note_loss = 0.0, 0, []
while clock < budget_s:
    batch = next(stream)
    tick = time.perf_counter()
    model, state, ce = train_step(model, state, batch)
    jax.block_until_ready(ce)
    clock += time.perf_counter() - tick
    steps += 1
    if steps % 100 == 0:
        note_loss.append(float(ce))
separator = model.model if kind == "pitch" else model
scores = {}
for label, test_root in (("randomised test", root), ("held-out voices", held_out_root)):
    test_set = JaCappellaDataset(test_root, sample_rate=rate, split="test")
    scores[label] = mean_over_parts(summarise(evaluate_model(separator, test_set), test_set.stems))
parameters = sum(leaf.size for leaf in jax.tree.leaves(eqx.filter(separator, eqx.is_inexact_array)))
result = {"steps": steps, "seconds": clock, "parameters": int(parameters), "scores": scores}
if kind == "pitch" and note_loss:  # mean note cross-entropy over the first and the last tenth of training
    tenth = max(len(note_loss) // 10, 1)
    result["note_loss"] = [float(np.mean(note_loss[:tenth])), float(np.mean(note_loss[-tenth:]))]
print(json.dumps(result))
"""


def table(results: dict, budget_minutes: float) -> str:
    lines = [f"mean SI-SDRi over parts (dB) after {budget_minutes:g} training minutes per variant",
             f"{'variant':>15} | {'steps':>6} | {'parameters':>10} | {'randomised test':>15} | {'held-out voices':>15}"]
    for name, r in results.items():
        s = r["scores"]
        lines.append(f"{name:>15} | {r['steps']:>6} | {r['parameters']:>10,} | {s['randomised test']:>15.2f} | "
                     f"{s['held-out voices']:>15.2f}")
    return "\n".join(lines)


def main() -> None:
    args, names = variant_arguments(__doc__.splitlines()[0], VARIANTS, DEFAULT_VARIANTS, 6.7)
    results = {}
    for name in names:
        print(f"training {name} for {args.budget_minutes:g} min ...", flush=True)
        results[name] = run_case(CASE, name, VARIANTS[name], 60 * args.budget_minutes)
    print(table(results, args.budget_minutes))
    for name, r in results.items():
        if "note_loss" in r:
            print(f"{name}: note cross-entropy {r['note_loss'][0]:.2f} -> {r['note_loss'][1]:.2f} nats "
                  f"(guessing among {NOTE_CLASSES} classes: {np.log(NOTE_CLASSES):.2f})")
    if args.save:
        from sepreformer_book.config import atomic_write

        payload = {"budget_minutes": args.budget_minutes, "variants": {n: VARIANTS[n] for n in names},
                   "results": results, "cpu_count": os.cpu_count(),
                   "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write(args.save, lambda f: f.write(json.dumps(payload, indent=1).encode()))
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
