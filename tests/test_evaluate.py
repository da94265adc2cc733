"""Whole-song inference (windows, cross-fade, compiles), per-part scores and the evaluate command."""
import csv
from dataclasses import asdict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

from sepreformer_book import evaluate
from sepreformer_book.config import STEM_NAMES, TEST_LIST_NAME, CorpusError
from sepreformer_book.data import JaCappellaDataset
from sepreformer_book.evaluate import (METRICS, evaluate_model, markdown_table, mean_over_parts,
                                       mixture_consistent, oracle_irm, oracle_stft_sizes, score_parts,
                                       summarise, write_scores_csv)
from sepreformer_book.inference import (crossfade_weights, frame_grid, separate_long, window_sizes,
                                        window_starts)
from sepreformer_book.losses import si_sdr
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.fit import separate_batch

RATE = 8000


TRACES: list[tuple[int, ...]] = []


class Local(eqx.Module):
    """A model whose output at each sample depends on that sample alone: stems x and -2x. Records its traces."""

    scale: float = eqx.field(static=True, default=-2.0)  # distinct values: distinct jit cache entries

    def __call__(self, x):
        TRACES.append(x.shape)
        return jnp.stack([x, self.scale * x])


@pytest.fixture(scope="module")
def ci_model():
    return SepReformer(PRESETS["ci"], key=jax.random.key(0))


@pytest.mark.parametrize("window, overlap", [(16, 0), (16, 1), (16, 8), (1000, 250), (7, 3)])
def test_crossfade_weights_are_positive_and_complementary(window, overlap):
    weights = jaxtyped(typechecker=beartype)(crossfade_weights)(window, overlap)
    assert weights.shape == (window,) and np.all(weights > 0) and np.all(weights <= 1)
    if overlap:  # fade-out of one window + fade-in of the next = 1 sample by sample
        np.testing.assert_allclose(weights[window - overlap:] + weights[:overlap], 1.0, atol=1e-12)
    assert np.all(weights[overlap:window - overlap] == 1.0)


def test_crossfade_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap_samples"):
        crossfade_weights(10, 6)
    with pytest.raises(ValueError, match="window_samples"):
        crossfade_weights(0, 0)
    with pytest.raises(TypeError, match="window_samples"):
        crossfade_weights(10.5, 2)


@pytest.mark.parametrize("num_samples", [1, 999, 1000, 1001, 3301, 10_007])
def test_window_starts_cover_the_song_with_the_fewest_windows(num_samples):
    starts = window_starts(num_samples, np.int64(1000), 250)  # numpy ints are accepted
    assert starts[0] == 0 and np.all(np.diff(starts) == 750)
    assert starts[-1] + 1000 >= num_samples
    assert len(starts) == 1 or starts[-2] + 1000 < num_samples


@pytest.mark.parametrize("num_samples", [1, 333, 1000, 1001, 2999, 12_345])
def test_local_model_is_reconstructed_exactly(num_samples):
    song = np.random.default_rng(num_samples).standard_normal(num_samples).astype(np.float32)
    out = separate_long(Local(), song, window_samples=1000, overlap_samples=250, batch_windows=3)
    assert out.shape == (2, num_samples) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], song, atol=1e-6)
    np.testing.assert_allclose(out[1], -2 * song, atol=1e-6)


@pytest.mark.parametrize("value", [0.3, -1.0, 1e-3])
def test_constants_are_reconstructed_bit_exactly(value):
    constant = np.full(4321, value, dtype=np.float32)
    out = separate_long(Local(), constant, window_samples=512, overlap_samples=200, batch_windows=2)
    assert np.all(out[0] == constant)


def test_without_overlap_it_is_plain_concatenation():
    song = np.arange(2500, dtype=np.float32)
    out = separate_long(Local(), jnp.asarray(song), window_samples=1000, overlap_samples=0, batch_windows=1)
    assert np.all(out[0] == song)


def test_one_compile_whatever_the_song_length():
    TRACES.clear()
    model = Local(scale=-3.0)  # a stand-in no other test has compiled
    for num_samples in (500, 4000, 12_001):
        out = separate_long(model, np.ones(num_samples, np.float32), window_samples=1000, overlap_samples=100,
                            batch_windows=4)
        assert out.shape == (2, num_samples)
    assert TRACES == [(1000,)]


def test_separate_long_type_checks_its_arguments():
    with pytest.raises(TypeCheckError):
        separate_long(Local(), np.ones((2, 100), np.float32), window_samples=50, overlap_samples=10)
    with pytest.raises(ValueError, match="NaN"):
        separate_long(Local(), np.array([0.0, np.nan, 1.0], np.float32), window_samples=50, overlap_samples=10)
    with pytest.raises(ValueError, match="batch_windows"):
        separate_long(Local(), np.ones(100, np.float32), window_samples=50, overlap_samples=10, batch_windows=0)


def test_chunked_is_close_to_unchunked_for_the_ci_model(ci_model):
    clip = (0.1 * np.random.default_rng(0).standard_normal(int(1.5 * RATE))).astype(np.float32)
    whole = np.asarray(separate_batch(ci_model, clip[None]))[0]  # jitted, unchunked
    window, overlap = window_sizes(0.5, 0.0625, RATE, frame_grid(ci_model))
    assert (window - overlap) % (PRESETS["ci"].stride * PRESETS["ci"].chunk_size) == 0
    chunked = separate_long(ci_model, clip, window_samples=window, overlap_samples=overlap, batch_windows=2)
    assert chunked.shape == whole.shape
    agreement = np.asarray(si_sdr(jnp.asarray(chunked), jnp.asarray(whole)))
    assert np.all(agreement > 20.0), agreement
    single = separate_long(ci_model, clip, window_samples=clip.size, overlap_samples=0)  # one window: same program
    np.testing.assert_allclose(single, whole, atol=1e-5)


def test_window_sizes_put_the_hop_on_the_grid():
    assert frame_grid(Local()) == 1
    window, overlap = window_sizes(4.0, 0.5, RATE, 512)
    assert (window - overlap) % 512 == 0 and overlap == 4000 and abs(window - 4 * RATE) < 512
    assert window_sizes(0.01, 0.5, RATE, 512) == (1024, 512)  # hop at least one grid, overlap at most the hop
    with pytest.raises(ValueError, match="window_seconds"):
        window_sizes(0.0, 0.1, RATE)


def test_score_parts_skips_unscored_parts_and_gives_mixture_zero_improvement():
    t = np.arange(RATE) / RATE
    targets = np.stack([np.sin(2 * np.pi * 200 * t), np.sin(2 * np.pi * 310 * t), np.zeros_like(t)]).astype(np.float32)
    mixture = targets.sum(0)
    scored = np.array([True, True, False])
    values, improvements = score_parts(np.stack([mixture] * 3), targets, mixture, scored)
    np.testing.assert_allclose(improvements[:2], 0.0, atol=1e-4)
    assert np.isnan(values[2]) and np.isnan(improvements[2])
    values, improvements = score_parts(targets, targets, mixture, scored)
    assert np.all(values[:2] > 60) and np.all(improvements[:2] > 60)


def test_mixture_consistent_gains_undo_level_and_sign_without_changing_si_sdr():
    rng = np.random.default_rng(2)
    targets = rng.standard_normal((4, 3000)).astype(np.float32)
    mixture = targets.sum(0)
    wrong = targets * np.array([[0.05], [-0.2], [3.0], [-1.0]], np.float32)  # too quiet, too loud, upside down
    fixed, gains = mixture_consistent(wrong, mixture)
    np.testing.assert_allclose(gains, [20.0, -5.0, 1 / 3, -1.0], rtol=1e-4)
    np.testing.assert_allclose(fixed, targets, atol=1e-4)
    noisy = wrong + 0.1 * rng.standard_normal(wrong.shape).astype(np.float32)
    fixed, _ = mixture_consistent(noisy, mixture)
    scored = np.ones(4, bool)
    np.testing.assert_allclose(score_parts(fixed, targets, mixture, scored)[0],
                               score_parts(noisy, targets, mixture, scored)[0], atol=1e-3)
    residual = (mixture - fixed.sum(0)).astype(np.float64)
    np.testing.assert_allclose(fixed.astype(np.float64) @ residual, 0.0, atol=1e-2 * np.sum(mixture ** 2))
    silent, gains = mixture_consistent(np.zeros_like(targets), mixture)  # no estimate at all: zero gains, no NaN
    assert np.all(silent == 0) and np.all(np.isfinite(gains))


def test_oracle_masks_sum_to_the_mixture_and_beat_it():
    rng = np.random.default_rng(1)
    targets = rng.standard_normal((3, 4001)).astype(np.float32) * np.array([[1.0], [0.5], [0.0]], np.float32)
    mixture = targets.sum(0)
    fft_size, hop = oracle_stft_sizes(RATE)
    assert (fft_size, hop) == (512, 128)
    oracle = oracle_irm(targets, mixture, fft_size=fft_size, hop=hop)
    assert oracle.shape == targets.shape
    np.testing.assert_allclose(oracle.sum(0), mixture, atol=1e-4)
    scored = np.array([True, True, False])
    oracle_sdr = score_parts(oracle, targets, mixture, scored)[0]
    mixture_sdr = score_parts(np.stack([mixture] * 3), targets, mixture, scored)[0]
    assert np.all(oracle_sdr[:2] > mixture_sdr[:2])


def make_corpus(root, songs: dict[str, dict[str, np.ndarray]], test: list[str]):
    """A jaCappella-layout corpus at RATE: {song: {part: audio}}; `test` lists the test songs."""
    for song, parts in songs.items():
        folder = root / "subset" / song
        folder.mkdir(parents=True)
        for part, audio in parts.items():
            sf.write(folder / f"{part}.wav", audio, RATE, subtype="FLOAT")
    (root / TEST_LIST_NAME).write_text("".join(f"{s}\n" for s in test))
    return root


@pytest.fixture
def tiny_corpus(tmp_path):
    rng = np.random.default_rng(0)
    tone = lambda f: (0.1 * np.sin(2 * np.pi * f * np.arange(RATE + 77) / RATE)).astype(np.float32)
    full = {p: tone(150 + 60 * i) for i, p in enumerate(STEM_NAMES)}
    silent_alto = dict(full, alto=np.zeros(RATE + 77, np.float32))
    no_tenor = {p: a for p, a in full.items() if p != "tenor"}
    train = {p: rng.standard_normal(RATE).astype(np.float32) * 0.05 for p in STEM_NAMES}
    return make_corpus(tmp_path / "corpus", {"full": full, "silent_alto": silent_alto, "no_tenor": no_tenor,
                                             "train_song": train}, test=["full", "silent_alto", "no_tenor"])


def five_stem_model():
    return SepReformer(PRESETS["ci"], key=jax.random.key(1))


def test_evaluate_model_skips_absent_and_silent_parts(tiny_corpus):
    dataset = JaCappellaDataset(tiny_corpus, sample_rate=RATE, split="test")
    rows = evaluate_model(five_stem_model(), dataset, window_seconds=0.5, overlap_seconds=0.05)
    scored = {(row["song"].split("/")[1], row["part"]) for row in rows}
    assert ("silent_alto", "alto") not in scored and ("no_tenor", "tenor") not in scored
    assert len(rows) == 3 * len(STEM_NAMES) - 2
    assert all(np.isfinite(row[m]) for row in rows for m in METRICS)
    summary = summarise(rows, STEM_NAMES)
    assert [entry["part"] for entry in summary] == [*STEM_NAMES, "all"]
    assert {entry["part"]: entry["songs"] for entry in summary}["alto"] == 2
    np.testing.assert_allclose(summary[-1]["model_si_sdri_mean"], np.mean([r["model_si_sdri"] for r in rows]))
    assert np.isfinite(mean_over_parts(summary))
    only_first = evaluate_model(five_stem_model(), dataset, window_seconds=0.5, overlap_seconds=0.05, max_songs=1)
    assert {row["song"] for row in only_first} == {dataset[0].name}


def test_a_part_silent_everywhere_is_not_scored_and_not_averaged():
    rows = [{"song": "a", "part": "soprano", **{m: 1.0 for m in METRICS}}]
    summary = summarise(rows, ("soprano", "alto"))
    assert summary[1]["songs"] == 0 and "not scored" in markdown_table(summary)
    assert mean_over_parts(summary) == 1.0


def test_csv_and_markdown_are_written_atomically_and_parse(tmp_path):
    rows = [{"song": "s/a", "part": p, **{m: float(i) for m in METRICS}} for i, p in enumerate(STEM_NAMES)]
    path = write_scores_csv(rows, tmp_path / "scores.csv")
    with open(path, newline="") as f:
        parsed = list(csv.DictReader(f))
    assert [r["part"] for r in parsed] == list(STEM_NAMES)
    assert all(float(parsed[i][m]) == float(i) for i in range(len(rows)) for m in METRICS)
    table = markdown_table(summarise(rows, STEM_NAMES)).splitlines()
    body = [line for line in table if line.startswith("|")]
    assert len(body) == 2 + len(STEM_NAMES) + 1
    assert {len(line.strip("|").split("|")) for line in body} == {7}
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]  # no temporary file left behind


@pytest.fixture
def fake_checkpoint(monkeypatch):
    """The evaluate command's `load_model` replaced by a fresh ci model with the metadata a checkpoint carries."""

    meta = {"model_config": asdict(PRESETS["ci"]), "sample_rate": RATE, "stems": list(STEM_NAMES), "step": 0,
            "profile": "ci"}
    monkeypatch.setattr(evaluate, "load_model", lambda checkpoint=None: (five_stem_model(), meta))
    return meta


def test_main_writes_csv_and_markdown(tiny_corpus, tmp_path, fake_checkpoint, capsys):
    out = tmp_path / "out"
    status = evaluate.main(["--data", str(tiny_corpus), "--out", str(out), "--no-progress",
                            "--window-seconds", "0.5", "--overlap-seconds", "0.05"])
    assert status == 0
    with open(out / "scores_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * len(STEM_NAMES) - 2 and set(rows[0]) == {"song", "part", *METRICS}
    markdown = (out / "summary_test.md").read_text()
    assert markdown.startswith("# SI-SDR on the test split") and "| all |" in markdown
    assert sorted(p.name for p in out.iterdir()) == ["scores_test.csv", "summary_test.md"]
    assert "mean SI-SDRi over parts" in capsys.readouterr().out


def test_main_reports_an_empty_split(tmp_path, fake_checkpoint, capsys):
    tone = np.full(RATE, 0.1, np.float32)
    root = make_corpus(tmp_path / "corpus", {"only": {"soprano": tone}}, test=[])
    assert evaluate.main(["--data", str(root), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'test' split" in err and "empty" in err


def test_main_reports_a_missing_corpus(tmp_path, fake_checkpoint, capsys):
    assert evaluate.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "does not exist" in err and "make-corpus" in err


def test_main_reports_a_missing_checkpoint(tiny_corpus, tmp_path, capsys):
    status = evaluate.main(["--checkpoint", str(tmp_path / "no-such-run"), "--data", str(tiny_corpus),
                            "--out", str(tmp_path / "out"), "--no-progress"])
    assert status == 2
    assert "no-such-run" in " ".join(capsys.readouterr().err.split())


def test_dataset_errors_are_corpus_errors(tmp_path):
    with pytest.raises(CorpusError):
        JaCappellaDataset(tmp_path / "nowhere", sample_rate=RATE, split="test")


def test_a_missing_part_is_counted_and_strict_refuses_it(tiny_corpus, tmp_path, fake_checkpoint, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"subset/no_tenor has no tenor\.wav"):
        status = evaluate.main(["--data", str(tiny_corpus), "--out", str(out), "--no-progress",
                                "--window-seconds", "0.5", "--overlap-seconds", "0.05"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Songs without the part's file" in printed and "tenor in 1" in printed
    assert "tenor in 1" in (out / "summary_test.md").read_text()
    status = evaluate.main(["--data", str(tiny_corpus), "--out", str(tmp_path / "strict"), "--no-progress", "--strict"])
    assert status == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no_tenor has no tenor.wav" in err and not (tmp_path / "strict").exists()


class Echo(eqx.Module):
    """Returns what it hears as every one of the five parts: its SI-SDR is the mixture's."""

    def __call__(self, x):
        return jnp.stack([x] * len(STEM_NAMES))


def test_evaluation_hears_and_scores_the_songs_real_mixture(tmp_path):
    tone = lambda f: (0.1 * np.sin(2 * np.pi * f * np.arange(RATE) / RATE)).astype(np.float32)
    parts = {p: tone(150 + 60 * i) for i, p in enumerate(STEM_NAMES)}
    percussion = np.random.default_rng(0).standard_normal(RATE).astype(np.float32) * 0.1
    song = dict(parts, vocal_percussion=percussion, mixture=sum(parts.values()) + percussion)
    root = make_corpus(tmp_path / "corpus", {"with_percussion": song}, test=["with_percussion"])
    dataset = JaCappellaDataset(root, sample_rate=RATE, split="test")
    rows = evaluate_model(Echo(), dataset, window_seconds=0.5, overlap_seconds=0.05)
    heard = song["mixture"]
    for row in rows:
        target = parts[row["part"]]
        expected = float(si_sdr(jnp.asarray(heard), jnp.asarray(target)))
        assert row["mixture_si_sdr"] == pytest.approx(expected, abs=1e-3)  # the song's mixture, percussion and all
        assert row["model_si_sdr"] == pytest.approx(expected, abs=1e-3)
        without = float(si_sdr(jnp.asarray(sum(parts.values())), jnp.asarray(target)))
        assert row["mixture_si_sdr"] < without - 0.5  # not the easier percussion-free sum of the scored parts
        assert row["oracle_si_sdr"] < 40  # the oracle's masks share the percussion out; they are not handed it
    louder = dict(song, mixture=2 * song["mixture"])
    root = make_corpus(tmp_path / "louder", {"louder": louder}, test=["louder"])
    with pytest.warns(UserWarning, match=r"subset/louder: mixture\.wav differs from the sum of its part files by -?\d"):
        JaCappellaDataset(root, sample_rate=RATE, split="test")


def test_bss_eval_separates_interference_from_artefacts():
    from sepreformer_book.evaluate import bss_eval

    rng = np.random.default_rng(0)
    sources = rng.standard_normal((3, 8000)).astype(np.float32)
    leaky = sources[0] + 0.1 * sources[1]  # interference only: SIR 20 dB, no artefacts
    noisy = sources[1] + 0.1 * rng.standard_normal(8000).astype(np.float32)  # artefacts only: SAR 20 dB
    scores = bss_eval(np.stack([leaky, noisy, sources[2]]), sources, taps=8)
    assert scores.shape == (3, 3)
    assert abs(scores[0, 0] - 20) < 0.3 and abs(scores[0, 1] - 20) < 0.3 and scores[0, 2] > 40
    assert abs(scores[1, 2] - 20) < 0.5 and scores[1, 1] > 30
    assert scores[2].min() > 80  # a perfect estimate
    filtered = np.convolve(sources[0], [1.0, 0.5], mode="full")[:8000]  # a short filter is forgiven by SDR
    assert bss_eval(np.stack([filtered, sources[1], sources[2]]), sources, taps=8)[0, 0] > 40
