import dataclasses

import numpy as np
import pytest

from sepreformer_book.config import PROFILES, active_profile, part_colour, peak_scale


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
