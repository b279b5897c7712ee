"""Each augmentation kind against what it must do, on small arrays: identity at probability 0, the
SNR of the mix as drawn, masks within bounds, reverberation's decay, channel and gain as offsets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dvector.augment import Augmenter, RowInfo
from dvector.augment.reverb import fit_decay
from dvector.augment.spectra import db_to_log_power
from dvector.config import AUGMENT_KINDS, AugmentConfig, FeatureConfig, parse_augment
from dvector.errors import DvectorError

FEATURES = FeatureConfig(n_mels=24)
ROWS, L, BANDS, M = 48, 60, 24, 4


def batch(seed: int = 0) -> tuple[np.ndarray, RowInfo]:
    rng = np.random.default_rng(seed)
    mels = rng.normal(-4.0, 2.0, (ROWS, L, BANDS)).astype(np.float32)
    info = RowInfo([f"s{i // M:03d}u{i:05d}" for i in range(ROWS)], [0] * ROWS, rng.integers(0, 500, ROWS).tolist(),
                   np.repeat(np.arange(ROWS // M), M))
    return mels, info


def augmenter(**settings) -> Augmenter:
    return Augmenter(AugmentConfig(**settings), FEATURES, seed=7)


def only(kind: str, **settings) -> Augmenter:
    return augmenter(kinds=(kind,), **{f"{kind}_prob": 1.0}, **settings)


def test_every_kind_at_probability_zero_changes_nothing() -> None:
    mels, info = batch()
    out = mels.copy()
    plan = augmenter(kinds=AUGMENT_KINDS, **{f"{k}_prob": 0.0 for k in AUGMENT_KINDS})(out, info)
    assert plan.power_rows.size == 0 and plan.mask_rows.size == 0
    assert np.array_equal(out, mels)


def test_kinds_switched_off_change_nothing_even_at_probability_one() -> None:
    mels, info = batch()
    out = mels.copy()
    augmenter(kinds=(), **{f"{k}_prob": 1.0 for k in AUGMENT_KINDS})(out, info)
    assert np.array_equal(out, mels)


@pytest.mark.parametrize("prob", [0.25, 0.5])
def test_a_kind_selects_about_its_probability_of_rows(prob: float) -> None:
    rng = np.random.default_rng(1)
    n = 4000
    info = RowInfo([f"k{i}" for i in range(n)], [0] * n, rng.integers(0, 99, n).tolist(), np.arange(n) // 4)
    plan = augmenter(kinds=("gain",), gain_prob=prob).plan(info, L)
    assert abs(plan.gain_rows.size / n - prob) < 0.03


def measured_snr_db(clean: np.ndarray, mixed: np.ndarray) -> float:
    p_clean = np.exp(clean.astype(np.float64))
    return 10 * math.log10(p_clean.mean() / (np.exp(mixed.astype(np.float64)) - p_clean).mean())


@pytest.mark.parametrize("colour", ["white", "pink", "brown"])
def test_noise_is_mixed_at_the_snr_drawn(colour: str) -> None:
    mels, info = batch()
    out = mels.copy()
    plan = only("noise", noise_snr=(-5.0, 20.0), noise_colours=(colour,))(out, info)
    assert plan.noise_rows.size == ROWS
    assert plan.noise_snr.min() >= -5 and plan.noise_snr.max() <= 20 and np.ptp(plan.noise_snr) > 5
    for row, snr in zip(plan.noise_rows, plan.noise_snr):
        assert measured_snr_db(mels[row], out[row]) == pytest.approx(snr, abs=0.05)


def test_noise_colours_tilt_the_spectrum_as_named() -> None:
    mels = np.full((ROWS, L, BANDS), -30.0, np.float32)  # near silence: the mix is the noise's shape
    _, info = batch()
    slopes = {}
    for colour in ("white", "pink", "brown"):
        out = mels.copy()
        only("noise", noise_colours=(colour,))(out, info)
        band_mean = out.mean(axis=(0, 1))
        slopes[colour] = band_mean[-4:].mean() - band_mean[:4].mean()  # high bands minus low, log power
    assert slopes["white"] > slopes["pink"] > slopes["brown"]
    assert slopes["white"] > 0  # wider filters at high frequencies gather more white-noise power


def test_babble_mixes_other_speakers_at_the_snr_drawn() -> None:
    mels, info = batch()
    out = mels.copy()
    plan = only("babble", babble_speakers=(3, 7))(out, info)
    assert plan.babble_rows.size == ROWS
    for i, row in enumerate(plan.babble_rows):
        partners = plan.babble_partners[i]
        assert 1 <= partners.size <= 7 and np.unique(partners).size == partners.size
        assert not np.any(info.speakers[partners] == info.speakers[row])  # never its own speaker
        assert measured_snr_db(mels[row], out[row]) == pytest.approx(plan.babble_snr[i], abs=0.05)
    assert np.mean([p.size for p in plan.babble_partners]) >= 3  # 3-7 drawn, few duplicates among 44 rows


def test_babble_needs_another_speaker() -> None:
    mels, info = batch()
    one_speaker = info._replace(speakers=np.zeros(ROWS, np.int64))
    out = mels.copy()
    plan = only("babble")(out, one_speaker)
    assert plan.babble_rows.size == 0 and np.array_equal(out, mels)


def test_reverberation_of_an_impulse_decays_as_drawn() -> None:
    mels = np.full((ROWS, L, BANDS), math.log(1e-6), np.float32)
    mels[:, 5, :] = 0.0  # an impulse of power 1 at frame 5
    _, info = batch()
    aug = only("reverb", reverb_rt60=(0.2, 0.9), reverb_drr=(0.0, 10.0))
    out = mels.copy()
    plan = aug(out, info)
    assert plan.reverb_rows.size == ROWS
    for i, row in enumerate(plan.reverb_rows):
        response = np.exp(out[row].astype(np.float64))[5:]
        decay, gain = fit_decay(response)
        rt60 = 0.2 + plan.reverb_u[i, 0] * 0.7
        expected = math.exp(-math.log(1e6) * 0.01 / rt60)  # band 0 has the drawn RT60 (hop 10 ms)
        assert decay[0] == pytest.approx(expected, abs=0.01)
        drr_db = 10 * math.log10(1.0 / (response[1:, 0].sum()))
        assert drr_db == pytest.approx(plan.reverb_u[i, 1] * 10.0, abs=0.3)  # the tail's energy as drawn
        assert np.all(decay[-1] <= decay[0] + 1e-6)  # high bands die away faster
    assert np.array_equal(out[:, 0], mels[:, 0])  # the first frame has no past to echo
    assert np.all(out[:, 1:5] >= mels[:, 1:5])  # reverberation only adds energy


def test_channel_colouring_is_a_smooth_offset_within_its_peak() -> None:
    mels, info = batch()
    out = mels.copy()
    plan = only("channel", channel_db=6.0)(out, info)
    offset = (out - mels)[plan.channel_rows]
    assert np.allclose(offset, offset[:, :1, :], atol=1e-4)  # the same in every frame
    curve = offset[:, 0, :]
    assert np.abs(curve).max() <= db_to_log_power(6.0) + 1e-4
    # smooth: a sum of cosines of up to 3 half-periods turns at most 6 times across the bands
    turns = (np.diff(np.sign(np.diff(curve, axis=1)), axis=1) != 0).sum(1)
    assert turns.max() <= 6 and np.abs(curve).max() > 0.1


def test_gain_adds_one_level_per_row_within_range() -> None:
    mels, info = batch()
    out = mels.copy()
    plan = only("gain", gain_db=10.0)(out, info)
    offset = (out - mels)[plan.gain_rows]
    assert np.allclose(offset, offset[:, :1, :1], atol=1e-4)
    assert np.allclose(offset[:, 0, 0], db_to_log_power(plan.gain_db), atol=1e-4)
    assert np.abs(plan.gain_db).max() <= 10.0


def test_specaugment_masks_lie_within_bounds_and_hold_the_row_mean() -> None:
    mels, info = batch()
    out = mels.copy()
    plan = only("specaugment", time_masks=2, time_mask_frames=7, freq_masks=2, freq_mask_bands=5)(out, info)
    assert plan.mask_rows.size == ROWS
    for i, row in enumerate(plan.mask_rows):
        tm, fm = plan.time_masks[i], plan.freq_masks[i]
        assert np.all((0 <= tm[:, 0]) & (tm[:, 0] <= tm[:, 1]) & (tm[:, 1] <= L) & (tm[:, 1] - tm[:, 0] <= 7))
        assert np.all((0 <= fm[:, 0]) & (fm[:, 0] <= fm[:, 1]) & (fm[:, 1] <= BANDS) & (fm[:, 1] - fm[:, 0] <= 5))
        masked = np.zeros((L, BANDS), bool)
        for a, b in tm:
            masked[a:b, :] = True
        for a, b in fm:
            masked[:, a:b] = True
        assert np.array_equal(out[row][~masked], mels[row][~masked])
        if masked.any():
            assert np.allclose(out[row][masked], mels[row].mean(), atol=1e-4)


def test_a_rows_draws_depend_only_on_seed_pass_key_and_offset() -> None:
    mels, info = batch()
    kinds = ("noise", "reverb", "channel", "specaugment", "gain")  # babble reads other rows
    a = mels.copy()
    augmenter(kinds=kinds)(a, info)
    order = np.random.default_rng(3).permutation(ROWS)
    shuffled = RowInfo([info.keys[i] for i in order], [info.passes[i] for i in order],
                       [info.offsets[i] for i in order], info.speakers[order])
    b_sh = mels[order].copy()
    augmenter(kinds=kinds)(b_sh, shuffled)
    assert np.array_equal(b_sh, a[order])  # each row as it was, wherever it sits
    again = mels.copy()
    augmenter(kinds=kinds)(again, info)
    assert np.array_equal(again, a)
    next_pass = mels.copy()
    augmenter(kinds=kinds)(next_pass, info._replace(passes=[1] * ROWS))
    assert not np.array_equal(next_pass, a)
    other_seed = mels.copy()
    Augmenter(AugmentConfig(kinds=kinds), FEATURES, seed=8)(other_seed, info)
    assert not np.array_equal(other_seed, a)


def test_one_kinds_settings_never_change_anothers_draws() -> None:
    mels, info = batch()
    gain_alone = augmenter(kinds=("gain",)).plan(info, L)
    gain_with_all = augmenter(kinds=AUGMENT_KINDS, noise_prob=0.9, babble_snr=(1, 2)).plan(info, L)
    assert np.array_equal(gain_alone.gain_rows, gain_with_all.gain_rows)
    assert np.array_equal(gain_alone.gain_db, gain_with_all.gain_db)


def test_everything_at_once_stays_finite_on_float32_extremes() -> None:
    mels, info = batch()
    mels[::3] = math.log(1e-9)  # silent rows at the log floor
    mels[1::7] = 20.0  # very loud rows
    out = mels.copy()
    augmenter(kinds=AUGMENT_KINDS, **{f"{k}_prob": 1.0 for k in AUGMENT_KINDS})(out, info)
    assert np.isfinite(out).all()


def test_augment_lists_parse_with_clear_errors() -> None:
    assert parse_augment("none") == () and parse_augment("all") == AUGMENT_KINDS
    assert parse_augment("reverb,noise") == ("noise", "reverb")  # canonical order
    with pytest.raises(DvectorError, match="unknown kind.*'nois'"):
        parse_augment("nois")
    with pytest.raises(DvectorError, match="probability"):
        AugmentConfig(noise_prob=1.5)
    with pytest.raises(DvectorError, match="LO <= HI"):
        AugmentConfig(noise_snr="20:5")


def test_babble_is_the_partners_own_crops_summed() -> None:
    mels, info = batch()
    out = mels.copy()
    plan = only("babble")(out, info)
    assert plan.babble_rows.size > 0
    power = np.exp(mels.astype(np.float64))
    for i, row in enumerate(plan.babble_rows):
        crowd = sum(power[p] / power[p].mean() for p in plan.babble_partners[i])
        scale = power[row].mean() / (crowd.mean() * 10 ** (plan.babble_snr[i] / 10))
        np.testing.assert_allclose(out[row], np.log(power[row] + scale * crowd), atol=2e-3)


@pytest.mark.parametrize("speakers", [2, 3, 4])
def test_babble_reaches_batches_of_few_speakers(speakers: int) -> None:
    n = speakers * M
    rng = np.random.default_rng(speakers)
    mels = rng.normal(-4.0, 2.0, (n, L, BANDS)).astype(np.float32)
    info = RowInfo([f"k{i}" for i in range(n)], [0] * n, list(range(n)), np.repeat(np.arange(speakers), M))
    out = mels.copy()
    plan = only("babble")(out, info)
    assert plan.babble_rows.size >= n // 2  # a crowd of every speaker would fit no row
    for i, row in enumerate(plan.babble_rows):
        assert not np.any(info.speakers[plan.babble_partners[i]] == info.speakers[row])
    untouched = np.setdiff1d(np.arange(n), plan.babble_rows)
    assert np.array_equal(out[untouched], mels[untouched])


def test_coloured_noise_of_a_batch_does_not_depend_on_the_batches_before() -> None:
    mels, info = batch()
    aug = only("noise")
    first = mels.copy()
    aug(first, info)
    long_rows = np.random.default_rng(5).normal(-4.0, 2.0, (ROWS, 700, BANDS)).astype(np.float32)
    aug(long_rows, info)  # crops longer than the usual noise bank
    again = mels.copy()
    aug(again, info)
    assert np.array_equal(again, first)  # as a worker that never saw the long crops would make it


@pytest.mark.parametrize("lead", [0, 40, 80, 120])
def test_a_room_response_fit_does_not_depend_on_where_the_direct_sound_falls(lead: int) -> None:
    from dvector.augment.reverb import direct_spread
    from dvector.signal.features import log_mel

    features, rate, rt60 = FeatureConfig(), 16000, 0.5
    t = np.arange(int(0.8 * rate)) / rate
    tail = 0.1 * np.random.default_rng(0).standard_normal(t.shape[0]) * np.exp(-3 * math.log(10) * t / rt60)
    rir = np.concatenate([np.zeros(lead), tail])
    rir[lead] = 8.0  # the direct sound, ``lead`` samples into the first hop: between frame centres at 80
    envelope = np.exp(log_mel(rir / np.abs(rir).max(), features).astype(np.float64))
    decay, gain = fit_decay(envelope, spread=direct_spread(features.win_length, features.hop_length))
    expected = math.exp(-math.log(1e6) * features.hop_length / rate / rt60)
    assert np.median(decay) == pytest.approx(expected, abs=0.06)
    assert np.median(gain) < 0.05  # a weak tail (DRR ~10 dB), not the direct sound's other half
