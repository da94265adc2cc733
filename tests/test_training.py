"""Tests of sepreformer_book.training: corpus batches, validation, checkpoints, resume, data parallelism, CLI."""
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
from beartype import beartype
from jaxtyping import jaxtyped

from sepreformer_book.checkpoints import (DEFAULT_CHECKPOINT, CheckpointError, complete_steps, load_model, read_meta,
                                          restore_checkpoint, save_checkpoint)
from sepreformer_book.choir import ensure_corpus
from sepreformer_book.config import STEM_NAMES, VALID_LIST_NAME, active_profile
from sepreformer_book.data import JaCappellaDataset, training_iterator
from sepreformer_book.model import PRESETS, SepReformer
from sepreformer_book.training import (_read_jsonl, main, parallel_check, publish_run, run_config_for, train_on_corpus,
                                       validate, validation_batches, validation_scores)

# One run configuration for every in-process training test: one compile of the step serves them all.
RUN = run_config_for("ci", steps=8, checkpoint_every=4, valid_every=4, audio_every=100)


@pytest.fixture(scope="module")
def root() -> Path:
    return ensure_corpus(active_profile("ci"), progress=False)


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory):
    return train_on_corpus(RUN, root, tmp_path_factory.mktemp("whole"), progress=False, tensorboard=False)


def leaves(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def test_run_config_overrides_and_unknown_fields():
    run = run_config_for("ci", steps=5, seed=None)
    assert run.steps == 5 and run.seed == 0 and run.batch_size == active_profile("ci").batch_size
    assert run.optimizer_config().decay_steps == 5 and run.optimizer_config().warmup_steps <= 2
    with pytest.raises(TypeError, match="stepz"):
        run_config_for("ci", stepz=5)


def test_iterator_state_replays_the_stream(root):
    dataset = JaCappellaDataset(root, sample_rate=8000, split="train")
    stream = training_iterator(dataset, 800, 2, seed=3)
    next(stream)
    state = stream.get_state()
    expected = [next(stream)["mixture"] for _ in range(3)]
    replay = training_iterator(dataset, 800, 2, seed=3, state=state)
    assert all(np.array_equal(next(replay)["mixture"], e) for e in expected)


def test_validation_batches_have_one_shape_and_weights(root):
    dataset = JaCappellaDataset(root, sample_rate=8000, split="valid")
    batches = validation_batches(dataset, 1000, 3, max_segments=7)
    assert {b["mixture"].shape for b in batches} == {(3, 1000)}
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == 7 and set(weights.tolist()) == {0.0, 1.0}


def test_validate_scores_the_mixture_at_zero_improvement(root):
    class Copycat(eqx.Module):
        def __call__(self, x):
            return jnp.broadcast_to(x, (len(STEM_NAMES), x.shape[0]))

    dataset = JaCappellaDataset(root, sample_rate=8000, split="valid")
    scores = validate(Copycat(), validation_batches(dataset, 2000, 2, 4))
    assert abs(scores["mean_si_sdri"]) < 1e-4
    assert np.isfinite(scores["mean_si_sdr"]) and set(scores) >= {f"si_sdri/{n}" for n in STEM_NAMES}


def test_validation_scores_shapes_are_checked():
    model = SepReformer(PRESETS["ci"], key=jax.random.key(0))
    checked = jaxtyped(typechecker=beartype)(validation_scores.__wrapped__)
    estimate, mixture = checked(model, jnp.zeros((2, 300)), jnp.zeros((2, 5, 300)))
    assert estimate.shape == mixture.shape == (2, 5)
    with pytest.raises(Exception):
        checked(model, jnp.zeros((2, 300)), jnp.zeros((3, 5, 300)))


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = SepReformer(PRESETS["ci"], key=jax.random.key(1))
    save_checkpoint(tmp_path / "ck", 3, model, {"model_config": asdict(model.config)})
    loaded, meta = load_model(tmp_path / "ck")
    assert meta["step"] == 3 and all(np.array_equal(a, b) for a, b in zip(leaves(model), leaves(loaded)))
    other = SepReformer(replace(PRESETS["ci"], dim=32), key=jax.random.key(1))
    with pytest.raises(CheckpointError, match="another model.*dim"):
        restore_checkpoint(tmp_path / "ck", other)
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_model(tmp_path / "empty")


def test_corrupt_checkpoint_metadata_is_a_clear_error(tmp_path):
    model = SepReformer(PRESETS["ci"], key=jax.random.key(1))
    step_dir = save_checkpoint(tmp_path / "ck", 1, model, {"model_config": asdict(model.config)})
    for path in (step_dir / "meta").rglob("*"):
        if path.is_file():
            path.write_text("{not json")
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        read_meta(tmp_path / "ck")


def test_resume_after_a_stop_is_bit_for_bit(root, tmp_path, uninterrupted):
    first = train_on_corpus(RUN, root, tmp_path, stop_after=4, progress=False, tensorboard=False)
    assert first.history.step == [0, 1, 2, 3]
    with pytest.raises(CheckpointError, match="--resume"):
        train_on_corpus(RUN, root, tmp_path, progress=False, tensorboard=False)
    with pytest.raises(CheckpointError, match="run settings differ"):
        train_on_corpus(replace(RUN, learning_rate=0.5), root, tmp_path, resume=True, progress=False, tensorboard=False)
    resumed = train_on_corpus(RUN, root, tmp_path, resume=True, progress=False, tensorboard=False)
    assert resumed.history.step == [4, 5, 6, 7]
    assert all(np.array_equal(a, b) for a, b in zip(leaves(uninterrupted.model), leaves(resumed.model)))
    logged = lambda out: [(r["step"], r["loss"]) for r in _read_jsonl(out / "metrics.jsonl")]
    assert logged(tmp_path) == logged(uninterrupted.out)
    assert [r["step"] for r in _read_jsonl(tmp_path / "validation.jsonl")] == [4, 8]
    best_model, meta = load_model(tmp_path)  # the run directory -> its best checkpoint
    assert meta["step"] == resumed.best["step"] and meta["stems"] == list(STEM_NAMES)


def test_resume_after_sigkill_matches_the_uninterrupted_run(root, tmp_path):
    steps, every = 40, 5
    run = run_config_for("ci", steps=steps, checkpoint_every=every, valid_every=1000, audio_every=1000)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "sepreformer_book.training", "--profile", "ci", "--data", str(root),
               "--out", str(out), "--steps", str(steps), "--checkpoint-every", str(every),
               "--valid-every", "1000", "--audio-every", "1000", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / "checkpoints" / "last"
    deadline = time.time() + 300
    while not (last.is_dir() and any(p.name.isdigit() for p in last.iterdir())):
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = read_meta(last)["step"]
    assert killed_at < steps, "the run finished before it could be killed"
    resumed = train_on_corpus(run, root, out, resume=True, progress=False, tensorboard=True)
    assert resumed.history.step[0] == killed_at
    whole = train_on_corpus(run, root, tmp_path / "whole", progress=False, tensorboard=False)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(whole.model), leaves(resumed.model)))
    assert [r["loss"] for r in _read_jsonl(out / "metrics.jsonl")] == [r["loss"] for r in _read_jsonl(tmp_path / "whole" / "metrics.jsonl")]


def test_two_forced_devices_give_the_one_device_loss():
    check = parallel_check()
    assert check["device_count"] == 2 and check["parameter_devices_2"] == 2
    assert abs(check["loss_1"] - check["loss_2"]) <= 1e-5 * abs(check["loss_1"])
    assert check["max_parameter_difference"] < 1e-5


def test_command_line_run_writes_its_files(root, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["--profile", "ci", "--data", str(root), "--out", str(out), "--steps", "8", "--checkpoint-every", "4",
                 "--valid-every", "4", "--audio-every", "100", "--no-progress"])
    assert code == 0
    assert "best validation mean SI-SDRi" in capsys.readouterr().out
    assert (out / "metrics.jsonl").is_file() and (out / "tb").is_dir()
    assert [r["step"] for r in _read_jsonl(out / "validation.jsonl")] == [4, 8]
    assert main(["--profile", "ci", "--data", str(root), "--out", str(out), "--steps", "8", "--no-progress"]) == 2
    assert "--resume" in " ".join(capsys.readouterr().err.split())


def test_training_module_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "sepreformer_book.training", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--resume" in done.stdout and "--strict" in done.stdout


def test_publish_run_copies_the_best_model_with_a_readme(uninterrupted, tmp_path):
    dest = publish_run(uninterrupted.out, tmp_path / "shipped", command="python -m sepreformer_book.training --x")
    model, meta = load_model(dest)
    best, _ = load_model(uninterrupted.out)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(model), leaves(best)))
    readme = (dest / "README.md").read_text()
    assert "python -m sepreformer_book.training --x" in readme and f"step {meta['step']}" in readme
    assert not any(p.name.startswith("opt_state") for p in dest.rglob("*"))
    shipped_log, run_log = _read_jsonl(dest / "metrics.jsonl"), _read_jsonl(uninterrupted.out / "metrics.jsonl")
    assert [r["step"] for r in shipped_log] == [r["step"] for r in run_log]  # every step, rounded
    for shipped, original in zip(shipped_log, run_log):
        values = list(zip(shipped["si_sdr"] + [shipped["loss"]], original["si_sdr"] + [original["loss"]]))
        assert all((a is None) == (b is None) for a, b in values)  # inactive parts stay null
        np.testing.assert_allclose(*zip(*[(a, b) for a, b in values if a is not None]), rtol=1e-4)
    publish_run(uninterrupted.out, dest, command="again")  # replacing an existing copy
    assert "again" in (dest / "README.md").read_text() and not dest.with_name("shipped.staging").exists()


def test_the_shipped_model_loads_as_the_book_preset():
    model, meta = load_model()
    assert model.config == PRESETS["book"] and meta["profile"] == "book"
    assert (DEFAULT_CHECKPOINT / "README.md").is_file()
    estimates = model(jnp.zeros(1000))
    assert estimates.shape == (5, 1000)


def test_resume_when_killed_between_the_best_and_the_last_save(root, tmp_path, uninterrupted):
    import shutil

    train_on_corpus(RUN, root, tmp_path, stop_after=4, progress=False, tensorboard=False)
    shutil.rmtree(tmp_path / "checkpoints" / "last" / "4")  # best/4 was written, last/4 was not
    resumed = train_on_corpus(RUN, root, tmp_path, resume=True, progress=False, tensorboard=False)
    assert resumed.history.step[0] == 0 and read_meta(tmp_path / "checkpoints" / "best")["step"] == resumed.best["step"]
    assert all(np.array_equal(a, b) for a, b in zip(leaves(uninterrupted.model), leaves(resumed.model)))


# ---------------------------------------------------------------- interrupted checkpoint writes (issue 16)
def test_an_interrupted_first_checkpoint_write_starts_afresh(root, tmp_path, uninterrupted, capsys):
    """The reproduction: only Orbax's temporary folder in checkpoints/last, with and without --resume."""
    for resume in (False, True):
        out = tmp_path / f"resume_{resume}"
        (out / "checkpoints" / "last" / "4.orbax-checkpoint-tmp").mkdir(parents=True)
        result = train_on_corpus(RUN, root, out, resume=resume, progress=False, tensorboard=False)
        assert "no complete checkpoint" in capsys.readouterr().out and result.history.step[0] == 0
        assert all(np.array_equal(a, b) for a, b in zip(leaves(uninterrupted.model), leaves(result.model)))
        assert [p.name for p in (out / "checkpoints" / "last").iterdir()] == ["8"]  # the leftover is cleaned up


KILL_DURING_WRITE = r"""
import os, sys
from orbax.checkpoint._src.path import atomicity
from sepreformer_book.training import main

kill_at, calls = int(sys.argv[1]), []
commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *args, **kwargs):  # every file of the step is written; only the rename is left
    calls.append(str(self._final_path))
    if len(calls) == kill_at:
        print(self._final_path.parent.name, flush=True)  # which checkpoint (best or last) was cut short
        os._exit(137)  # like SIGKILL: no cleanup, no flush
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill_at", [1, 2, 4])
def test_a_run_killed_during_a_checkpoint_write_resumes_or_restarts(root, tmp_path, uninterrupted, capsys, kill_at):
    """Killed in the middle of checkpoint write number `kill_at` (1: best/4, the very first; 2: last/4; 4: a write of
    step 8): the next invocation, with or without --resume as needed, ends with the uninterrupted run's model."""
    out = tmp_path / "run"
    arguments = ["--profile", "ci", "--data", str(root), "--out", str(out), "--steps", str(RUN.steps),
                 "--checkpoint-every", str(RUN.checkpoint_every), "--valid-every", str(RUN.valid_every),
                 "--audio-every", str(RUN.audio_every), "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(kill_at), *arguments],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert any("orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").rglob("*")), "no write was cut short"
    resumable = bool(complete_steps(out / "checkpoints" / "last"))
    result = train_on_corpus(RUN, root, out, resume=resumable, progress=False, tensorboard=False)
    printed = capsys.readouterr().out
    assert ("resuming" in printed) if resumable else ("starting the run afresh" in printed or not printed)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(uninterrupted.model), leaves(result.model)))
    logged = lambda path: [(r["step"], r["loss"]) for r in _read_jsonl(path / "metrics.jsonl")]
    assert logged(out) == logged(uninterrupted.out)
    assert not any("orbax-checkpoint-tmp" in p.name for p in (out / "checkpoints").rglob("*"))
    assert read_meta(out / "checkpoints" / "best")["step"] == uninterrupted.best["step"]


# ---------------------------------------------------------------- "not measured" in the logs (issue 16)
def _strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_part_never_active_in_validation_is_null_in_the_logs_and_absent_from_tensorboard(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    for index in range(6):
        song = root / "subset" / f"song{index}"
        song.mkdir(parents=True)
        for part in STEM_NAMES:
            silent = part == "lead_vocal" and index == 0  # song0 is the valid split: its lead never sings
            audio = np.zeros(4000, np.float32) if silent else (0.05 * rng.standard_normal(4000)).astype(np.float32)
            sf.write(song / f"{part}.wav", audio, 8000, subtype="FLOAT")
    (root / VALID_LIST_NAME).write_text("song0\n")
    scalars = []
    from tensorboardX import SummaryWriter

    monkeypatch.setattr(SummaryWriter, "add_scalar", lambda self, tag, value, *a, **k: scalars.append((tag, value)))
    run = run_config_for("ci", steps=3, valid_every=3, checkpoint_every=3, audio_every=100)
    result = train_on_corpus(run, root, tmp_path / "run", progress=False, tensorboard=True)
    for log in ("metrics.jsonl", "validation.jsonl"):
        for line in (tmp_path / "run" / log).read_text().splitlines():
            _strict_json(line)
    record = _strict_json((tmp_path / "run" / "validation.jsonl").read_text().splitlines()[-1])
    assert record["si_sdr/lead_vocal"] is None and record["si_sdri/lead_vocal"] is None
    assert isinstance(record["si_sdri/bass"], float) and isinstance(record["mean_si_sdri"], float)
    assert all(np.isfinite(value) for _, value in scalars) and ("valid/si_sdr/lead_vocal" not in dict(scalars))
    assert "valid/si_sdr/bass" in dict(scalars) and result.best["si_sdri/lead_vocal"] is None


def test_validate_reports_parts_never_active_as_none(root):
    dataset = JaCappellaDataset(root, sample_rate=8000, split="valid")
    batches = validation_batches(dataset, 2000, 2, 4)
    for batch in batches:
        batch["active"][:, 0] = False
    scores = validate(SepReformer(PRESETS["ci"], key=jax.random.key(0)), batches)
    assert scores["si_sdr/lead_vocal"] is None and scores["si_sdri/lead_vocal"] is None
    measured = [scores[f"si_sdri/{name}"] for name in STEM_NAMES[1:]]
    assert scores["mean_si_sdri"] == pytest.approx(np.mean(measured))
    for batch in batches:
        batch["active"][:] = False
    assert validate(SepReformer(PRESETS["ci"], key=jax.random.key(0)), batches)["mean_si_sdri"] is None
