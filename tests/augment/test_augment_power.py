"""Every augmentation kind on mel-power features (``compression="none"``, Resemblyzer's front end) is the
power-domain counterpart of what it does on log-mels: a row P it changes becomes
``exp(A(log(max(P, log_floor))))``, A being the log-mel augmentation with the same seed and draws.

Tolerance: the two ways differ only in float32 rounding. The power way floors P where the log way takes
``exp(log(.))`` of it, and the mixed power goes through one ``log``/``exp`` fewer; each ``exp(log(x))``
round trip is off by about ``|log x| * 2**-24`` relative (at most ~25 * 6e-8 = 1.5e-6 over the range of
float16 mel power and the floor), and the mixing kernel sums a few such terms: measured below 2.1e-6,
so ``rtol=1e-5`` (``atol=0``: the values span 1e-11 to 1e6 and are compared relative to themselves).
Offsets and masks run the very same operations either way (the difference is 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dvector.augment import Augmenter, RowInfo
from dvector.augment.plan import BatchPlan
from dvector.augment.sources import SourcePaths, load_noise, load_rooms, prepare_sources
from dvector.config import AUGMENT_KINDS, AugmentConfig, BuildConfig, FeatureConfig
from dvector.demo.synth import write_corpus
from dvector.shards.build import build_shards
from dvector.signal.features import log_mel
from dvector.stream.loader import ge2e_loader

POWER = FeatureConfig.preset("resemblyzer", n_mels=24)  # slaney mels of power, zero padding
LOG = replace(POWER, compression="log")  # the same front end, log-compressed
FLOOR = np.float32(POWER.log_floor)
ROWS, L, BANDS, M = 48, 60, 24, 4
RTOL = 1e-5  # see the module doc
F16_TINY = float(np.float16(2.0 ** -24))  # float16's smallest subnormal


def power_batch(seed: int = 0) -> tuple[np.ndarray, RowInfo]:
    """Mel power as float16 shards hold it, read as float32: Resemblyzer's range (1e-6 to ~50 in speech),
    quieter values down to float16 subnormals, exact zeros (underflow, zero padding) and float16's largest."""
    rng = np.random.default_rng(seed)
    power = np.exp(rng.uniform(math.log(1e-8), math.log(50.0), (ROWS, L, BANDS)))
    power[0, :12] = 0.0  # a stretch of digital silence
    power[3] = 0.0  # a silent row
    power[6, :, :3] = F16_TINY
    power[9, 20:25] = 65504.0  # float16's largest
    power[rng.random(power.shape) < 0.02] = 0.0
    mels = power.astype(np.float16).astype(np.float32)
    info = RowInfo([f"s{i // M:03d}u{i:05d}" for i in range(ROWS)], [0] * ROWS, rng.integers(0, 500, ROWS).tolist(),
                   np.repeat(np.arange(ROWS // M), M))
    return mels, info


def log_of(power: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(power, FLOOR))


def changed_rows(plan: BatchPlan) -> np.ndarray:
    return np.union1d(np.union1d(plan.power_rows, plan.channel_rows), np.union1d(plan.gain_rows, plan.mask_rows))


def both_ways(config: AugmentConfig, mels: np.ndarray, info: RowInfo, sources: SourcePaths = SourcePaths(),
              seed: int = 5) -> tuple[np.ndarray, np.ndarray, BatchPlan]:
    """(the power crops augmented, exp of their log augmented, the plan): same seed, same draws."""
    power = mels.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0), overflow or invalid value on the way
        plan = Augmenter(config, POWER, seed, sources)(power, info)
        logs = log_of(mels)
        log_plan = Augmenter(config, LOG, seed, sources)(logs, info)
        expected = np.exp(logs)
    for name in ("noise_rows", "babble_rows", "reverb_rows", "channel_rows", "gain_rows", "mask_rows"):
        assert np.array_equal(getattr(plan, name), getattr(log_plan, name))  # draws do not see the compression
    return power, expected, plan


def assert_counterpart(mels: np.ndarray, power: np.ndarray, expected: np.ndarray, plan: BatchPlan) -> None:
    rows = changed_rows(plan)
    assert rows.size > 0
    assert np.isfinite(power).all() and (power >= 0).all()
    np.testing.assert_allclose(power[rows], expected[rows], rtol=RTOL, atol=0)
    untouched = np.setdiff1d(np.arange(mels.shape[0]), rows)
    assert np.array_equal(power[untouched], mels[untouched])  # as they were, zeros included


@pytest.mark.parametrize("kinds", [(k,) for k in AUGMENT_KINDS] + [AUGMENT_KINDS], ids=lambda k: "+".join(k))
def test_each_kind_on_mel_power_is_exp_of_it_on_the_log(kinds: tuple[str, ...]) -> None:
    mels, info = power_batch()
    config = AugmentConfig(kinds=kinds, **{f"{k}_prob": 0.8 for k in AUGMENT_KINDS}, time_masks=2, freq_masks=2)
    power, expected, plan = both_ways(config, mels, info)
    assert_counterpart(mels, power, expected, plan)


def test_noise_is_mixed_at_the_snr_drawn_in_the_power_itself() -> None:
    mels, info = power_batch(1)
    power, _, plan = both_ways(AugmentConfig(kinds=("noise",), noise_prob=1.0, noise_snr=(-5.0, 20.0)), mels, info)
    assert plan.noise_rows.size == ROWS
    for row, snr in zip(plan.noise_rows, plan.noise_snr):
        clean = np.maximum(mels[row], FLOOR).astype(np.float64)
        got = 10 * math.log10(clean.mean() / (power[row].astype(np.float64) - clean).mean())
        assert got == pytest.approx(snr, abs=0.05)


def test_gain_and_channel_multiply_the_power() -> None:
    mels, info = power_batch(2)
    power, _, plan = both_ways(AugmentConfig(kinds=("gain",), gain_prob=1.0), mels, info)
    for row, db in zip(plan.gain_rows, plan.gain_db):
        live = mels[row] >= FLOOR
        np.testing.assert_allclose(power[row][live] / mels[row][live], 10 ** (db / 10), rtol=RTOL)
        np.testing.assert_allclose(power[row][~live], FLOOR * 10 ** (db / 10), rtol=RTOL)  # zeros: from the floor
    power, _, plan = both_ways(AugmentConfig(kinds=("channel",), channel_prob=1.0, channel_db=6.0), mels, info)
    ratio = power[plan.channel_rows] / np.maximum(mels[plan.channel_rows], FLOOR)
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :], ratio.shape), rtol=RTOL)  # per band, every frame
    assert ratio.max() <= 10 ** 0.6 * (1 + RTOL) and ratio.min() >= 10 ** -0.6 * (1 - RTOL) and np.ptp(ratio) > 0.1


def test_specaugment_masks_hold_the_power_of_the_rows_mean_log_mel() -> None:
    mels, info = power_batch(3)
    config = AugmentConfig(kinds=("specaugment",), specaugment_prob=1.0, time_masks=2, time_mask_frames=7,
                           freq_masks=2, freq_mask_bands=5)
    power, _, plan = both_ways(config, mels, info)
    assert plan.mask_rows.size == ROWS
    for i, row in enumerate(plan.mask_rows):
        masked = np.zeros((L, BANDS), bool)
        for a, b in plan.time_masks[i]:
            masked[a:b, :] = True
        for a, b in plan.freq_masks[i]:
            masked[:, a:b] = True
        if masked.any():  # the log-mel fill (the row's mean log) is the geometric mean of the floored power
            mean_log = log_of(mels[row]).astype(np.float64).mean()
            # compared as logs: the kernel's mean is a float32 sum of L x BANDS logs, within ~1e-5 of
            # float64's relative to it (2e-4 at the floor's -20.7), the same on log-mels
            np.testing.assert_allclose(np.log(power[row][masked]), mean_log, rtol=1e-4)
        # elsewhere the row's power as it was (zeros at the floor: the row went through its log)
        np.testing.assert_allclose(power[row][~masked], np.maximum(mels[row], FLOOR)[~masked], rtol=RTOL)


def test_float16_extremes_stay_finite_and_non_negative() -> None:
    mels = np.zeros((ROWS, L, BANDS), np.float32)  # all silent...
    mels[1::4] = 65504.0  # ...or as loud as float16 holds
    mels[2::4] = F16_TINY
    _, info = power_batch()
    config = AugmentConfig(kinds=AUGMENT_KINDS, **{f"{k}_prob": 1.0 for k in AUGMENT_KINDS}, gain_db=20.0)
    power, expected, plan = both_ways(config, mels, info)
    assert_counterpart(mels, power, expected, plan)
    assert power.min() > 0  # every row changed: zeros lifted to the floor (times any gain)


# ---- the user's recordings: sources made with the run's front end ----

def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), rate)
    return path


def recordings(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    write_wav(folder / "noise" / "hiss.wav", 0.05 * rng.standard_normal(24000))
    write_wav(folder / "noise" / "hum.flac", 0.1 * np.sin(2 * np.pi * 120 * np.arange(16000) / 16000))
    rate, rt60 = 16000, 0.5
    t = np.arange(int(0.8 * rate)) / rate
    rir = rng.standard_normal(t.shape[0]) * np.exp(-3 * math.log(10) * t / rt60)
    rir[0] = 8.0
    write_wav(folder / "rooms" / "room.wav", rir / np.abs(rir).max())
    return folder / "noise", folder / "rooms"


def test_recorded_sources_are_the_log_mels_of_the_runs_front_end(tmp_path: Path) -> None:
    noise_dir, rir_dir = recordings(tmp_path)
    paths = prepare_sources(str(noise_dir), str(rir_dir), POWER, tmp_path / "cache")
    noise = load_noise(paths)
    hiss = sf.read(noise_dir / "hiss.wav", dtype="float32")[0]
    mel_power = log_mel(hiss, POWER)  # the run's front end: slaney, zero padding, power
    first = noise[:mel_power.shape[0]].astype(np.float32)
    np.testing.assert_allclose(first, log_of(mel_power).astype(np.float16).astype(np.float32), rtol=0, atol=0)
    rooms = load_rooms(paths)
    assert np.isfinite(rooms).all() and np.median(rooms[0, 0]) == pytest.approx(math.exp(-math.log(1e6) * 0.01 / 0.5),
                                                                                abs=0.05)
    # the log features of the same settings make the very same sources (one cache for both)
    assert prepare_sources(str(noise_dir), str(rir_dir), LOG, tmp_path / "cache") == paths
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_noise_and_room_recordings_on_mel_power_are_exp_of_them_on_the_log(tmp_path: Path) -> None:
    noise_dir, rir_dir = recordings(tmp_path)
    paths = prepare_sources(str(noise_dir), str(rir_dir), POWER, tmp_path / "cache")
    mels, info = power_batch(4)
    config = AugmentConfig(kinds=("noise", "reverb"), noise_prob=0.7, reverb_prob=0.7, noise_dir=str(noise_dir),
                           rir_dir=str(rir_dir))
    power, expected, plan = both_ways(config, mels, info, paths)
    assert (plan.noise_source == -1).all() and plan.noise_rows.size and plan.reverb_rows.size
    assert_counterpart(mels, power, expected, plan)


# ---- end to end: shards of Resemblyzer's features, a training loader over them ----

@pytest.fixture(scope="module")
def power_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("power_shards")
    write_corpus(base / "corpus", 6, 4, seed=3, duration_s=(1.0, 1.5))
    cfg = BuildConfig(min_shards=2, block_size=4, features=FeatureConfig.preset("resemblyzer"))
    build_shards([str(base / "corpus")], base / "shards", cfg, workers=1)
    return base / "shards"


def test_a_training_loader_over_resemblyzer_shards_yields_finite_augmented_power(power_shards: Path,
                                                                                   tmp_path: Path) -> None:
    noise_dir, rir_dir = recordings(tmp_path)
    config = AugmentConfig(kinds=AUGMENT_KINDS, **{f"{k}_prob": 0.8 for k in AUGMENT_KINDS},
                           noise_dir=str(noise_dir), rir_dir=str(rir_dir))
    plain = ge2e_loader(power_shards, 3, 2, 40, workers=0, seed=1)
    noisy = ge2e_loader(power_shards, 3, 2, 40, workers=0, seed=1, augment=config)
    assert noisy.settings.augment.features == FeatureConfig.preset("resemblyzer")  # the shards' front end
    assert noisy.settings.augment.sources.noise and noisy.settings.augment.sources.rooms
    changed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for (a, sa), (b, sb) in zip(_take(plain, 4), _take(noisy, 4)):
            assert torch.equal(sa, sb) and bool(torch.isfinite(b).all()) and bool((b >= 0).all())
            assert float(a.min()) >= 0  # mel power, not log-mels
            changed += int((a != b).flatten(1).any(1).sum())
    assert changed > 0.5 * 4 * 6


def _take(loader, count: int) -> list:  # noqa: ANN001
    out = []
    for item in loader:
        out.append(item)
        if len(out) == count:
            break
    return out
