"""Augmentation in the training stream: batches change, resume stays exact, the user's noise and room
recordings become mel-domain sources, and bad options are one clear error."""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import pytest
import soundfile as sf
from typer.testing import CliRunner

from dvector.augment import AugmentPlan, Augmenter, RowInfo
from dvector.augment.sources import load_rooms, prepare_sources
from dvector.cli import main
from dvector.config import AUGMENT_KINDS, AugmentConfig, FeatureConfig
from dvector.errors import DvectorError
from dvector.stream.batches import BatchSettings, WorkerState, consumer_batches
from dvector.stream.loader import ge2e_loader
from dvector.stream.sources import Consumer
from dvector.training.checkpoint import load_checkpoint

N, M, L = 4, 3, 30
SMALL = ["-n", "4", "-m", "4", "-l", "40", "--model", "tiny", "-w", "0", "--threads", "1"]


def urls(shards: Path) -> list[str]:
    return sorted(str(p) for p in shards.glob("*.tar"))


def settings(augment: AugmentConfig | None, seed: int = 2) -> BatchSettings:
    plan = AugmentPlan(augment, FeatureConfig(), seed) if augment is not None else None
    return BatchSettings(N, M, L, seed=seed, augment=plan)


def batches(shards: Path, s: BatchSettings, count: int, state: WorkerState | None = None) -> list:
    return list(itertools.islice(consumer_batches(urls(shards), s, Consumer(), state, dtype=np.float32), count))


def test_augmented_batches_are_the_plain_crops_changed_and_resume_exactly(shards: Path) -> None:
    plain = batches(shards, settings(None), 24)
    augmented = batches(shards, settings(AugmentConfig(kinds=AUGMENT_KINDS)), 24)
    changed = 0
    for (a, _, _), (b, _, _) in zip(plain, augmented):
        assert np.array_equal(a.speaker_index, b.speaker_index) and np.array_equal(a.offset, b.offset)
        assert np.isfinite(b.mels).all()
        changed += int(np.sum(np.any(a.mels != b.mels, axis=(1, 2))))
    assert changed > 0.5 * 24 * N * M  # most rows get something at the default probabilities
    state = WorkerState.from_dict(augmented[19][1].to_dict())
    assert state.round >= 1
    resumed = batches(shards, settings(AugmentConfig(kinds=AUGMENT_KINDS)), 4, state)
    for (a, _, _), (b, _, _) in zip(augmented[20:], resumed):
        np.testing.assert_array_equal(a.mels, b.mels)


def test_float16_batches_are_the_float32_ones_rounded(shards: Path) -> None:
    s = settings(AugmentConfig(kinds=AUGMENT_KINDS))
    wide = batches(shards, s, 6)
    narrow = list(itertools.islice(consumer_batches(urls(shards), s, Consumer(), None, dtype=np.float16), 6))
    for (a, _, _), (b, _, _) in zip(wide, narrow):
        assert b.mels.dtype == np.float16
        np.testing.assert_array_equal(b.mels, a.mels.astype(np.float16))


def test_all_probabilities_zero_give_the_plain_batches(shards: Path) -> None:
    zero = AugmentConfig(kinds=AUGMENT_KINDS, **{f"{k}_prob": 0.0 for k in AUGMENT_KINDS})
    for (a, _, _), (b, _, _) in zip(batches(shards, settings(None), 8), batches(shards, settings(zero), 8)):
        np.testing.assert_array_equal(a.mels, b.mels)


def test_the_loader_takes_kinds_as_the_command_line_does(shards: Path) -> None:
    plain = ge2e_loader(shards, N, M, L, workers=0, seed=1)
    noisy = ge2e_loader(shards, N, M, L, workers=0, seed=1, augment="noise,reverb")
    assert noisy.settings.augment.config.kinds == ("noise", "reverb")
    assert ge2e_loader(shards, N, M, L, workers=0, augment="none").settings.augment is None
    (a, sa), (b, sb) = next(iter(plain)), next(iter(noisy))
    assert (sa == sb).all() and not bool((a == b).all())


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), rate)
    return path


def test_noise_and_room_recordings_become_mel_sources_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write_wav(tmp_path / "noise" / "hum.wav", 0.1 * np.sin(2 * np.pi * 120 * np.arange(16000) / 16000))
    write_wav(tmp_path / "noise" / "sub" / "hiss.flac", 0.05 * rng.standard_normal(24000))
    (tmp_path / "noise" / "broken.wav").write_bytes(b"RIFF....not audio")
    rt60, rate = 0.5, 16000
    t = np.arange(int(0.8 * rate)) / rate
    rir = rng.standard_normal(t.shape[0]) * np.exp(-3 * math.log(10) * t / rt60)  # amplitude: -60 dB at rt60
    rir[0] = 8.0  # the direct sound
    write_wav(tmp_path / "rooms" / "room.wav", rir / np.abs(rir).max())
    features = FeatureConfig()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = prepare_sources(str(tmp_path / "noise"), str(tmp_path / "rooms"), features, tmp_path / "cache")
    assert len(caught) == 1 and "broken.wav: skipped" in str(caught[0].message)  # one line for the bad file
    noise = np.load(paths.noise)
    assert noise.shape == (101 + 151, 40) and noise.dtype == np.float16  # both files' frames
    rooms = load_rooms(paths)
    decay = rooms[0, 0]
    expected = math.exp(-math.log(1e6) * 0.01 / rt60)
    assert np.median(decay) == pytest.approx(expected, abs=0.05)  # the fitted per-frame decay
    again = prepare_sources(str(tmp_path / "noise"), str(tmp_path / "rooms"), features, tmp_path / "cache")
    assert again == paths and len(list((tmp_path / "cache").iterdir())) == 2  # cached, not redone

    aug = Augmenter(AugmentConfig(kinds=("noise", "reverb"), noise_prob=1.0, reverb_prob=0.0), features, 3, paths)
    mels = rng.normal(-4, 1, (6, 50, 40)).astype(np.float32)
    info = RowInfo([f"k{i}" for i in range(6)], [0] * 6, [0] * 6, np.arange(6))
    out = mels.copy()
    plan = aug(out, info)
    assert (plan.noise_source == -1).all()  # the recordings, not coloured noise
    for row, snr in zip(plan.noise_rows, plan.noise_snr):
        clean = np.exp(mels[row].astype(np.float64))
        got = 10 * math.log10(clean.mean() / (np.exp(out[row].astype(np.float64)) - clean).mean())
        assert got == pytest.approx(snr, abs=0.05)


def test_a_folder_without_audio_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DvectorError, match="no audio files"):
        prepare_sources(str(tmp_path / "empty"), "", FeatureConfig(), tmp_path / "cache")
    with pytest.raises(DvectorError, match="not a folder"):
        prepare_sources("", str(tmp_path / "missing"), FeatureConfig(), tmp_path / "cache")


def test_train_records_its_augmentation_and_refuses_unknown_kinds(shards: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    result = CliRunner().invoke(__import__("dvector.cli", fromlist=["app"]).app,
                                ["train", str(shards), str(run), "-i", "3", "-s", "3", *SMALL,
                                 "--augment", "noise,specaugment", "--augment-prob", "noise=0.9", "--noise-snr", "5:10"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "augmentation: noise, specaugment" in " ".join(result.output.split())
    saved = load_checkpoint(run)["train_config"]["augment"]
    assert saved["kinds"] == ["noise", "specaugment"] or saved["kinds"] == ("noise", "specaugment")
    assert saved["noise_prob"] == 0.9 and list(saved["noise_snr"]) == [5.0, 10.0]
    for bad, said in ((["--augment", "nois"], "unknown kind"), (["--augment-prob", "noise=2"], "probability"),
                      (["--noise-snr", "9:1"], "LO <= HI")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", str(shards), str(tmp_path / "bad"), "-i", "2", *SMALL, *bad])
        err = capsys.readouterr().err
        assert exit_info.value.code != 0 and err.count("error:") == 1 and said in err and "Traceback" not in err


def test_the_loader_and_train_use_noise_folders_only_for_their_kind(shards: Path, tmp_path: Path) -> None:
    write_wav(tmp_path / "noise" / "hiss.wav", 0.05 * np.random.default_rng(1).standard_normal(32000))
    loader = ge2e_loader(shards, N, M, L, workers=0, seed=1,
                         augment=AugmentConfig(kinds=("noise",), noise_dir=str(tmp_path / "noise")))
    assert loader.settings.augment.sources.noise  # prepared (cached by content), not silently ignored
    mels, _ = next(iter(loader))
    assert bool(torch.isfinite(mels).all())
    result = CliRunner().invoke(__import__("dvector.cli", fromlist=["app"]).app,
                                ["train", str(shards), str(tmp_path / "run"), "-i", "2", "-s", "2", *SMALL,
                                 "--augment", "reverb", "--noise-dir", str(tmp_path / "noise")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--noise-dir is not used" in " ".join(result.output.split())
    assert not (tmp_path / "run" / "augment").exists()  # nothing prepared for a kind that is off
