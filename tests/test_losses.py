"""Tests of sepreformer_book.losses: SI-SDR against a NumPy reference, STFT against librosa, finite gradients, silence."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import Float, Array, TypeCheckError

from sepreformer_book.losses import (STFT_RESOLUTIONS, composite_loss, loss_fn, mr_stft_loss, periodic_hann,
                                     seed_composite_loss, si_sdr, si_sdri, silence_penalty, stft_loss_single,
                                     stft_mag)

SMALL = ((64, 16, 64),)  # one tiny STFT resolution for property tests
T = 256  # samples in property-test signals


def numpy_si_sdr(estimate, target):
    """Le Roux et al. 2019 in float64, zero-mean, no eps: the independent reference."""
    estimate = np.asarray(estimate, np.float64) - np.mean(estimate)
    target = np.asarray(target, np.float64) - np.mean(target)
    s_target = estimate @ target / (target @ target) * target
    e_noise = estimate - s_target
    return 10 * np.log10((s_target @ s_target) / (e_noise @ e_noise))


def tone(num_samples, f0, sample_rate=8000, phase=0.0):
    t = np.arange(num_samples) / sample_rate
    return sum(0.5**k * np.sin(2 * np.pi * k * f0 * t + phase * k) for k in range(1, 6)).astype(np.float32)


# ---------------------------------------------------------------- SI-SDR


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), snr=st.floats(-20, 40), dc=st.floats(-1, 1))
def test_si_sdr_matches_numpy_reference(seed, snr, dc):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal(2000).astype(np.float32)
    estimate = (target + 10 ** (-snr / 20) * rng.standard_normal(2000) + dc).astype(np.float32)
    ours = float(si_sdr(jnp.asarray(estimate), jnp.asarray(target)))
    assert ours == pytest.approx(numpy_si_sdr(estimate, target), abs=1e-3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), log_scale=st.floats(-3, 3))
def test_si_sdr_is_invariant_to_estimate_scale(seed, log_scale):
    rng = np.random.default_rng(seed)
    target = jnp.asarray(rng.standard_normal(1000), dtype=jnp.float32)
    estimate = target + 0.3 * jnp.asarray(rng.standard_normal(1000), dtype=jnp.float32)
    scaled = estimate * jnp.float32(10.0**log_scale)
    assert float(si_sdr(scaled, target)) == pytest.approx(float(si_sdr(estimate, target)), abs=1e-3)


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 7.5, 20.0])
def test_orthogonal_noise_gives_its_snr(snr_db):
    rng = np.random.default_rng(0)
    target = rng.standard_normal(4000)
    target -= target.mean()
    noise = rng.standard_normal(4000)
    noise -= noise.mean()
    noise -= (noise @ target) / (target @ target) * target  # exactly orthogonal to the target
    noise *= np.sqrt((target @ target) / (noise @ noise) / 10 ** (snr_db / 10))
    value = float(si_sdr(jnp.asarray(target + noise, jnp.float32), jnp.asarray(target, jnp.float32)))
    assert value == pytest.approx(snr_db, abs=1e-3)


def test_perfect_estimate_is_finite_and_capped():
    target = jnp.asarray(tone(4000, 220.0))
    metric = si_sdr(target, target)
    capped = si_sdr(target, target, cap=30.0)
    assert np.isfinite(float(metric)) and float(metric) > 60
    assert float(capped) == 30.0
    for cap in (None, 30.0):
        grad = jax.grad(lambda e: si_sdr(e, target, cap=cap))(target)
        assert bool(jnp.all(jnp.isfinite(grad)))


def test_zero_mean_flag_matters_with_dc_offset():
    rng = np.random.default_rng(1)
    target = jnp.asarray(rng.standard_normal(2000), jnp.float32)
    estimate = target + 0.3 * jnp.asarray(rng.standard_normal(2000), jnp.float32) + 0.5
    with_mean = float(si_sdr(estimate, target, zero_mean=False))
    without_mean = float(si_sdr(estimate, target))
    assert without_mean - with_mean > 3.0  # torchmetrics/fast_bss_eval default (zero_mean=False) scores lower here


def test_si_sdr_batches_and_si_sdri_of_mixture_is_zero():
    rng = np.random.default_rng(2)
    targets = jnp.asarray(rng.standard_normal((2, 3, 500)), jnp.float32)
    estimates = targets + 0.5 * jnp.asarray(rng.standard_normal((2, 3, 500)), jnp.float32)
    batched = si_sdr(estimates, targets)
    assert batched.shape == (2, 3)
    looped = jnp.stack([jnp.stack([si_sdr(estimates[b, n], targets[b, n]) for n in range(3)]) for b in range(2)])
    np.testing.assert_allclose(batched, looped, atol=1e-4)
    mixture = targets.sum(1, keepdims=True)  # (2, 1, T) broadcasts against (2, 3, T)
    np.testing.assert_allclose(si_sdri(jnp.broadcast_to(mixture, targets.shape), targets, mixture), 0.0, atol=1e-5)


def test_type_checks_reject_bad_shapes():
    with pytest.raises(TypeCheckError):
        si_sdr(jnp.zeros((2, 100)), jnp.zeros((3, 100)))
    with pytest.raises(TypeCheckError):
        composite_loss(jnp.zeros((3, 2000)), jnp.zeros((3, 2000)), jnp.ones(4, dtype=bool))
    with pytest.raises(TypeCheckError):
        composite_loss(jnp.zeros((3, 2000)), jnp.zeros((3, 2000)), jnp.ones(3))  # float mask, not bool


# ---------------------------------------------------------------- STFT


def test_periodic_hann_matches_scipy():
    import scipy.signal

    for size in (16, 512, 2048):
        np.testing.assert_allclose(periodic_hann(size), scipy.signal.get_window("hann", size), atol=1e-6)


@pytest.mark.parametrize("fft_size,hop,win_size", [*STFT_RESOLUTIONS, (256, 64, 200)])
def test_stft_mag_matches_librosa(fft_size, hop, win_size):
    signal = np.random.default_rng(fft_size).standard_normal(3001).astype(np.float32)
    ours = np.asarray(stft_mag(jnp.asarray(signal), fft_size, hop, win_size))
    theirs = np.abs(librosa.stft(signal, n_fft=fft_size, hop_length=hop, win_length=win_size,
                                 window="hann", center=True, pad_mode="reflect"))
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) / np.max(theirs) < 1e-4


def test_stft_sizes_must_be_static_ints_and_signal_long_enough():
    x = jnp.zeros(3000)
    assert stft_mag(x, np.int64(512), 128, 512).shape == (257, 24)  # numpy ints are accepted
    with pytest.raises(TypeError):  # a traced size is refused (by the type check, or by the explicit check)
        jax.jit(lambda n: stft_mag(x, n, 128, 512))(512)
    with pytest.raises(ValueError, match="must be positive"):
        stft_mag(x, 512, 0, 512)
    with pytest.raises(ValueError, match="use longer segments"):
        stft_mag(jnp.zeros(500), 2048, 512, 2048)


# ---------------------------------------------------------------- finite gradients


def _signal_cases(draw_seed, scale, length):
    rng = np.random.default_rng(draw_seed)
    target = (scale * rng.standard_normal(length)).astype(np.float32)
    burst = np.zeros(length, np.float32)
    burst[length // 3: length // 3 + 20] = scale * rng.standard_normal(20)
    zero = np.zeros(length, np.float32)
    other = (scale * rng.standard_normal(length)).astype(np.float32)
    return {
        "estimate = target": (target, target),
        "zero estimate": (zero, target),
        "zero target": (other, zero),
        "both zero": (zero, zero),
        "burst target": (other, burst),
        "burst estimate = target": (burst, burst),
    }


def _losses_of_pair(est, tgt):
    return {
        "si_sdr": si_sdr(est, tgt),
        "si_sdr capped": si_sdr(est, tgt, cap=30.0),
        "stft_loss_single": stft_loss_single(est, tgt, *SMALL[0]),
        "mr_stft_loss": mr_stft_loss(est, tgt, SMALL),
        "silence_penalty": silence_penalty(est, tgt),
    }


@jax.jit
def _values_and_grads(est, tgt):
    """Every pair loss and its gradient with respect to the estimate, compiled once per shape."""
    names = list(_losses_of_pair(est, tgt))
    return {name: jax.value_and_grad(lambda e, n=name: _losses_of_pair(e, tgt)[n])(est) for name in names}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), log_scale=st.sampled_from([-4.0, -2.0, 0.0, 2.0, 3.0]),
       length=st.sampled_from([T // 2 + 3, T]))
def test_gradients_of_every_loss_are_finite(seed, log_scale, length):
    for case, (est, tgt) in _signal_cases(seed, 10.0**log_scale, length).items():
        for name, (value, grad) in _values_and_grads(jnp.asarray(est), jnp.asarray(tgt)).items():
            assert np.isfinite(float(value)), (case, name, log_scale)
            assert bool(jnp.all(jnp.isfinite(grad))), (case, name, log_scale)


_small_composite = jax.jit(jax.value_and_grad(functools.partial(composite_loss, resolutions=SMALL)))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), log_scale=st.sampled_from([-4.0, 0.0, 3.0]),
       num_stems=st.sampled_from([1, 4]), masks=st.integers(0, 255))
def test_composite_loss_gradients_are_finite(seed, log_scale, num_stems, masks):
    rng = np.random.default_rng(seed)
    bits = np.array([(masks >> k) & 1 for k in range(8)], bool)
    active, present = jnp.asarray(bits[:num_stems]), jnp.asarray(bits[4:4 + num_stems])
    targets = 10.0**log_scale * rng.standard_normal((num_stems, T)) * np.asarray(active & present)[:, None]
    estimates = 10.0**log_scale * rng.standard_normal((num_stems, T))
    if seed % 2:
        estimates[0] = 0.0
    targets, estimates = jnp.asarray(targets, jnp.float32), jnp.asarray(estimates, jnp.float32)
    value, grad = _small_composite(estimates, targets, active, present)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
    if not bool(jnp.any(present)):
        assert float(value) == 0.0


# ---------------------------------------------------------------- composite loss and silent stems


LONG = 2100  # samples: just enough for the 2048-point STFT; every full-resolution test uses this length
_composite = jax.jit(composite_loss)
_composite_grad = jax.jit(jax.grad(composite_loss))
_seed = jax.jit(seed_composite_loss)


def _voices(num_samples=LONG):
    voices = np.stack([tone(num_samples, f0, phase=k) for k, f0 in enumerate((523.3, 392.0, 261.6, 130.8))])
    voices[3, num_samples // 2:] = 0.0  # the bass rests for the second half
    rng = np.random.default_rng(0)
    mix = voices.sum(0)
    estimates = voices + 0.2 * (mix - voices) + 0.01 * rng.standard_normal(voices.shape)
    return jnp.asarray(voices), jnp.asarray(estimates, jnp.float32), mix


def test_one_silent_stem_moves_composite_a_little_and_seed_a_lot():
    targets4, estimates4, mix = _voices()
    silent_estimate = 0.05 * mix + 0.005 * np.random.default_rng(1).standard_normal(mix.shape)
    targets5 = jnp.concatenate([jnp.zeros((1, mix.shape[0])), targets4])
    estimates5 = jnp.concatenate([jnp.asarray(silent_estimate, jnp.float32)[None], estimates4])
    active5 = jnp.array([False, True, True, True, True])
    ours4 = float(_composite(estimates4, targets4, jnp.ones(4, dtype=bool), jnp.ones(4, dtype=bool)))
    ours5 = float(_composite(estimates5, targets5, active5, jnp.ones(5, dtype=bool)))
    assert abs(ours5 - ours4) < 5.0
    assert float(_seed(estimates5, targets5)) - float(_seed(estimates4, targets4)) > 10.0
    # an absent stem contributes nothing at all
    assert float(_composite(estimates5, targets5, active5, active5)) == pytest.approx(ours4, abs=1e-4)
    # the silent stem's gradient is of the same order as the sounding stems'
    norms = jnp.linalg.norm(_composite_grad(estimates5, targets5, active5, jnp.ones(5, dtype=bool)), axis=-1)
    assert bool(jnp.all(jnp.isfinite(norms))) and float(norms[0]) < 10 * float(norms[1:].max())


def test_silence_penalty_is_bounded_below_and_relative_to_mixture():
    mix = jnp.asarray(tone(2000, 200.0))
    assert float(silence_penalty(jnp.zeros(2000), mix)) == pytest.approx(-30.0, abs=1e-4)
    assert float(silence_penalty(mix, mix)) == pytest.approx(10 * np.log10(1.001), abs=1e-4)
    assert float(silence_penalty(0.1 * mix, mix)) == pytest.approx(float(silence_penalty(1.0 * mix, 10 * mix)), abs=1e-4)


def test_all_true_masks_equal_the_seed_formula():
    targets, estimates, _ = _voices()
    ones = jnp.ones(4, dtype=bool)
    ours = _composite(estimates, targets, ones, ones)
    per_stem = jax.jit(jax.vmap(lambda e, t: -si_sdr(e, t, cap=30.0) + 0.5 * mr_stft_loss(e, t)))(estimates, targets)
    assert float(ours) == pytest.approx(float(jnp.mean(per_stem)), rel=1e-6)
    # on noise-like stems (no spectral bin near the floor) it is the seed's own number
    rng = np.random.default_rng(3)
    noise_targets = jnp.asarray(rng.standard_normal((4, LONG)), jnp.float32)
    noise_estimates = noise_targets + 0.3 * jnp.asarray(rng.standard_normal((4, LONG)), jnp.float32)
    ours_noise = float(_composite(noise_estimates, noise_targets, ones, ones))
    assert ours_noise == pytest.approx(float(_seed(noise_estimates, noise_targets)), abs=1e-3)


def test_no_active_or_present_stems_is_not_nan():
    targets = jnp.zeros((5, LONG))
    estimates = jnp.asarray(np.random.default_rng(0).standard_normal((5, LONG)), jnp.float32)
    none, every = jnp.zeros(5, dtype=bool), jnp.ones(5, dtype=bool)
    all_silent = _composite(estimates, targets, none, every)  # present, none sounding: mean of silence penalties
    nothing = _composite(estimates, targets, none, none)
    assert np.isfinite(float(all_silent)) and float(nothing) == 0.0
    for present in (none, every):
        assert bool(jnp.all(jnp.isfinite(_composite_grad(estimates, targets, none, present))))


# ---------------------------------------------------------------- loss_fn with a stand-in model


class LinearStems(eqx.Module):
    """A stand-in separator: N learned gains times the mixture plus a learned FIR filter each."""

    gains: Float[Array, "N"]
    taps: Float[Array, "N K"]

    def __init__(self, num_stems, *, key):
        self.gains = jnp.full(num_stems, 1.0 / num_stems, dtype=jnp.float32)
        self.taps = 0.01 * jax.random.normal(key, (num_stems, 9))

    def __call__(self, x: Float[Array, "T"]) -> Float[Array, "N T"]:
        filtered = jax.vmap(lambda h: jnp.convolve(x, h, mode="same"))(self.taps)
        return self.gains[:, None] * x[None] + filtered


def test_loss_fn_value_and_grad_with_stand_in_model():
    targets, _, mix = _voices()
    targets = jnp.stack([targets, targets[:, ::-1]])
    mixture = targets.sum(1)
    active = jnp.array([[True, True, True, True], [True, True, False, True]])
    present = jnp.array([[True, True, True, True], [True, True, True, False]])
    model = LinearStems(4, key=jax.random.key(0))
    value, grads = eqx.filter_jit(loss_fn)(model, mixture, targets, active, present)
    expected = jnp.mean(jnp.stack([_composite(model(mixture[b]), targets[b], active[b], present[b]) for b in range(2)]))
    assert float(value) == pytest.approx(float(expected), abs=1e-4)
    assert bool(jnp.all(jnp.isfinite(grads.gains))) and bool(jnp.all(jnp.isfinite(grads.taps)))
    value_default, _ = eqx.filter_jit(loss_fn)(model, mixture, targets, active)  # present defaults to all
    assert np.isfinite(float(value_default))
    with pytest.raises(TypeCheckError):
        loss_fn(model, mixture, targets[:, :3], active)
