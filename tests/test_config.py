import dataclasses

import numpy as np
import pytest

from sepreformer_book.config import MESSAGE_WIDTH, PROFILES, active_profile, part_colour, peak_scale, tell


def test_default_profile_is_book(monkeypatch):
    monkeypatch.delenv("SEPREFORMER_PROFILE", raising=False)
    assert active_profile().name == "book"


def test_profile_from_environment(monkeypatch):
    monkeypatch.setenv("SEPREFORMER_PROFILE", "CI ")
    assert active_profile() is PROFILES["ci"]


def test_unknown_profile_lists_valid_names(monkeypatch):
    monkeypatch.setenv("SEPREFORMER_PROFILE", "gpu")
    with pytest.raises(ValueError, match="book, ci, full"):
        active_profile()


def test_profiles_are_frozen_and_grow():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROFILES["book"].batch_size = 3
    assert PROFILES["ci"].corpus_songs < PROFILES["book"].corpus_songs < PROFILES["full"].corpus_songs


def test_peak_scale_keeps_relative_levels():
    loud, quiet = np.array([0.5, -1.0]), np.array([0.25, 0.0])
    assert np.allclose(peak_scale(quiet, reference=loud), [0.2475, 0.0])
    assert np.all(peak_scale(np.zeros(3)) == 0)


def test_every_part_has_a_distinct_colour():
    parts = ["lead_vocal", "soprano", "alto", "tenor", "bass", "vocal_percussion", "mixture"]
    assert len({part_colour(p) for p in parts}) == len(parts)


def test_tell_wraps_messages_at_the_page_width_and_keeps_paths_whole(capsys):
    path = "/a/long/path/" + "x" * 40 + "/checkpoint"
    tell(f"error: No checkpoint at {path}: train one with `python -m sepreformer_book.training` "
         "or pass --checkpoint with the folder of an existing run.\nsecond line")
    lines = capsys.readouterr().err.splitlines()
    assert all(len(line) <= MESSAGE_WIDTH for line in lines), lines
    assert any(path in line for line in lines) and lines[-1] == "second line"
    assert all(line.startswith("  ") for line in lines[1:-1])  # continuation lines indented
