"""Non-finite features are refused when building: finite audio of huge amplitude overflows the
power spectrum into Inf and NaN, and log-mels beyond float16's range become Inf when stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.demo.synth import random_voice, utterance, write_corpus
from dvector.shards.build import build_shards
from dvector.shards.reader import iter_shard
from dvector.signal import process
from dvector.signal.process import SkipUtterance, process_file

RATE = 16000


def huge_float_wav(path: Path, amplitude: float = 1e20) -> Path:
    """A float WAV of speech-like audio, every sample finite but of huge amplitude."""
    rng = np.random.default_rng(3)
    wav = utterance(random_voice(rng), 1.5, RATE, rng) * amplitude
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wav.astype(np.float32), RATE, subtype="FLOAT")
    return path


def test_huge_finite_audio_is_skipped_not_stored_as_nan(tmp_path: Path) -> None:
    path = huge_float_wav(tmp_path / "huge.wav")
    data, _ = sf.read(path, dtype="float32")
    assert np.all(np.isfinite(data))  # the audio check alone lets it through
    for vad in (VadConfig(), VadConfig(enabled=False)):
        with pytest.raises(SkipUtterance, match="non-finite features"):
            process_file(path, FeatureConfig(), vad)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 1e5])  # 1e5: finite in float32, Inf in float16
def test_one_bad_value_from_log_mel_is_skipped(value: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    path = tmp_path / "ok.wav"
    sf.write(path, utterance(random_voice(rng), 1.5, RATE, rng), RATE)
    real_log_mel = process.log_mel

    def poisoned(wav: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
        mel = real_log_mel(wav, cfg)
        mel[len(mel) // 2, 3] = value
        return mel

    monkeypatch.setattr(process, "log_mel", poisoned)
    with pytest.raises(SkipUtterance, match=r"non-finite features: 1 of \d+ log-mel values"):
        process_file(path, FeatureConfig(), VadConfig())


def test_build_skips_and_lists_the_file_and_stores_only_finite_mels(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write_corpus(root, 2, 3, seed=9, duration_s=(1.0, 1.5))
    huge_float_wav(root / "spk000" / "huge.wav")
    out = tmp_path / "shards"
    report = build_shards([str(root)], out, BuildConfig(min_shards=2, block_size=2), workers=1)
    assert [(f["source"], f["reason"].split(":")[0]) for f in report.failures] == [
        ("spk000/huge.wav", "non-finite features")]
    assert report.utterances_ok == 6
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["failures"] == 1
    for shard in index["shards"]:
        for sample in iter_shard(str(out / shard["name"])):
            assert np.all(np.isfinite(sample["mel"]))
