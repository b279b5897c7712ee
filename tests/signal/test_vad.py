"""Tests for dvector.signal.vad: every numba kernel against a plain numpy twin, and trim_silence end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from dvector.config import VadConfig
from dvector.demo.synth import random_voice, speech
from dvector.signal.vad import (dilate, frame_energy_db, gather_frames, keep_mask, remove_short_runs, speech_frames,
                         track_noise_floor, trim_silence)

SR = 16000
FRAME = 160  # 10 ms at 16 kHz, the default VadConfig frame

# ---- plain numpy references -------------------------------------------------------------------


def ref_frame_energy_db(wav: np.ndarray, frame_len: int) -> np.ndarray:
    n = wav.shape[0]
    n_frames = -(-n // frame_len)
    padded = np.zeros(n_frames * frame_len, dtype=np.float64)
    padded[:n] = wav
    sums = np.square(padded).reshape(n_frames, frame_len).sum(axis=1)
    counts = np.minimum(frame_len, n - np.arange(n_frames) * frame_len)
    return 10.0 * np.log10(sums / counts + 1e-10)


def ref_noise_floor(energy: np.ndarray, initial: float, rise: float) -> np.ndarray:
    """Closed form: the floor at f is the lowest of (initial risen f+1 times) and (e[k] risen f-k times)."""
    f = np.arange(energy.shape[0], dtype=np.float64)
    from_energy = np.minimum.accumulate(energy.astype(np.float64) - f * rise) + f * rise
    return np.minimum(initial + (f + 1) * rise, from_energy)


def runs_of(mask: np.ndarray, value: bool = True) -> list[tuple[int, int]]:
    """[start, stop) of every maximal run of ``value``."""
    m = np.concatenate([[0], (np.asarray(mask) == value).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(m))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def ref_remove_short_runs(mask: np.ndarray, min_len: int) -> np.ndarray:
    out = mask.copy()
    for start, stop in runs_of(mask):
        if stop - start < min_len:
            out[start:stop] = False
    return out


def ref_dilate(mask: np.ndarray, before: int, after: int) -> np.ndarray:
    n = mask.shape[0]
    if n == 0:
        return mask.copy()
    # out[f] is True when some mask[g] is True with f - after <= g <= f + before
    conv = np.convolve(mask.astype(np.int64), np.ones(before + after + 1, dtype=np.int64))
    return conv[before:before + n] > 0


def ref_keep_mask(speech: np.ndarray, max_pause: int) -> np.ndarray:
    out = np.zeros_like(speech)
    idx = np.flatnonzero(speech)
    if idx.size == 0:
        return out
    first, last = idx[0], idx[-1]
    out[speech] = True
    for start, stop in runs_of(speech[first:last + 1], value=False):
        out[first + start:first + start + min(stop - start, max_pause)] = True
    return out


def ref_gather(wav: np.ndarray, keep: np.ndarray, frame_len: int) -> np.ndarray:
    return wav[np.repeat(keep, frame_len)[:wav.shape[0]]]


# ---- kernels against references -----------------------------------------------------------------

bool_masks = arrays(np.bool_, st.integers(0, 300))


@settings(max_examples=150, deadline=None)
@given(wav=arrays(np.float32, st.integers(1, 3000), elements=st.floats(-1, 1, width=32)),
       frame_len=st.integers(1, 400))
def test_frame_energy_db_matches_reference(wav: np.ndarray, frame_len: int) -> None:
    got = frame_energy_db(wav, frame_len)
    assert got.dtype == np.float32
    assert got.shape == (-(-wav.shape[0] // frame_len),)
    np.testing.assert_allclose(got, ref_frame_energy_db(wav, frame_len), atol=1e-3, rtol=1e-5)


def test_remove_dc_measures_each_frame_around_its_mean() -> None:
    wav = np.concatenate([np.full(160, 0.5), 0.5 + np.tile([0.1, -0.1], 80)]).astype(np.float32)
    np.testing.assert_allclose(frame_energy_db(wav, 160, True), [-100.0, 10 * np.log10(0.01)], atol=1e-3)
    np.testing.assert_allclose(frame_energy_db(wav, 160), [10 * np.log10(0.25), 10 * np.log10(0.26)], atol=1e-3)


def test_a_dc_offset_hides_speech_unless_removed() -> None:
    """A recorder's DC offset louder than the speech (audiomnist's): the plain energy VAD keeps it all,
    ``remove_dc`` trims as it would without the offset."""
    rng = np.random.default_rng(5)
    clean = np.concatenate([quiet(40, rng), tone(50), quiet(40, rng)]) * np.float32(0.1)
    offset = (clean - np.float32(0.08)).astype(np.float32)
    plain = VadConfig(max_pause_ms=0.0)
    assert speech_frames(offset, 16000, plain)[0].all()  # every frame reads as loud as the offset
    without = speech_frames(clean, 16000, plain)[0]
    assert not without.all()
    assert np.array_equal(speech_frames(offset, 16000, VadConfig(max_pause_ms=0.0, remove_dc=True))[0], without)


def test_frame_energy_db_known_values() -> None:
    wav = np.concatenate([np.full(160, 0.5), np.zeros(160), np.full(80, 1.0)]).astype(np.float32)
    got = frame_energy_db(wav, 160)
    # 0.25 mean square -> -6.02 dB; silence -> the 1e-10 floor (-100 dB); the partial last frame counts
    np.testing.assert_allclose(got, [10 * np.log10(0.25), -100.0, 0.0], atol=1e-4)
    assert frame_energy_db(np.zeros(0, np.float32), 160).shape == (0,)


@settings(max_examples=150, deadline=None)
@given(energy=arrays(np.float32, st.integers(0, 300), elements=st.floats(-100, 0, width=32)),
       initial=st.floats(-100, 0, width=32), rise=st.floats(0, 2, width=32))
def test_track_noise_floor_matches_reference(energy: np.ndarray, initial: float, rise: float) -> None:
    got = track_noise_floor(energy, np.float32(initial), np.float32(rise))
    assert got.shape == energy.shape
    np.testing.assert_allclose(got, ref_noise_floor(energy, initial, rise), atol=0.02)
    assert np.all(got <= energy + 1e-4)  # the floor never lies above the signal


def test_track_noise_floor_follows_drops_and_rises_slowly() -> None:
    energy = np.array([-60, -60, -20, -20, -20, -70, -70], dtype=np.float32)
    got = track_noise_floor(energy, np.float32(-60.0), np.float32(1.0))
    np.testing.assert_allclose(got, [-60, -60, -59, -58, -57, -70, -70])


@settings(max_examples=200, deadline=None)
@given(mask=bool_masks, min_len=st.integers(0, 20))
def test_remove_short_runs_matches_reference(mask: np.ndarray, min_len: int) -> None:
    got = remove_short_runs(mask, min_len)
    np.testing.assert_array_equal(got, ref_remove_short_runs(mask, min_len))
    assert all(stop - start >= min_len for start, stop in runs_of(got))


def test_remove_short_runs_example() -> None:
    mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=bool)
    np.testing.assert_array_equal(remove_short_runs(mask, 3), [0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(remove_short_runs(mask, 0), mask)  # does not modify its input either


@settings(max_examples=200, deadline=None)
@given(mask=bool_masks, before=st.integers(0, 12), after=st.integers(0, 12))
def test_dilate_matches_reference(mask: np.ndarray, before: int, after: int) -> None:
    got = dilate(mask, before, after)
    np.testing.assert_array_equal(got, ref_dilate(mask, before, after))
    assert np.all(got[mask])  # dilation keeps every original frame


def test_dilate_example() -> None:
    mask = np.zeros(12, dtype=bool)
    mask[5] = True
    np.testing.assert_array_equal(np.flatnonzero(dilate(mask, 2, 3)), [3, 4, 5, 6, 7, 8])
    mask[:] = False
    mask[0] = mask[11] = True
    np.testing.assert_array_equal(np.flatnonzero(dilate(mask, 2, 3)), [0, 1, 2, 3, 9, 10, 11])


@settings(max_examples=200, deadline=None)
@given(mask=bool_masks, max_pause=st.integers(0, 20))
def test_keep_mask_matches_reference(mask: np.ndarray, max_pause: int) -> None:
    got = keep_mask(mask, max_pause)
    np.testing.assert_array_equal(got, ref_keep_mask(mask, max_pause))
    kept_gaps = [stop - start for start, stop in runs_of(got, value=False)
                 if got[:start].any() and got[stop:].any()]
    assert all(g > 0 for g in kept_gaps)
    if mask.any():  # nothing before the first or after the last speech frame
        idx = np.flatnonzero(mask)
        assert not got[:idx[0]].any() and not got[idx[-1] + 1:].any()
    else:
        assert not got.any()


def test_keep_mask_example() -> None:
    speech = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0], dtype=bool)
    np.testing.assert_array_equal(keep_mask(speech, 2).astype(int), [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0])


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(0, 2000), frame_len=st.integers(1, 300))
def test_gather_frames_matches_reference(data: st.DataObject, n: int, frame_len: int) -> None:
    wav = np.arange(n, dtype=np.float32)  # every sample distinct, so order and identity are checked
    keep = data.draw(arrays(np.bool_, -(-n // frame_len)))
    got = gather_frames(wav, keep, frame_len)
    np.testing.assert_array_equal(got, ref_gather(wav, keep, frame_len))
    assert got.dtype == np.float32


# ---- trim_silence ------------------------------------------------------------------------------

def tone(n_frames: int, amp: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(n_frames * FRAME) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def quiet(n_frames: int, rng: np.random.Generator, level_db: float = -70.0) -> np.ndarray:
    return (10 ** (level_db / 20) * rng.standard_normal(n_frames * FRAME)).astype(np.float32)


def test_trim_silence_exact_on_frame_aligned_bursts() -> None:
    """Two tone bursts in quiet: edges cut to preroll/hangover, the long pause cut to max_pause_ms."""
    rng = np.random.default_rng(0)
    cfg = VadConfig()  # 10 ms frames: preroll 5, hangover 15, max pause 30 frames
    wav = np.concatenate([quiet(50, rng), tone(100), quiet(150, rng), tone(100), quiet(50, rng)])
    out, kept = trim_silence(wav, SR, cfg)
    # speech frames 50..149 and 300..399, dilated to 45..164 and 295..414; the 130-frame pause
    # between them keeps its first 30 frames (165..194)
    expected = np.concatenate([wav[45 * FRAME:195 * FRAME], wav[295 * FRAME:415 * FRAME]])
    np.testing.assert_array_equal(out, expected)
    assert kept == pytest.approx(expected.shape[0] / wav.shape[0])


def test_trim_silence_keeps_synthetic_speech_and_cuts_edges() -> None:
    rng = np.random.default_rng(1)
    voice = random_voice(rng)
    body = [speech(voice, 1.2, SR, rng), speech(voice, 1.0, SR, rng)]
    pause_s, edge_s = 1.5, 0.8
    noise = lambda seconds: (10 ** (-60 / 20) * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    wav = np.concatenate([noise(edge_s), body[0], noise(pause_s), body[1], noise(edge_s)])
    cfg = VadConfig()
    out, kept = trim_silence(wav, SR, cfg)
    speech_samples = sum(b.shape[0] for b in body)
    energy = lambda x: float(np.sum(np.square(x, dtype=np.float64)))
    assert energy(out) > 0.99 * energy(wav), "speech energy was cut"
    # at most: the speech, preroll and hangover around each of the 2 segments, and one shortened pause
    # (plus internal pauses of the synthetic speech itself, each at most 0.35 s but counted as speech)
    slack = 2 * (cfg.preroll_ms + cfg.hangover_ms) / 1000 + cfg.max_pause_ms / 1000 + 0.05
    assert out.shape[0] <= speech_samples + slack * SR
    assert out.shape[0] < wav.shape[0] - (2 * edge_s + pause_s - slack) * SR
    assert out.shape[0] >= 0.9 * speech_samples
    assert kept == pytest.approx(out.shape[0] / wav.shape[0])


def test_trim_silence_long_pause_is_shortened_to_max_pause() -> None:
    rng = np.random.default_rng(2)
    for max_pause_ms in (0.0, 100.0, 500.0):
        cfg = VadConfig(max_pause_ms=max_pause_ms, preroll_ms=0, hangover_ms=0)
        wav = np.concatenate([quiet(20, rng), tone(40), quiet(120, rng), tone(40), quiet(20, rng)])
        out, _ = trim_silence(wav, SR, cfg)
        assert out.shape[0] == (80 + int(max_pause_ms / 10)) * FRAME


def test_trim_silence_drops_bursts_shorter_than_min_speech() -> None:
    rng = np.random.default_rng(3)
    cfg = VadConfig(min_speech_ms=60)
    click = np.concatenate([quiet(100, rng), tone(3), quiet(100, rng)])  # 30 ms burst
    out, kept = trim_silence(click, SR, cfg)
    assert out.shape[0] == 0 and kept == 0.0
    longer = np.concatenate([quiet(100, rng), tone(8), quiet(100, rng)])  # 80 ms burst
    assert trim_silence(longer, SR, cfg)[0].shape[0] > 0


def test_trim_silence_follows_a_steady_noise_floor() -> None:
    """Speech over noise louder than min_level_db: the adaptive floor still separates them."""
    rng = np.random.default_rng(4)
    wav = np.concatenate([quiet(100, rng, -30.0), tone(60, amp=0.5), quiet(100, rng, -30.0)])
    wav[100 * FRAME:160 * FRAME] += quiet(60, rng, -30.0)
    out, kept = trim_silence(wav, SR, VadConfig())
    assert 60 * FRAME <= out.shape[0] <= (60 + 5 + 15) * FRAME
    assert 0 < kept < 0.5


def test_trim_silence_all_zero_gives_empty() -> None:
    out, kept = trim_silence(np.zeros(SR, np.float32), SR, VadConfig())
    assert out.shape == (0,) and kept == 0.0


def test_trim_silence_disabled_returns_input() -> None:
    wav = np.concatenate([np.zeros(8000), tone(50)]).astype(np.float32)
    out, kept = trim_silence(wav, SR, VadConfig(enabled=False))
    assert out is wav and kept == 1.0


def test_trim_silence_empty_input() -> None:
    out, kept = trim_silence(np.zeros(0, np.float32), SR, VadConfig())
    assert out.shape == (0,) and kept == 1.0


def test_speech_frames_rejects_multichannel() -> None:
    with pytest.raises(ValueError, match="mono"):
        speech_frames(np.zeros((100, 2), np.float32), SR, VadConfig())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 20000), rate=st.sampled_from([8000, 16000, 22050]))
def test_trim_silence_output_is_the_kept_frames(seed: int, n: int, rate: int) -> None:
    """On any input, the output is exactly the frames of speech_frames' mask, in order."""
    rng = np.random.default_rng(seed)
    wav = (rng.standard_normal(n) * rng.choice([1e-4, 0.3], size=n)).astype(np.float32)
    cfg = VadConfig()
    keep, frame_len = speech_frames(wav, rate, cfg)
    out, kept = trim_silence(wav, rate, cfg)
    assert keep.shape == (-(-n // frame_len),)
    np.testing.assert_array_equal(out, ref_gather(wav, keep, frame_len))
    assert 0.0 <= kept <= 1.0


def test_warm_up_loads_every_kernel() -> None:
    from dvector.signal.vad import warm_up

    warm_up()
    for kernel in (frame_energy_db, track_noise_floor, remove_short_runs, dilate, keep_mask, gather_frames):
        assert kernel.signatures, f"{kernel.__name__} was not compiled by warm_up"


def test_noisy_recording_lowers_the_threshold_and_keeps_the_speech():
    """Speech a few dB above loud steady noise: a fixed 12 dB threshold would find nothing."""
    rng = np.random.default_rng(5)
    sr = 16000
    noise = (0.05 * rng.standard_normal(3 * sr)).astype(np.float32)  # about -26 dBFS
    t = np.arange(sr) / sr
    speech = np.zeros(3 * sr, dtype=np.float32)
    speech[sr:2 * sr] = 0.12 * np.sin(2 * np.pi * 180 * t)  # ~8 dB above the noise
    trimmed, kept = trim_silence(noise + speech, sr, VadConfig())
    assert 0.3 < kept < 0.6, kept  # the loud second and its margins, not the noise around it


def test_steady_audible_recording_is_kept_whole_but_silence_is_not():
    rng = np.random.default_rng(6)
    steady = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    assert trim_silence(steady, 16000, VadConfig())[1] == 1.0
    quiet = (1e-5 * rng.standard_normal(16000)).astype(np.float32)  # below min_level_db
    assert trim_silence(quiet, 16000, VadConfig())[0].size == 0
