"""The separate command: reading any audio, writing parts + residual atomically, and its errors."""
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from beartype import beartype
from jaxtyping import jaxtyped

from sepreformer_book import separate
from sepreformer_book.config import STEM_NAMES, AudioFileError
from sepreformer_book.data import read_wav
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.separate import say, separate_file, song_name

RATE = 8000
SIZES = dict(sample_rate=RATE, stems=STEM_NAMES, window_seconds=0.5, overlap_seconds=0.0625, batch_windows=2)


@pytest.fixture(scope="module")
def ci_model():
    return SepReformer(PRESETS["ci"], key=jax.random.key(0))


@pytest.fixture
def stereo_song(tmp_path):
    """1.3 s of two different 'voices' in a stereo float WAV at 44.1 kHz, an odd number of frames."""
    frames = 57_331
    t = np.arange(frames) / 44_100
    left, right = 0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)
    path = tmp_path / "song.wav"
    sf.write(path, np.stack([left, right], axis=1).astype(np.float32), 44_100, subtype="FLOAT")
    return path


def test_read_wav_downmixes_resamples_and_says_so(stereo_song, capsys):
    audio = jaxtyped(typechecker=beartype)(read_wav)(stereo_song, RATE, say=say)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 57_331 * RATE / 44_100) <= 1
    err = " ".join(capsys.readouterr().err.split())
    assert "2 channels mixed down to mono" in err and "44100 Hz to the model's 8000 Hz" in err
    same_rate = read_wav(stereo_song, 44_100, say=say)
    raw = sf.read(stereo_song, dtype="float32")[0]
    np.testing.assert_allclose(same_rate, raw.mean(axis=1), atol=1e-7)
    assert "resampled" not in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("directory", "is a directory"),
                                           ("empty", "is empty"), ("text", "not a readable"),
                                           ("no samples", "holds no samples"), ("nan", "NaN")])
def test_read_wav_errors_name_the_file_and_the_fix(tmp_path, kind, message):
    path = tmp_path / f"{kind.replace(' ', '-')}.wav"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello, I am not a WAV file\n")
    elif kind == "no samples":
        sf.write(path, np.zeros((0, 2), np.float32), RATE)
    elif kind == "nan":
        sf.write(path, np.array([0.1, np.inf, np.nan], np.float32), RATE, subtype="FLOAT")
    with pytest.raises(AudioFileError, match=message) as error:
        read_wav(path, RATE)
    assert path.name in str(error.value)


def test_song_name():
    assert song_name("/data/jaCappella/jazz/song1/mixture.wav") == "song1"
    assert song_name("take 3.flac") == "take 3"


def test_separate_file_writes_parts_and_residual_that_sum_to_the_mixture(ci_model, stereo_song, tmp_path):
    paths = separate_file(ci_model, stereo_song, tmp_path / "out", **SIZES)
    assert set(paths) == {*STEM_NAMES, "residual"}
    assert all(p.parent == tmp_path / "out" / "song" for p in paths.values())
    mixture = read_wav(stereo_song, RATE)
    written = {}
    for name, path in paths.items():
        audio, rate = sf.read(path, dtype="float32")
        assert rate == RATE and audio.shape == mixture.shape and sf.info(path).subtype == "FLOAT"
        written[name] = audio
    np.testing.assert_allclose(sum(written.values()), mixture, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out" / "song").iterdir()) == sorted(p.name for p in paths.values())


def test_separate_file_rescales_parts_to_the_mixture_unless_asked_not_to(ci_model, stereo_song, tmp_path, capsys):
    calibrated = separate_file(ci_model, stereo_song, tmp_path / "calibrated", **SIZES)
    assert "part gains" in " ".join(capsys.readouterr().err.split())
    raw = separate_file(ci_model, stereo_song, tmp_path / "raw", keep_model_gains=True, **SIZES)
    assert "part gains" not in " ".join(capsys.readouterr().err.split())
    mixture = read_wav(stereo_song, RATE).astype(np.float64)
    residual_energy = lambda paths: float(np.sum(sf.read(paths["residual"], dtype="float64")[0] ** 2))
    assert residual_energy(calibrated) <= residual_energy(raw) + 1e-9
    parts = np.stack([sf.read(calibrated[name], dtype="float64")[0] for name in STEM_NAMES])
    residual = sf.read(calibrated["residual"], dtype="float64")[0]
    np.testing.assert_allclose(parts @ residual, 0.0, atol=1e-3 * np.sum(mixture ** 2))  # least squares: orthogonal


def test_separate_file_resamples_outputs_when_asked(ci_model, stereo_song, tmp_path):
    paths = separate_file(ci_model, stereo_song, tmp_path / "out", output_rate=44_100, **SIZES)
    mixture_44k = read_wav(stereo_song, 44_100, say=say)
    parts = [sf.read(p, dtype="float32") for p in paths.values()]
    assert {rate for _, rate in parts} == {44_100}
    assert all(abs(audio.size - mixture_44k.size) <= 1 for audio, _ in parts)
    total = sum(audio[:mixture_44k.size - 1] for audio, _ in parts)
    assert np.abs(total - mixture_44k[:mixture_44k.size - 1]).max() < 0.02  # resampling is linear, up to its edges


def test_separate_file_does_not_clobber_without_overwrite(ci_model, stereo_song, tmp_path):
    first = separate_file(ci_model, stereo_song, tmp_path, **SIZES)
    stamp = {name: path.stat().st_mtime_ns for name, path in first.items()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        separate_file(ci_model, stereo_song, tmp_path, **SIZES)
    assert {name: path.stat().st_mtime_ns for name, path in first.items()} == stamp
    second = separate_file(ci_model, stereo_song, tmp_path, overwrite=True, **SIZES)
    assert second == first and not list((tmp_path / "song").glob(".*"))  # no temporary files left


def test_separate_file_rejects_a_model_with_the_wrong_number_of_parts(stereo_song, tmp_path):
    two_parts = lambda x: jnp.stack([x, -x])
    with pytest.raises(ValueError, match="2 parts"):
        separate_file(two_parts, stereo_song, tmp_path, **SIZES)


@pytest.fixture
def fake_checkpoint(monkeypatch, ci_model):
    """The separate command's `load_model` replaced by the ci model with the metadata a checkpoint carries."""
    meta = {"model_config": asdict(PRESETS["ci"]), "sample_rate": RATE, "stems": list(STEM_NAMES), "step": 0,
            "profile": "ci"}
    monkeypatch.setattr(separate, "load_model", lambda checkpoint=None: (ci_model, meta))


def test_main_separates_any_file_and_refuses_to_clobber(stereo_song, tmp_path, fake_checkpoint, capsys):
    arguments = [str(stereo_song), "--out", str(tmp_path / "out"), "--no-progress", "--window-seconds", "0.5",
                 "--overlap-seconds", "0.0625"]
    assert separate.main(arguments) == 0
    names = sorted(p.name for p in (tmp_path / "out" / "song").iterdir())
    assert names == sorted(f"{n}.wav" for n in (*STEM_NAMES, "residual"))
    captured = capsys.readouterr()
    assert "mixed down to mono" in captured.err and "wrote 6 files" in captured.out
    assert separate.main(arguments) == 2
    assert "--overwrite" in " ".join(capsys.readouterr().err.split())
    assert separate.main([*arguments, "--overwrite"]) == 0


@pytest.mark.parametrize("content", [b"", b"RIFF....WAVEjunk", "nan"])
def test_main_reports_bad_files(tmp_path, fake_checkpoint, capsys, content):
    path = tmp_path / "bad.wav"
    if content == "nan":
        sf.write(path, np.array([np.nan, 0.0], np.float32), RATE, subtype="FLOAT")
    else:
        path.write_bytes(content)
    assert separate.main([str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error: ") and "bad.wav" in err and "Traceback" not in err


def test_main_reports_a_missing_song(tmp_path, fake_checkpoint, capsys):
    assert separate.main([str(tmp_path / "nope.wav"), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "nope.wav does not exist" in " ".join(capsys.readouterr().err.split())


def test_main_reports_a_missing_checkpoint(stereo_song, tmp_path, capsys):
    status = separate.main([str(stereo_song), "--checkpoint", str(tmp_path / "no-such-run"), "--out", str(tmp_path),
                            "--no-progress"])
    assert status == 2
    assert "no-such-run" in " ".join(capsys.readouterr().err.split())


def test_main_reports_a_checkpoint_that_is_not_one(stereo_song, tmp_path, capsys):
    not_a_checkpoint = tmp_path / "run"
    not_a_checkpoint.mkdir()
    (not_a_checkpoint / "notes.txt").write_text("no checkpoint here")
    assert separate.main([str(stereo_song), "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path),
                          "--no-progress"]) == 2
    assert "run" in " ".join(capsys.readouterr().err.split())
