"""The synthetic choir's renderer as it was before domain randomisation, and the randomised renderer with its factors
switched back, for bench_generalisation.py to compare side by side.

`render_song`: sepreformer_book/choir.py at commit b4236f7: one timbre per part, lightly perturbed per song; dry; one
source family (a harmonic sum in sine phase, through three parallel formants). bench_generalisation.py renders
"today's recipe" corpus with it. `simplify`: today's renderer with the factors it names held as that one did."""
from dataclasses import dataclass, replace

import numpy as np
from jaxtyping import Float

from sepreformer_book.choir import Note, lead_line, smooth
from sepreformer_book.config import STEM_NAMES

VOWELS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    # (F1, F2, F3) in Hz for an adult male voice, (B1, B2, B3) bandwidths in Hz
    "a": ((730.0, 1090.0, 2440.0), (90.0, 110.0, 160.0)),
    "e": ((530.0, 1840.0, 2480.0), (70.0, 100.0, 150.0)),
    "i": ((290.0, 2250.0, 2890.0), (60.0, 100.0, 170.0)),
    "o": ((570.0, 840.0, 2410.0), (80.0, 90.0, 150.0)),
    "u": ((300.0, 870.0, 2240.0), (60.0, 90.0, 140.0)),
}
FORMANT_GAINS = np.array([1.0, 0.5, 0.25], dtype=np.float32)  # 0, -6, -12 dB


@dataclass(frozen=True)
class Voice:
    """The timbre of one singer: formant scaling, spectral tilt, vibrato, jitter, breathiness, level."""

    formant_scale: float  # vocal-tract length: >1 shifts formants up (smaller singer)
    tilt: float  # harmonic k has amplitude k**-tilt before the formants
    vibrato_hz: float
    vibrato_cents: float
    jitter_cents: float  # slow random pitch wander
    breathiness: float  # aspiration noise level relative to the voice
    glide_seconds: float  # portamento time constant between notes
    gain_db: float
    singers_formant: float = 0.0  # extra resonance near 3 kHz (trained male voices)


VOICE_DEFAULTS: dict[str, Voice] = {
    "soprano": Voice(1.17, 1.25, 5.6, 22.0, 6.0, 0.025, 0.020, -2.0),
    "alto": Voice(1.10, 1.30, 5.3, 18.0, 6.0, 0.030, 0.020, -3.0),
    "tenor": Voice(1.00, 1.15, 5.4, 20.0, 6.0, 0.020, 0.020, -3.0, 0.3),
    "bass": Voice(0.92, 1.05, 5.0, 16.0, 6.0, 0.020, 0.025, -1.0, 0.3),
    "lead_vocal": Voice(1.05, 0.85, 6.0, 45.0, 9.0, 0.045, 0.050, +2.0, 0.15),
}


def perturbed_voice(voice: Voice, rng: np.random.Generator) -> Voice:
    """A per-song variation of a voice: every singer of a part sounds a little different."""
    jitter = lambda value, spread: value * float(rng.uniform(1 - spread, 1 + spread))
    return Voice(
        formant_scale=jitter(voice.formant_scale, 0.05), tilt=jitter(voice.tilt, 0.12),
        vibrato_hz=jitter(voice.vibrato_hz, 0.12), vibrato_cents=jitter(voice.vibrato_cents, 0.3),
        jitter_cents=jitter(voice.jitter_cents, 0.3), breathiness=jitter(voice.breathiness, 0.4),
        glide_seconds=jitter(voice.glide_seconds, 0.3), gain_db=voice.gain_db + float(rng.uniform(-3, 3)),
        singers_formant=voice.singers_formant,
    )


def formant_response(freqs: np.ndarray, formants: np.ndarray, bandwidths: np.ndarray, singers_formant: float = 0.0) -> Float[np.ndarray, "..."]:
    """|H(f)| of a vocal tract: a sum of three resonances (formants shape (..., 3)) plus a small floor."""
    f = freqs[..., None]
    peaks = FORMANT_GAINS / np.sqrt(1.0 + ((f - formants[..., None, :]) / (0.5 * bandwidths[..., None, :])) ** 2)
    response = 0.03 + peaks.sum(-1)
    if singers_formant:
        response = response + singers_formant / np.sqrt(1.0 + ((freqs - 2900.0) / 250.0) ** 2)
    return response.astype(np.float32)


def render_voice(notes: list[tuple[float, float, float | int]], voice: Voice, length: int, sample_rate: int,
                 rng: np.random.Generator, max_harmonic_hz: float = 5000.0, vowels: list[str] | None = None) -> Float[np.ndarray, "samples"]:
    """Sing `notes` (start s, end s, MIDI pitch; vowels drawn per note) with `voice`; float32 (length,).

    Source: band-limited harmonics k*f0 with amplitude k**-tilt (a glottal-like spectrum), shaped per
    harmonic by the formant response of the note's vowel; pitch glides, vibrato and jitter; a gate
    smoothed into attacks and releases, re-articulated between notes; aspiration noise and breaths.
    `vowels` fixes the vowel of each note (default: drawn from `rng`).
    """
    if not notes:
        return np.zeros(length, dtype=np.float32)
    hop = sample_rate // 200  # control frames every 5 ms
    frames = length // hop + 2
    rate = sample_rate / hop
    t = np.arange(frames) / rate
    starts = np.array([n[0] for n in notes])
    ends = np.array([n[1] for n in notes])
    pitches = np.array([n[2] for n in notes], dtype=np.float64)
    current = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(notes) - 1)
    # pitch: the current note (held through rests), glided, with vibrato that fades in and slow jitter
    midi = smooth(pitches[current], voice.glide_seconds, rate)
    since_onset = t - starts[current]
    vibrato = voice.vibrato_cents * np.clip(since_onset / 0.3, 0, 1) * np.sin(
        2 * np.pi * voice.vibrato_hz * t + rng.uniform(0, 2 * np.pi))
    wander = smooth(rng.standard_normal(frames), 0.08, rate)
    wander *= voice.jitter_cents / (wander.std() + 1e-9)
    f0 = 440.0 * 2 ** ((midi - 69 + (vibrato + wander) / 100) / 12)
    # loudness: a gate per note with a short gap before the next note, then attack/release smoothing
    sounding = (t >= starts[current]) & (t < ends[current] - 0.03)
    levels = 10 ** (rng.uniform(-2.5, 2.5, len(notes)) / 20)
    gate = np.where(sounding, levels[current], 0.0)
    envelope = smooth(gate, 0.035, rate) * (1 + 0.04 * smooth(rng.standard_normal(frames), 0.05, rate))
    # vowels: one per note, formants move smoothly between them
    names = list(VOWELS)
    choice = rng.integers(0, len(names), len(notes)) if vowels is None else [names.index(v) for v in vowels]
    formants = np.array([VOWELS[names[c]][0] for c in choice]) * voice.formant_scale
    bandwidths = np.array([VOWELS[names[c]][1] for c in choice])
    formants_t = smooth(formants[current].T, 0.04, rate).T
    bandwidths_t = bandwidths[current]
    # harmonic amplitudes at control rate: source tilt x vocal tract x band limit
    top = min(max_harmonic_hz, 0.45 * sample_rate)
    n_harmonics = int(top // f0.min())
    k = np.arange(1, n_harmonics + 1)
    freqs = f0[:, None] * k
    amps = k ** -voice.tilt * formant_response(freqs, formants_t, bandwidths_t, voice.singers_formant)
    amps *= np.clip((top - freqs) / (0.25 * top), 0, 1) * envelope[:, None]
    amps = amps.astype(np.float32)
    # per sample: phase from the interpolated f0, harmonics by the Chebyshev recursion sin(k p) = 2cos(p) sin((k-1)p) - sin((k-2)p)
    ramp = (np.arange(hop) / hop).astype(np.float32)
    upsample = lambda c: (c[:-1, None] * (1 - ramp) + c[1:, None] * ramp).reshape(-1)[:length]
    phase = np.cumsum(upsample(f0.astype(np.float64)) * (2 * np.pi / sample_rate)) + rng.uniform(0, 2 * np.pi)
    phase = np.mod(phase, 2 * np.pi)
    s1 = np.sin(phase).astype(np.float32)
    c2 = (2 * np.cos(phase)).astype(np.float32)
    prev, cur = np.zeros_like(s1), s1
    out = np.zeros(length, dtype=np.float32)
    for h in range(n_harmonics):
        column = amps[:, h]
        if column.max() > 1e-5:
            out += upsample(column) * cur
        prev, cur = cur, c2 * cur - prev
    # aspiration: noise pulsed with the glottal cycle, following the envelope; breaths before phrases
    noise = np.diff(rng.standard_normal(length + 1)).astype(np.float32)
    env = upsample(envelope.astype(np.float32))
    out += voice.breathiness * 0.5 * noise * env * (1 + 0.7 * s1)
    for i, start in enumerate(starts):
        rest = start - (ends[i - 1] if i else -1.0)
        if rest >= 0.25:
            span = min(rest - 0.05, 0.4)
            a, b = int((start - 0.05 - span) * sample_rate), int((start - 0.05) * sample_rate)
            a, b = max(a, 0), min(b, length)
            if b > a:
                out[a:b] += 0.06 * voice.breathiness * 10 * noise[a:b] * np.hanning(b - a).astype(np.float32)
    return out * np.float32(10 ** (voice.gain_db / 20))


def time_map(voices: dict[str, list[Note]], seconds_per_quarter: float, fermata_stretch: float = 1.8):
    """A function from score time (quarters) to seconds: steady tempo, held longer under fermatas."""
    held = sorted({(n.start, n.end) for notes in voices.values() for n in notes if n.fermata})
    points = sorted({0.0, max(n.end for notes in voices.values() for n in notes)} | {x for span in held for x in span})
    points = np.array(points)
    middles = (points[:-1] + points[1:]) / 2
    stretch = np.ones_like(middles)
    for a, b in held:
        stretch[(middles > a) & (middles < b)] = fermata_stretch
    seconds = np.r_[0.0, np.cumsum(np.diff(points) * stretch * seconds_per_quarter)]
    return lambda quarters: np.interp(quarters, points, seconds)


def beatbox(length: int, sample_rate: int, beats: np.ndarray, rng: np.random.Generator) -> Float[np.ndarray, "samples"]:
    """Vocal percussion on quarter-note `beats` (seconds): kick on odd beats, snare on even, hi-hat on eighths."""
    out = np.zeros(length, dtype=np.float32)
    t = np.arange(int(0.25 * sample_rate)) / sample_rate
    kick = np.sin(2 * np.pi * (50 * t + 60 * (1 - np.exp(-t / 0.03)) * 0.03)) * np.exp(-t / 0.07)
    noise = rng.standard_normal(t.size)
    snare = (0.6 * noise + 0.5 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t / 0.05)
    hat = np.diff(noise, prepend=0) * np.exp(-t / 0.015) * 0.3
    eighths = np.sort(np.r_[beats, (beats[:-1] + beats[1:]) / 2])
    for i, b in enumerate(beats):
        hit = kick if i % 2 == 0 else snare
        a = int(b * sample_rate)
        n = min(hit.size, length - a)
        if n > 0:
            out[a:a + n] += hit[:n] * rng.uniform(0.8, 1.0)
    for b in eighths:
        a = int(b * sample_rate)
        n = min(hat.size, length - a)
        if n > 0:
            out[a:a + n] += hat[:n] * rng.uniform(0.5, 1.0)
    return 0.5 * out


def render_song(voices: dict[str, list[Note]], seconds: float, sample_rate: int, rng: np.random.Generator,
                choir=None, vocal_percussion: bool = False) -> dict[str, np.ndarray]:
    """Sing a chorale with random key, tempo, singers and loudness; returns int16 parts whose sum is the mixture."""
    length = int(round(seconds * sample_rate))
    transpose = int(rng.integers(-3, 4))
    to_seconds = time_map(voices, 60.0 / rng.uniform(66, 96))
    lines = dict(voices)
    lead = lead_line(voices["soprano"], rng)
    lead_octave = -12 if rng.random() < 0.5 else 0  # a male lead an octave below, or a female lead in unison
    lines["lead_vocal"] = [Note(n.start, n.end, n.pitch + lead_octave) for n in lead]
    parts = {}
    for name in STEM_NAMES:
        timing = 0.04 if name == "lead_vocal" else 0.012  # the lead sings freely around the beat
        notes = []
        for n in lines[name]:
            start, end = to_seconds([n.start, n.end]) + rng.normal(0, timing, 2)
            if start < seconds:
                notes.append((max(start, 0.0), end, n.pitch + transpose))
        parts[name] = render_voice(notes, perturbed_voice(VOICE_DEFAULTS[name], rng), length, sample_rate, rng)
    if vocal_percussion:
        beats = to_seconds(np.arange(0, voices["bass"][-1].end))
        parts["vocal_percussion"] = beatbox(length, sample_rate, beats[beats < seconds], rng)
    fade = np.minimum(1.0, (length - np.arange(length)) / (0.05 * sample_rate)).astype(np.float32)
    peak = np.abs(sum(parts.values())).max()
    scale = rng.uniform(0.4, 0.9) / max(peak, 1e-9)  # per-song loudness, never clipping
    return {name: np.round(part * fade * scale * 32767).astype(np.int16) for name, part in parts.items()}


# What VOICE_DEFAULTS does not hold, per part, in the randomised renderer's terms: singer's formant (dB) and spread
# of onsets (s)
PLAIN_RING_AND_TIMING = {
    "soprano": (-20.0, 0.012),
    "alto": (-20.0, 0.012),
    "tenor": (-10.0, 0.012),
    "bass": (-10.0, 0.012),
    "lead_vocal": (-16.0, 0.04),
}
# Choir overrides that hold the song-level factors as the first renderer did: dry, no vocal percussion, its tempi
# and keys
PLAIN_SONGS = {"dry_fraction": 1.0, "vocal_percussion": 0.0, "bpm": [66, 96], "transpose": [-3, 3]}
SINGER_FACTORS = ("timbre", "expressive", "aperiodic", "eq", "rubato")


def simplify(choir, keep: tuple[str, ...] = (), pulses: bool = False, parallel_tract: bool = False) -> None:
    """Hold the singer factors of `choir` (the module) that `keep` does not name as the first renderer did: timbre
    (one harmonic source, tract scale and tilt per part, perturbed as there), expressive (vibrato, glides, scoops,
    attacks, timing), aperiodic (jitter, shimmer, drift, breath, consonants), eq, rubato. `pulses`: the harmonic
    family in sine phase (a pulse) rather than random phases; `parallel_tract`: the first renderer's three parallel
    formants over a floor instead of the five-resonator cascade. Patches the module: call it before rendering, in
    the process that renders."""
    unknown = set(keep) - set(SINGER_FACTORS)
    if unknown:
        raise ValueError(f"simplify: unknown factors {sorted(unknown)}; choose from {SINGER_FACTORS}")
    draw, equalise, time_map = choir.draw_singer, choir.equalise, choir.time_map
    spectrum, tract = choir.source_spectrum, choir.tract_response

    def draw_singer(part, singers, rng):
        singer = draw(part, singers, rng)
        voice, (ring, timing) = VOICE_DEFAULTS[part], PLAIN_RING_AND_TIMING[part]
        near = lambda value, spread: value * float(rng.uniform(1 - spread, 1 + spread))
        if "timbre" not in keep:
            singer = replace(singer, source="harmonic", open_quotient=0.6, skew=near(voice.tilt, 0.12),
                             tract_scale=near(voice.formant_scale, 0.05), bandwidth_scale=1.0, ring_db=ring,
                             brightness_db=0.0, level_db=voice.gain_db + float(rng.uniform(-3, 3)))
        if "expressive" not in keep:
            singer = replace(singer, vibrato_hz=near(voice.vibrato_hz, 0.12),
                             vibrato_cents=near(voice.vibrato_cents, 0.3),
                             vibrato_delay=0.0, glide_seconds=0.02, scoop=0.0, attack_seconds=0.035,
                             timing_seconds=timing)
        if "aperiodic" not in keep:
            singer = replace(singer, jitter_cents=0.0, shimmer_db=0.0, drift_cents=6.0, breathiness=0.01,
                             consonants=0.0)
        return singer

    def plain_equalise(part, sample_rate, brightness_db, rng):
        coloured = equalise(part, sample_rate, brightness_db, rng)  # keeps the random stream as it was
        return coloured if "eq" in keep else part

    def steady_time_map(voices, seconds_per_quarter, fermata_stretch=1.8, rubato=0.0, rng=None):
        return time_map(voices, seconds_per_quarter, fermata_stretch, rubato if "rubato" in keep else 0.0, rng)

    def pulse_spectrum(singer, harmonics):
        if singer.source == "harmonic" and pulses:
            return (np.arange(1, harmonics + 1) ** -singer.skew).astype(np.complex128)
        return spectrum(singer, harmonics)

    def parallel_formants(freqs, formants, bandwidths):
        if not parallel_tract:
            return tract(freqs, formants, bandwidths)
        # the first renderer's resonances with its "a" bandwidths, scaled to the cascade's level
        return 10 * formant_response(freqs, formants[..., :3], np.array(VOWELS["a"][1]))

    choir.draw_singer, choir.equalise, choir.time_map = draw_singer, plain_equalise, steady_time_map
    choir.source_spectrum, choir.tract_response = pulse_spectrum, parallel_formants
