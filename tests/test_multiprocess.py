"""Training as two real processes of one run (JAX's distributed runtime, CPU collectives over gloo, coordinator on
127.0.0.1): killed after a checkpoint, resumed, and compared with one process training on the same global batches."""
import signal
import time

import equinox as eqx
import jax
import numpy as np
import pytest

from sepreformer_book.checkpoints import complete_steps, load_model, read_meta
from sepreformer_book.choir import ensure_corpus
from sepreformer_book.config import active_profile
from sepreformer_book.training import _read_jsonl, main, run_config_for, start_local_processes, train_on_corpus

STEPS, EVERY = 16, 4
RUN = run_config_for("ci", steps=STEPS, checkpoint_every=EVERY, valid_every=EVERY, audio_every=100)


@pytest.fixture(scope="module")
def root():
    return ensure_corpus(active_profile("ci"), progress=False)


def arguments(root, out, *extra):
    return ["--profile", "ci", "--data", str(root), "--out", str(out), "--steps", str(STEPS), "--checkpoint-every",
            str(EVERY), "--valid-every", str(EVERY), "--audio-every", "100", "--no-progress", *extra]


def finish(processes, timeout=300):
    outputs = [p.communicate(timeout=timeout) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return outputs


def test_two_processes_train_resume_and_match_one_process(root, tmp_path, capsys):
    out = tmp_path / "run"
    processes = start_local_processes(arguments(root, out))
    deadline = time.time() + 300
    while not complete_steps(out / "checkpoints" / "last"):  # the first checkpoint, written by both processes
        assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = max(complete_steps(out / "checkpoints" / "last"))
    assert killed_at < STEPS, "the run finished before it could be killed"
    assert read_meta(out / "checkpoints" / "last")["processes"] == 2

    (first, _), (second, _) = finish(start_local_processes(arguments(root, out, "--resume")))
    assert f"resuming {out} from step {killed_at}" in first and "best validation mean SI-SDRi" in first
    # only process 0 speaks for the run (gloo's own connection notice aside)
    assert [line for line in second.splitlines() if not line.startswith("[Gloo]")] == []
    logged = _read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))  # each step logged once, by one process
    assert [r["step"] for r in _read_jsonl(out / "validation.jsonl")] == list(range(EVERY, STEPS + 1, EVERY))

    # One process on the same global batches: process p reads items p, p + 2, ... of the one-item stream, which
    # are the rows of the two-item batches one process reads. The gradient's sum is split over two processes and
    # all-reduced over gloo, so the order of the float32 additions differs: equal to rounding, not bit for bit.
    alone = train_on_corpus(RUN, root, tmp_path / "alone", progress=False, tensorboard=False)
    together, meta = load_model(out / "checkpoints" / "last")
    assert meta["step"] == STEPS
    for a, b in zip(jax.tree.leaves(eqx.filter(together, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(alone.model, eqx.is_array))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)
    one_loss = [r["loss"] for r in _read_jsonl(tmp_path / "alone" / "metrics.jsonl")]
    np.testing.assert_allclose([r["loss"] for r in logged], one_loss, rtol=1e-4)

    # the two-process run cannot be resumed by one process (checked here, on this run, rather than on a run of its
    # own: starting two processes costs most of a minute of CI)
    capsys.readouterr()
    assert main(arguments(root, out, "--resume")) == 2
    assert "written by 2" in " ".join(capsys.readouterr().err.split())


def test_processes_with_different_run_directories_are_a_clear_error(root, tmp_path):
    """The issue's reproduction: one --out per process. Every process must write the same run directory."""
    processes = start_local_processes(arguments(root, tmp_path / "first", "--steps", "2"),
                                      extra=[[], ["--out", str(tmp_path / "second")]])
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [2, 2], [err[-2000:] for _, err in outputs]
    assert all("different --out" in err and "Traceback" not in err for _, err in outputs)


def test_incomplete_settings_are_a_clear_error(tmp_path, capsys):
    assert main(["--profile", "ci", "--out", str(tmp_path / "x"), "--num-processes", "2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--coordinator-address" in err and "--process-id" in err and "Traceback" not in err
