"""Tests of sepreformer_book.data: the synthetic corpus, the cached loader, its quirks and errors, grain batches."""

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from beartype import beartype
from jaxtyping import jaxtyped

from sepreformer_book import choir, config, data
from sepreformer_book.choir import CORPUS_MARKER, SYNTH_SUBSET, make_corpus
from sepreformer_book.config import STEM_NAMES, TEST_LIST_NAME, VALID_LIST_NAME, CorpusError, Profile
from sepreformer_book.data import JaCappellaDataset, loader, training_iterator

SR = 8000
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Five two-second songs at 48 kHz: one test, one valid, three train."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "chorales", songs=5, seconds=2.0, seed=7, workers=2, progress=False)


@pytest.fixture(scope="module")
def train(corpus, tmp_path_factory) -> JaCappellaDataset:
    return JaCappellaDataset(corpus, sample_rate=SR, split="train", cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------- the synthetic corpus
def test_layout_and_format(corpus):
    songs = sorted((corpus / SYNTH_SUBSET).iterdir())
    assert len(songs) == 5
    manifest = json.loads((corpus / CORPUS_MARKER).read_text())
    for song in songs:
        extra = ["vocal_percussion.wav"] if song.name in manifest["with_vocal_percussion"] else []
        assert sorted(p.name for p in song.iterdir()) == sorted([f"{p}.wav" for p in STEM_NAMES] + ["mixture.wav"] + extra)
        info = sf.info(song / "mixture.wav")
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (48000, 1, "PCM_16", 96000)
    manifest = json.loads((corpus / CORPUS_MARKER).read_text())
    assert manifest["songs"] == 5 and manifest["sample_rate"] == 48000
    assert (corpus / TEST_LIST_NAME).read_text().split() == manifest["split"]["test"]
    assert (corpus / VALID_LIST_NAME).read_text().split() == manifest["split"]["valid"]


def test_mixture_is_exact_sum_of_parts(corpus):
    for song in (corpus / SYNTH_SUBSET).iterdir():
        files = [f for f in song.glob("*.wav") if f.name != "mixture.wav"]
        parts = sum(sf.read(f, dtype="int16")[0].astype(np.int32) for f in files)
        assert np.array_equal(parts, sf.read(song / "mixture.wav", dtype="int16")[0].astype(np.int32))
        assert np.abs(parts).max() > 1000  # not silent


def test_split_is_disjoint_by_song_and_tune_family(corpus):
    manifest = json.loads((corpus / CORPUS_MARKER).read_text())
    split = manifest["split"]
    assert [len(split[k]) for k in ("train", "valid", "test")] == [3, 1, 1]
    names = {k: set(v) for k, v in split.items()}
    assert names["train"] | names["valid"] | names["test"] == set(manifest["families"])
    fams = {k: {manifest["families"][s] for s in v} for k, v in split.items()}
    assert not (fams["train"] & fams["test"]) and not (fams["train"] & fams["valid"]) and not (fams["valid"] & fams["test"])
    sets = {s: {p.name for p in JaCappellaDataset(corpus, SR, split=s).songs} for s in ("train", "valid", "test")}
    assert sets == names


def test_split_by_family_keeps_families_together():
    songs = [{"song": f"s{i}", "family": f"f{i // 3}"} for i in range(12)]
    split = choir.split_by_family(songs)
    family_of = {s["song"]: s["family"] for s in songs}
    fams = {k: {family_of[s] for s in v} for k, v in split.items()}
    assert not (fams["train"] & fams["test"]) and not (fams["train"] & fams["valid"]) and not (fams["valid"] & fams["test"])
    assert sorted(sum(split.values(), [])) == sorted(family_of) and split["test"] and split["valid"]


def test_corpus_is_deterministic(tmp_path, corpus):
    again = make_corpus(tmp_path / "again", songs=5, seconds=2.0, seed=7, workers=2, progress=False)
    first = sorted((corpus / SYNTH_SUBSET).iterdir())[0]
    for part in ("mixture", "lead_vocal", "bass"):
        assert (first / f"{part}.wav").read_bytes() == (again / SYNTH_SUBSET / first.name / f"{part}.wav").read_bytes()
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(2)
    voices = choir.read_chorale(choir.chorale_paths()[0])
    a = choir.render_song(voices, 1.0, SR, rng_a)["alto"]
    b = choir.render_song(voices, 1.0, SR, rng_b)["alto"]
    assert not np.array_equal(a, b)


def test_voice_model_pitch_band_limit_and_distinct_lead():
    render = jaxtyped(typechecker=beartype)(choir.render_voice)
    sr = 16000
    quiet = dict(vibrato_cents=0.0, jitter_cents=0.0, shimmer_db=0.0, drift_cents=0.0, breathiness=0.0,
                 consonants=0.0, scoop=0.0)
    for family in choir.SOURCE_FAMILIES:
        singer = choir.draw_singer("tenor", choir.Choir(sources=(family,)), np.random.default_rng(0))
        note = render([(0.0, 1.0, 57)], dataclasses.replace(singer, **quiet), sr, sr, np.random.default_rng(0),
                      chosen_vowels=["a"])
        spectrum = np.abs(np.fft.rfft(note[4000:12000] * np.hanning(8000)))
        freqs = np.fft.rfftfreq(8000, 1 / sr)
        assert abs(freqs[np.argmax(spectrum * (freqs < 300))] - 220.0) < 4.0, family
        assert spectrum[freqs > 5200].max() < 1e-3 * spectrum.max(), family  # harmonics stop below 5 kHz
    voices = choir.read_chorale(choir.chorale_paths()[0])
    parts = choir.render_song(voices, 3.0, SR, np.random.default_rng(3))
    lead, soprano = parts["lead_vocal"].astype(float), parts["soprano"].astype(float)
    corr = abs(lead @ soprano) / (np.linalg.norm(lead) * np.linalg.norm(soprano) + 1e-9)
    assert corr < 0.5
    beatboxed = dataclasses.replace(choir.TRAINING_CHOIR, vocal_percussion=1.0)
    with_beat = choir.render_song(voices, 2.0, SR, np.random.default_rng(3), beatboxed)
    assert set(with_beat) == set(STEM_NAMES) | {"vocal_percussion"}


def test_source_families_differ_and_are_normalised():
    spectra = {}
    for family in choir.SOURCE_FAMILIES:
        singer = choir.draw_singer("alto", choir.Choir(sources=(family,)), np.random.default_rng(1))
        spectra[family] = np.abs(choir.source_spectrum(singer, 12))
        assert spectra[family][0] == pytest.approx(1.0) and np.all(np.isfinite(spectra[family]))
    assert not np.allclose(spectra["rosenberg"], spectra["lf"], atol=0.05)
    with pytest.raises(ValueError, match="Unknown source family"):
        choir.source_spectrum(dataclasses.replace(singer, source="whistle"), 4)


def test_benchmark_simplify_holds_what_it_names(monkeypatch):
    """benchmarks/legacy_choir.simplify, which the generalisation benchmark's plain variants render with, holds the
    singer factors it is not told to keep, and swaps the source and tract only when asked."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import legacy_choir

    for name in ("draw_singer", "equalise", "time_map", "source_spectrum", "tract_response"):
        monkeypatch.setattr(choir, name, getattr(choir, name))  # restored after the test
    drawn = lambda part, seed: choir.draw_singer(part, choir.TRAINING_CHOIR, np.random.default_rng(seed))
    randomised = [drawn("bass", seed) for seed in range(6)]
    freqs, formants = np.array([100.0, 1000.0, 3900.0]), np.array([730.0, 1150.0, 2600.0, 3400.0, 4100.0])
    cascade = choir.tract_response(freqs, formants, choir.FORMANT_BANDWIDTHS)
    with pytest.raises(ValueError, match="unknown factors"):
        legacy_choir.simplify(choir, keep=("vowels",))
    legacy_choir.simplify(choir, keep=("expressive",))
    plain = [drawn("bass", seed) for seed in range(6)]
    assert {s.source for s in plain} == {"harmonic"} and {s.brightness_db for s in plain} == {0.0}
    assert all(0.92 * 0.95 <= s.tract_scale <= 0.92 * 1.05 for s in plain)
    assert {s.jitter_cents for s in plain} == {0.0} and {s.consonants for s in plain} == {0.0}
    assert [s.vibrato_delay for s in plain] == [s.vibrato_delay for s in randomised]  # kept: drawn as before
    assert np.any(choir.source_spectrum(plain[0], 8).imag != 0)  # random phases, as the randomised choir
    assert np.allclose(choir.tract_response(freqs, formants, choir.FORMANT_BANDWIDTHS), cascade)
    legacy_choir.simplify(choir, pulses=True, parallel_tract=True)
    assert np.all(choir.source_spectrum(drawn("alto", 0), 8).imag == 0)  # sine phase: a pulse
    parallel = choir.tract_response(freqs, formants, choir.FORMANT_BANDWIDTHS)
    assert parallel[-1] / parallel[0] > 4 * cascade[-1] / cascade[0]  # a floor, not the cascade's roll-off


def test_benchmark_reads_what_makes_the_choir_hard_from_the_variants_that_ran(monkeypatch):
    """bench_generalisation's differences are own-test score of one variant minus another's, only where both ran, and
    every variant it names exists."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_generalisation as bench

    assert {name for a, b, _ in bench.HARD_STEPS for name in (a, b)} <= set(bench.VARIANTS)
    scored = lambda own: {"steps": 1, "scores": {"own test": own}}
    hard = bench.what_makes_it_hard({"plain": scored(1.0), "plain-pulse": scored(1.5), "today": scored(4.0)})
    assert hard == {"the first renderer's voice rather than today's (both plain)": 3.0,
                    "a pulse rather than random harmonic phases": 0.5}
    assert all(set(v.get("run", {})) <= {"learning_rate", "warmup_steps", "batch_size", "segment_seconds"}
               for v in bench.VARIANTS.values())


def test_benchmark_names_the_note_each_part_sings_at_each_frame(monkeypatch):
    """bench_cues' note targets: the class of the note sounding at each encoder frame's centre, 0 where a part is
    silent or missing, notes outside the range clipped to its ends."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_cues as bench

    notes = {"soprano": [(0.0, 0.010, 60), (0.010, 0.020, 120.0)], "bass": [(0.012, 1.0, 10)]}
    # frames of 32 samples every 16 at 8 kHz from sample 16: centres at 4, 6, 8, ... ms
    classes = bench.note_classes(notes, ("soprano", "alto", "bass"), 16, 10, 32, 16, 8000)
    centres_ms = 4 + 2 * np.arange(10)
    low, high = bench.LOWEST_NOTE, bench.HIGHEST_NOTE
    assert classes.shape == (3, 10) and classes.dtype == np.int32
    assert list(classes[0]) == [60 - low + 1 if c < 10 else high - low + 1 if c < 20 else 0 for c in centres_ms]
    assert not classes[1].any()  # a part with no notes
    assert list(classes[2]) == [1 if c >= 12 else 0 for c in centres_ms]  # below the range: the lowest class
    assert classes.max() < bench.NOTE_CLASSES
    assert set(bench.DEFAULT_VARIANTS) <= set(bench.VARIANTS)


def test_timbre_ranges_overlap_between_neighbouring_parts():
    order = ("bass", "tenor", "alto", "soprano")
    for low, high in zip(order, order[1:]):
        assert choir.TRACT_RANGES[high][0] < choir.TRACT_RANGES[low][1], (low, high)
    tracts = {part: [choir.draw_singer(part, choir.TRAINING_CHOIR, np.random.default_rng(i)).tract_scale
                     for i in range(50)] for part in order}
    assert max(tracts["bass"]) > min(tracts["tenor"]) and max(tracts["alto"]) > min(tracts["soprano"])


def test_held_out_choir_never_overlaps_training_factors():
    training, held_out = choir.TRAINING_CHOIR, choir.HELD_OUT_CHOIR
    assert not set(training.sources) & set(held_out.sources)
    assert training.vowel_set != held_out.vowel_set
    assert not set(choir.VOWEL_SETS[training.vowel_set]) & set(choir.VOWEL_SETS[held_out.vowel_set])
    assert held_out.rt60[1] > training.rt60[1]


def test_held_out_corpus_sings_the_test_songs(tmp_path, monkeypatch):
    monkeypatch.delenv(config.JACAPPELLA_ENV, raising=False)
    monkeypatch.setenv(choir.DATA_ENV, str(tmp_path))
    tiny = Profile("tiny", sample_rate=SR, segment_seconds=0.25, batch_size=1, corpus_songs=4, corpus_seconds=0.5,
                   overfit_steps=1)
    root = choir.ensure_held_out_corpus(tiny, progress=False)
    assert root == tmp_path / "chorales-tiny-held-out"
    training = json.loads((tmp_path / "chorales-tiny" / CORPUS_MARKER).read_text())
    manifest = json.loads((root / CORPUS_MARKER).read_text())
    assert manifest["split"]["test"] == training["split"]["test"] and not manifest["split"]["train"]
    assert manifest["choir"]["sources"] == list(choir.HELD_OUT_CHOIR.sources)
    stamp = (root / CORPUS_MARKER).stat().st_mtime_ns  # complete: a second call renders nothing
    assert choir.ensure_held_out_corpus(tiny, progress=False) == root
    assert (root / CORPUS_MARKER).stat().st_mtime_ns == stamp
    assert JaCappellaDataset(root, SR, split="test", cache_dir=tmp_path / "c").songs


def test_tune_family_ignores_key():
    notes = [choir.Note(i, i + 1, p) for i, p in enumerate([60, 62, 64, 65, 67, 69, 71, 72])]
    shifted = [choir.Note(n.start, n.end, n.pitch + 5) for n in notes]
    assert choir.tune_family(notes) == choir.tune_family(shifted)


# ---------------------------------------------------------------- atomic writes and the command line
def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "result.json"
    config.atomic_write(target, lambda f: f.write(b"old"))
    assert target.read_bytes() == b"old"

    def half_then_crash(f):
        f.write(b"new but incomplete")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        config.atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    config.atomic_write(str(target), lambda f: f.write(b"new"))  # a str path works too
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_interrupted_build_leaves_nothing_complete(tmp_path, monkeypatch):
    def fail(*_):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(choir, "split_by_family", fail)
    with pytest.raises(RuntimeError):
        make_corpus(tmp_path / "c", songs=1, seconds=0.5, workers=1, progress=False)
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []


def test_killed_build_is_not_mistaken_for_a_corpus(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sepreformer_book.choir", "make-corpus", str(out), "--songs", "4",
                             "--seconds", "6", "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.startswith(".killed.building") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not choir.is_complete_corpus(out)
    with pytest.raises(CorpusError, match="does not exist"):
        JaCappellaDataset(out)


def test_rebuild_replaces_only_what_make_corpus_wrote(tmp_path):
    out = make_corpus(tmp_path / "c", songs=1, seconds=0.5, seed=1, workers=1, progress=False)
    JaCappellaDataset(out, SR, split="all")  # the loader's segment cache in <root>/.cache is ours too
    before = (out / CORPUS_MARKER).read_text()
    make_corpus(out, songs=1, seconds=0.5, seed=2, workers=1, progress=False)
    assert choir.is_complete_corpus(out, seed=2) and (out / CORPUS_MARKER).read_text() != before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    (out / "notes.txt").write_text("the reader's")
    (out / SYNTH_SUBSET / "my_song").mkdir()
    with pytest.raises(CorpusError, match="did not write.*my_song.*notes.txt|did not write.*notes.txt.*my_song"):
        make_corpus(out, songs=1, seconds=0.5, seed=3, workers=1, progress=False)
    assert (out / "notes.txt").read_text() == "the reader's" and choir.is_complete_corpus(out, seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left behind
    (tmp_path / "empty").mkdir()
    assert choir.is_complete_corpus(make_corpus(tmp_path / "empty", songs=1, seconds=0.5, workers=1, progress=False))


def test_make_corpus_refuses_a_folder_of_the_readers(tmp_path):
    """The reproduction of issue 16: an evaluation's hint followed on a folder of one's own data loses nothing."""
    (tmp_path / "v" / "mydata").mkdir(parents=True)
    (tmp_path / "v" / "mydata" / "KEEP.txt").write_text("keep")
    message = _expect(tmp_path / "v", "No songs found")
    assert f"make-corpus {tmp_path / 'v'}" not in message and "NEW_FOLDER" in message
    command = [sys.executable, "-m", "sepreformer_book.choir", "make-corpus", str(tmp_path / "v"), "--songs", "1",
               "--seconds", "0.5", "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(tmp_path / "v") in done.stderr and "mydata" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "v" / "mydata" / "KEEP.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CorpusError, match="is a file"):
        make_corpus(tmp_path / "file", songs=1, seconds=0.5, workers=1, progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_cli_make_corpus(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "sepreformer_book.choir", "make-corpus", str(out), "--songs", "1",
                             "--seconds", "0.5", "--seed", "3", "--sample-rate", "16000", "--workers", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 songs" in result.stdout
    manifest = json.loads((out / CORPUS_MARKER).read_text())
    assert (manifest["seed"], manifest["sample_rate"], manifest["seconds"]) == (3, 16000, 0.5)
    bad = subprocess.run([sys.executable, "-m", "sepreformer_book.choir", "make-corpus", str(out), "--songs", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "songs >= 1" in bad.stderr


def test_corpus_location_and_ensure(tmp_path, monkeypatch):
    monkeypatch.delenv(config.JACAPPELLA_ENV, raising=False)
    monkeypatch.delenv(choir.DATA_ENV, raising=False)
    tiny = Profile("tiny", sample_rate=SR, segment_seconds=0.25, batch_size=1, corpus_songs=1, corpus_seconds=0.5,
                   overfit_steps=1)
    assert choir.default_corpus_root(tiny) == REPO / "data" / "chorales-tiny"  # a source checkout
    monkeypatch.setenv(choir.DATA_ENV, str(tmp_path))
    assert choir.default_corpus_root(tiny) == tmp_path / "chorales-tiny"
    root = choir.ensure_corpus(tiny, progress=False)
    stamp = (root / CORPUS_MARKER).stat().st_mtime_ns
    assert choir.ensure_corpus(tiny, progress=False) == root and (root / CORPUS_MARKER).stat().st_mtime_ns == stamp
    monkeypatch.setenv(config.JACAPPELLA_ENV, str(tmp_path / "real"))
    assert choir.default_corpus_root(tiny) == tmp_path / "real"
    with pytest.raises(FileNotFoundError, match="JACAPPELLA_ROOT"):
        choir.ensure_corpus(tiny)


# ---------------------------------------------------------------- the loader
def test_items_shapes_dtypes_masks(train):
    segment = SR // 2
    batch = loader(train, segment, 2, seed=0)[0]
    assert batch["mixture"].shape == (2, segment) and batch["mixture"].dtype == np.float32
    assert batch["stems"].shape == (2, 5, segment) and batch["stems"].dtype == np.float32
    assert batch["present"].dtype == np.bool_ and batch["present"].shape == (2, 5) and batch["present"].all()
    assert batch["active"].dtype == np.bool_ and batch["active"].shape == (2, 5)
    residual = [bool(train[i].residual_rows) for i in range(len(train))]
    if not any(residual):
        np.testing.assert_allclose(batch["mixture"], batch["stems"].sum(1), atol=1e-6)
    power = (batch["stems"].astype(np.float64) ** 2).mean(-1)
    assert np.array_equal(batch["active"], power > 10 ** (data.SILENCE_DB / 10))
    whole = train.song(0)
    assert whole["stems"].shape == (5, 2 * SR)


def test_segment_matches_cached_song(train):
    ref = train[np.int64(1)]  # grain passes numpy integers
    item = data.extract_segment(ref, np.random.default_rng(0), dataset=train, segment_samples=1000)
    whole = train.song(1)["stems"]
    start = next(s for s in range(whole.shape[1] - 999) if np.array_equal(whole[:, s:s + 1000], item["stems"]))
    assert 0 <= start


def test_grain_is_deterministic_and_epochs_differ(train):
    a = loader(train, 2000, 1, seed=3, num_epochs=2)
    b = loader(train, 2000, 1, seed=3, num_epochs=2)
    c = loader(train, 2000, 1, seed=4, num_epochs=2)
    assert len(a) == 2 * len(train)
    assert all(np.array_equal(a[i]["mixture"], b[i]["mixture"]) for i in range(len(a)))
    assert any(not np.array_equal(a[i]["mixture"], c[i]["mixture"]) for i in range(len(a)))
    assert not all(np.array_equal(a[i]["mixture"], a[i + len(train)]["mixture"]) for i in range(len(train)))


def test_training_iterator_prefetches_batches(train):
    iterator = training_iterator(train, 1000, 2, seed=0, num_threads=2, prefetch_batches=4)
    batches = [next(iterator) for _ in range(5)]  # more than one epoch (3 songs)
    assert all(b["stems"].shape == (2, 5, 1000) for b in batches)
    first = loader(train, 1000, 2, seed=0, num_epochs=None)[0]
    assert np.array_equal(batches[0]["mixture"], first["mixture"])
    moved = data.batch_to_jax(batches[0])
    assert moved["stems"].shape == (2, 5, 1000)


def test_songs_are_opened_one_at_a_time_and_once(train, monkeypatch):
    """grain's reader threads call `audio` concurrently; np.load's header parser is not
    thread-safe (CPython 3.11's ast raised SystemError under that race), so opening is serialised."""
    inside, most, load = [0], [0], np.load

    def slow_load(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.02)  # widen the window in which a second thread could enter
        inside[0] -= 1
        return load(*args, **kwargs)

    monkeypatch.setattr(data.np, "load", slow_load)
    fresh = pickle.loads(pickle.dumps(train))  # no song open yet, as in a new worker
    start = threading.Barrier(8)
    opened = [None] * 8

    def reader(k):
        start.wait()
        opened[k] = fresh.audio(fresh[k % len(fresh)])

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert len(fresh._open) == len(fresh)
    assert all(opened[k] is fresh._open[fresh[k % len(fresh)].cache_file] for k in range(8))
    assert all(np.array_equal(opened[k], train.audio(train[k % len(train)])) for k in range(8))


def test_cache_is_reused_and_invalidated(corpus, tmp_path):
    cache = tmp_path / "cache"
    ds = JaCappellaDataset(corpus, SR, split="test", cache_dir=cache)
    npy = Path(ds.refs[0].cache_file)
    stamp = npy.stat().st_mtime_ns
    JaCappellaDataset(corpus, SR, split="test", cache_dir=cache)
    assert npy.stat().st_mtime_ns == stamp  # manifest hit: not decoded again
    other_rate = JaCappellaDataset(corpus, 16000, split="test", cache_dir=cache)
    assert other_rate.refs[0].length == 2 * 16000 and npy.exists()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest) == 2 and all(e["sources"] for e in manifest.values())


def test_default_cache_dir_for_read_only_corpus(tmp_path, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    assert data.default_cache_dir(root) == root / ".cache"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data.os, "access", lambda *_: False)
    cache = data.default_cache_dir(root)
    assert cache.is_relative_to(tmp_path / "home" / ".cache" / "sepreformer_book") and root.name in cache.name


# ---------------------------------------------------------------- quirks of real corpora
def _song(root: Path, name: str, parts: dict[str, tuple[np.ndarray, int]]) -> Path:
    song = root / "subset" / name
    song.mkdir(parents=True, exist_ok=True)
    for part, (audio, rate) in parts.items():
        sf.write(song / f"{part}.wav", audio, rate, subtype="FLOAT" if audio.dtype == np.float32 else "PCM_16")
    return song


def _tone(seconds: float, rate: int, hz: float = 220.0, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture
def quirky(tmp_path) -> Path:
    root = tmp_path / "quirky"
    full = {p: (_tone(1.0, SR, 110 * (i + 1)), SR) for i, p in enumerate(STEM_NAMES)}
    stereo = np.stack([_tone(1.0, SR), np.zeros(SR, np.float32)], axis=1)
    _song(root, "stereo", {**full, "soprano": (stereo, SR)})
    _song(root, "rate44k", {**full, "alto": (_tone(1.0, 44100), 44100)})
    _song(root, "missing_alto", {p: v for p, v in full.items() if p != "alto"})
    _song(root, "unequal", {**full, "bass": (_tone(0.5, SR), SR)})
    _song(root, "short", {p: (_tone(0.25, SR), SR) for p in STEM_NAMES})
    (root / "README.txt").write_text("stray file")
    (root / ".hidden").mkdir()
    (root / TEST_LIST_NAME).write_text("short\n")
    return root


def _by_name(ds: JaCappellaDataset) -> dict[str, int]:
    return {ref.name.split("/")[-1]: ref.index for ref in ds.refs}


def test_quirks(quirky, tmp_path):
    with pytest.warns(UserWarning, match="subset/unequal"):
        ds = JaCappellaDataset(quirky, SR, split="all", cache_dir=tmp_path / "c")
    idx = _by_name(ds)
    assert set(idx) == {"stereo", "rate44k", "missing_alto", "unequal", "short"}
    stereo = ds.song(idx["stereo"])["stems"][STEM_NAMES.index("soprano")]
    np.testing.assert_allclose(stereo, _tone(1.0, SR) / 2, atol=1e-6)  # mean of the channels, not channel 0
    resampled = ds.song(idx["rate44k"])["stems"][STEM_NAMES.index("alto")]
    assert resampled.shape == (SR,)
    spectrum = np.abs(np.fft.rfft(resampled))
    assert abs(np.argmax(spectrum) * SR / resampled.size - 220.0) < 2.0
    missing = ds.song(idx["missing_alto"])
    a = STEM_NAMES.index("alto")
    assert not missing["present"][a] and not missing["active"][a] and not missing["stems"][a].any()
    assert missing["present"].sum() == 4
    unequal = ds.song(idx["unequal"])
    assert unequal["stems"].shape == (5, SR) and not unequal["stems"][4, SR // 2 + 10:].any()
    short = ds[idx["short"]]
    item = data.extract_segment(short, np.random.default_rng(0), dataset=ds, segment_samples=SR)
    assert item["stems"].shape == (5, SR) and not item["stems"][:, SR // 4:].any() and item["active"].all()
    tail = data.read_segment(ds, short, SR // 2, SR // 4)
    assert not tail["active"].any() and tail["present"].all()
    test = JaCappellaDataset(quirky, SR, split="test", cache_dir=tmp_path / "c")
    assert [s.name for s in test.songs] == ["short"]
    valid = JaCappellaDataset(quirky, SR, split="valid", cache_dir=tmp_path / "c")
    train = JaCappellaDataset(quirky, SR, split="train", cache_dir=tmp_path / "c")
    assert len(valid) == 1 and len(train) == 3  # every fifth non-test song is valid when no valid list exists


def test_a_missing_part_is_named_and_strict_makes_it_an_error(quirky, tmp_path):
    with pytest.warns(UserWarning, match=r"subset/missing_alto has no alto\.wav \(other songs of .* have it\)") as caught:
        ds = JaCappellaDataset(quirky, SR, split="all", cache_dir=tmp_path / "c")
    assert sum("has no" in str(w.message) for w in caught) == 1  # one warning, for the one song
    assert {s.name: parts for s, parts in ds.missing.items()} == {"missing_alto": ["alto"]}
    with pytest.raises(CorpusError, match=r"strict.*missing_alto has no alto\.wav"):
        JaCappellaDataset(quirky, SR, split="all", cache_dir=tmp_path / "c", strict=True)
    only_bass = JaCappellaDataset(quirky, SR, stems=("bass",), split="all", cache_dir=tmp_path / "c", strict=True)
    assert only_bass.missing == {}  # a part not selected is not missing


def _sum_song(root: Path, name: str, mixture_gain: float | None) -> Path:
    parts = {p: (_tone(1.0, SR, 110 * (i + 1), amp=0.1), SR) for i, p in enumerate((*STEM_NAMES, "vocal_percussion"))}
    song = _song(root, name, parts)
    if mixture_gain is not None:
        total = sum(audio for audio, _ in parts.values())
        sf.write(song / "mixture.wav", (mixture_gain * total).astype(np.float32), SR, subtype="FLOAT")
    return song


def test_the_song_mixture_is_the_real_one_and_checked_against_its_parts(tmp_path):
    root = tmp_path / "mixtures"
    _sum_song(root, "consistent", 1.0)
    _sum_song(root, "louder", 1.5)
    _sum_song(root, "no_mixture_file", None)
    with pytest.warns(UserWarning, match=r"subset/louder: mixture.wav differs from the sum") as caught:
        ds = JaCappellaDataset(root, SR, split="all", cache_dir=tmp_path / "c")
    assert sum("mixture.wav differs" in str(w.message) for w in caught) == 1
    by_name = _by_name(ds)
    for name, gain in (("consistent", 1.0), ("louder", 1.5), ("no_mixture_file", 1.0)):
        song = ds.song(by_name[name])
        every_part = sum(_tone(1.0, SR, 110 * (i + 1), amp=0.1) for i in range(len(STEM_NAMES) + 1))
        # vocal percussion is not a selected stem, yet the model hears it: the mixture is the song's, not the stems' sum
        np.testing.assert_allclose(song["mixture"], gain * every_part, atol=1e-5)
        assert not np.allclose(song["mixture"], song["stems"].sum(axis=0), atol=1e-3)
    with pytest.raises(CorpusError, match="louder: mixture.wav differs"):
        JaCappellaDataset(root, SR, split="all", cache_dir=tmp_path / "c", strict=True)


@pytest.mark.filterwarnings("ignore:Song subset/unequal")
@pytest.mark.filterwarnings("ignore:Song subset/missing_alto")
def test_subset_of_stems_and_vocal_percussion(quirky, tmp_path):
    ds = JaCappellaDataset(quirky, SR, stems=("bass", "vocal_percussion"), split="all", cache_dir=tmp_path / "c")
    item = ds.song(0)
    assert item["stems"].shape[0] == 2 and item["present"].tolist() == [True, False]
    segment = data.read_segment(ds, ds[0], 0, ds[0].length)  # training items: every part file, selected or not
    part_rows = sorted(set(ds[0].residual_rows) | {r for r in ds[0].rows if r >= 0})
    np.testing.assert_allclose(segment["mixture"], np.asarray(ds.audio(ds[0]), np.float32)[part_rows].sum(0), atol=1e-6)
    assert ds[0].residual_rows  # the other sung parts are the residual
    every_part = np.asarray(ds.audio(ds[0]), dtype=np.float32).sum(axis=0)  # a whole song: everything sung in it
    np.testing.assert_allclose(item["mixture"], every_part)


def _expect(root: Path, match: str, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        JaCappellaDataset(root, SR, split="all", **kwargs)
    return str(info.value)


def test_bad_inputs(tmp_path):
    message = _expect(tmp_path / "absent", "does not exist")
    assert "make-corpus" in message and "JACAPPELLA_ROOT" in message
    (tmp_path / "empty").mkdir()
    _expect(tmp_path / "empty", "No songs found")
    (tmp_path / "stray" / "subset" / "song").mkdir(parents=True)
    (tmp_path / "stray" / "subset" / "song" / "notes.txt").write_text("x")
    _expect(tmp_path / "stray", "No songs found")
    zero = _song(tmp_path / "zero", "song", {"bass": (_tone(0.1, SR), SR)})
    (zero / "alto.wav").write_bytes(b"")
    assert "alto.wav" in _expect(tmp_path / "zero", "empty \\(0 bytes\\)")
    header_only = _song(tmp_path / "header", "song", {"bass": (_tone(0.1, SR), SR)})
    sf.write(header_only / "soprano.wav", np.zeros(0, np.float32), SR)
    assert "soprano.wav" in _expect(tmp_path / "header", "holds no samples")
    corrupt = _song(tmp_path / "corrupt", "song", {"bass": (_tone(0.1, SR), SR)})
    (corrupt / "tenor.wav").write_text("this is not audio")
    assert "tenor.wav" in _expect(tmp_path / "corrupt", "not a readable WAV")
    bad = _tone(0.1, SR)
    bad[5] = np.nan
    _song(tmp_path / "nan", "song", {"bass": (bad, SR)})
    assert "bass.wav" in _expect(tmp_path / "nan", "NaN or Inf")
    bad[5] = np.inf
    _song(tmp_path / "inf", "song", {"bass": (bad, SR)})
    _expect(tmp_path / "inf", "NaN or Inf")
    _expect(tmp_path / "nan", "Unknown stem name.*baritone.*lead_vocal", stems=("bass", "baritone"))
    with pytest.raises(ValueError, match="split must be"):
        JaCappellaDataset(tmp_path / "nan", SR, split="dev")


def test_each_process_reads_its_share_of_every_global_batch(train):
    """Two processes with one item each read exactly the rows of the two-item batches one process reads."""
    whole = training_iterator(train, 400, 2, seed=5)
    shares = [training_iterator(train, 400, 2, seed=5, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(3):
        batch = next(whole)
        rows = [next(share) for share in shares]
        assert all(r["mixture"].shape == (1, 400) for r in rows)
        np.testing.assert_array_equal(np.concatenate([r["mixture"] for r in rows]), batch["mixture"])
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        training_iterator(train, 400, 3, process_index=0, process_count=2)


# ---------------------------------------------------------------- augmentation
def test_augmentation_is_deterministic_switchable_and_resumable(train):
    augment = data.Augment()
    a = loader(train, 1000, 2, seed=5, augment=augment)[0]
    b = loader(train, 1000, 2, seed=5, augment=augment)[0]
    plain = loader(train, 1000, 2, seed=5)[0]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["stems"], plain["stems"])
    off = data.Augment(gain_db=0.0, polarity=False, drop=0.0, remix=0.0)
    same = loader(train, 1000, 2, seed=5, augment=off)[0]
    np.testing.assert_allclose(same["stems"], plain["stems"], atol=1e-6)  # everything off: the plain item
    iterator = training_iterator(train, 1000, 2, seed=1, augment=augment)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = training_iterator(train, 1000, 2, seed=1, augment=augment, state=state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_each_augmentation_does_what_it_says(train):
    ref, rng = train[0], np.random.default_rng(0)
    base_stems, base_residual = data.read_parts(train, ref, 0, 2000)
    flipped = data.augment_item(train, ref, 0, 2000, data.Augment(gain_db=0.0, polarity=True, drop=0.0, remix=0.0), rng)
    ratio = np.sum(flipped["stems"] * base_stems, axis=1) / np.maximum(np.sum(base_stems ** 2, axis=1), 1e-12)
    assert np.allclose(np.abs(ratio[base_stems.any(axis=1)]), 1.0, atol=1e-4)  # only signs change
    levels = []
    for seed in range(20):
        item = data.augment_item(train, ref, 0, 2000, data.Augment(gain_db=6.0, polarity=False, drop=0.0, remix=0.0),
                                 np.random.default_rng(seed))
        levels.append(np.sum(item["stems"] ** 2, axis=1) / np.maximum(np.sum(base_stems ** 2, axis=1), 1e-12))
        np.testing.assert_allclose(item["mixture"], item["stems"].sum(0) + (item["mixture"] - item["stems"].sum(0)))
    db = 10 * np.log10(np.array(levels)[:, base_stems.any(axis=1)])
    assert db.max() <= 12.0 + 1e-3 and db.max() - db.min() > 3.0  # within +-6 dB of amplitude, and varied
    for seed in range(20):
        item = data.augment_item(train, ref, 0, 2000, data.Augment(gain_db=0.0, polarity=False, drop=0.5, remix=0.0),
                                 np.random.default_rng(seed))
        silent = ~item["stems"].any(axis=1)
        assert not silent.all() and item["present"].all()  # one part always stays; dropped parts stay present
        assert not item["active"][silent].any()
    remixed = data.augment_item(train, ref, 0, 2000, data.Augment(gain_db=0.0, polarity=False, drop=0.0, remix=1.0),
                                np.random.default_rng(3))
    assert remixed["stems"].shape == base_stems.shape and np.abs(remixed["mixture"]).max() <= 1.0 + 1e-6
