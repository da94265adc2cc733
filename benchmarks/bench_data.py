"""Segment loading: cached memory-mapped reads against the seed's decode-and-resample-the-whole-song per item.

Also measures how long a training loop waits for the prefetching iterator when each step takes `--step-seconds`.
Run: python benchmarks/bench_data.py [--profile book] [--items-seed 20] [--step-seconds 0.4]
"""

import argparse
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf

from sepreformer_book.config import active_profile
from sepreformer_book.choir import ensure_corpus, make_corpus
from sepreformer_book.config import STEM_NAMES
from sepreformer_book.data import JaCappellaDataset, extract_segment, training_iterator


def seed_item(song_dir, sample_rate: int, segment_samples: int, rng: np.random.Generator):
    """The seed tutorial's way: read every part of the song, resample it, stack, then cut one segment."""
    stems = []
    for name in STEM_NAMES:
        audio, rate = sf.read(song_dir / f"{name}.wav", dtype="float32", always_2d=True)
        audio = audio[:, 0]
        if rate != sample_rate:
            audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate)
        stems.append(audio)
    stems = np.stack(stems)
    start = rng.integers(0, stems.shape[1] - segment_samples)
    return stems.sum(0)[start:start + segment_samples], stems[:, start:start + segment_samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=None, help="ci | book | full (default: $SEPREFORMER_PROFILE or book)")
    parser.add_argument("--items-seed", type=int, default=20, help="items to load the seed's way (seconds each)")
    parser.add_argument("--items-cached", type=int, default=5000)
    parser.add_argument("--step-seconds", type=float, default=0.4, help="simulated training step")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--long-song-seconds", type=float, default=60.0,
                        help="also compare on a few songs this long (jaCappella's songs last about a minute); 0 skips")
    args = parser.parse_args()

    profile = active_profile(args.profile)
    root = ensure_corpus(profile)
    for sample_rate, seconds, label in ((profile.sample_rate, profile.segment_seconds, f"profile {profile.name}"),
                                        (44100, 2.0, "the seed's sizes")):
        dataset = JaCappellaDataset(root, sample_rate=sample_rate, split="train")
        compare(dataset, int(seconds * sample_rate), args, label)
    if args.long_song_seconds > 0:
        with tempfile.TemporaryDirectory() as scratch:
            long_root = make_corpus(Path(scratch) / "long", songs=8, seconds=args.long_song_seconds, seed=1,
                                    progress=False)
            dataset = JaCappellaDataset(long_root, sample_rate=profile.sample_rate, split="all",
                                        cache_dir=Path(scratch) / "cache")
            compare(dataset, int(profile.segment_seconds * profile.sample_rate), args,
                    f"jaCappella-length songs, profile {profile.name}")
    dataset = JaCappellaDataset(root, sample_rate=profile.sample_rate, split="train")
    measure_wait(dataset, int(profile.segment_seconds * profile.sample_rate), profile.batch_size, args)


def compare(dataset: JaCappellaDataset, segment: int, args, label: str) -> None:
    song_seconds = dataset.refs[0].length / dataset.sample_rate
    rng = np.random.default_rng(0)
    print(f"\n{label}: {len(dataset)} training songs of {song_seconds:g} s (48 kHz files), "
          f"segments of {segment} samples at {dataset.sample_rate} Hz")

    seed_item(dataset.songs[0], dataset.sample_rate, segment, rng)  # warm-up: imports and resampler set-up
    started = time.perf_counter()
    for i in range(args.items_seed):
        seed_item(dataset.songs[i % len(dataset)], dataset.sample_rate, segment, rng)
    seed_per_item = (time.perf_counter() - started) / args.items_seed

    for i in range(len(dataset)):  # open every memmap once, as a long training run would have
        extract_segment(dataset[i], rng, dataset=dataset, segment_samples=segment)
    started = time.perf_counter()
    for i in range(args.items_cached):
        extract_segment(dataset[i % len(dataset)], rng, dataset=dataset, segment_samples=segment)
    cached_per_item = (time.perf_counter() - started) / args.items_cached

    print(f"{'method':44s} {'ms/item':>10s} {'items/s':>10s}")
    print(f"{'seed: decode + resample whole song per item':44s} {seed_per_item * 1e3:10.2f} {1 / seed_per_item:10.1f}")
    print(f"{'cached .npy, memmap segment read':44s} {cached_per_item * 1e3:10.3f} {1 / cached_per_item:10.0f}")
    print(f"{'ratio (cached / seed items per second)':44s} {seed_per_item / cached_per_item:10.0f}x")


def measure_wait(dataset: JaCappellaDataset, segment: int, batch_size: int, args) -> None:
    iterator = training_iterator(dataset, segment, batch_size, seed=0)
    next(iterator)  # start-up: threads and first batch
    waits = []
    for _ in range(args.steps):
        started = time.perf_counter()
        batch = next(iterator)
        waits.append(time.perf_counter() - started)
        time.sleep(args.step_seconds)  # the training step (sleep releases the GIL like XLA does)
    waits = np.array(waits) * 1e3
    print()
    print(f"training loop, {args.steps} steps of {args.step_seconds:g} s, batch {batch['mixture'].shape}:")
    print(f"  wait for next batch: mean {waits.mean():.3f} ms, max {waits.max():.3f} ms "
          f"({waits.sum() / (args.steps * args.step_seconds * 1e3) * 100:.3f} % of step time)")


if __name__ == "__main__":
    main()
