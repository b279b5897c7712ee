"""Resource bounds on decoding: a small file whose header claims a tiny (or huge) sample rate, a
duration beyond the cap, or more samples than one decode may hold is refused from its header,
before anything is decoded or resampled."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.config import BuildConfig, FeatureConfig, VadConfig
from dvector.demo.synth import random_voice, utterance, write_corpus
from dvector.shards.build import build_shards
from dvector.signal import audio
from dvector.signal.audio import MAX_RATE, MIN_RATE, DecodeError, decode, resample
from dvector.signal.process import SkipUtterance, process_file


def riff_wav(path: Path, rate: int, data: bytes, channels: int = 1, claimed_bytes: int | None = None) -> Path:
    """A 16-bit PCM WAV written byte by byte; ``claimed_bytes``: what the data chunk says it holds."""
    block = 2 * channels
    size = len(data) if claimed_bytes is None else claimed_bytes
    header = b"RIFF" + struct.pack("<I", min(36 + size, 0xFFFFFFFF)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
    header += b"data" + struct.pack("<I", size)
    path.write_bytes(header + data)
    return path


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test if soundfile reads any samples (refusals must come from the header)."""
    reads: list[str] = []

    def read(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(self.name)
        raise AssertionError("samples were read")

    monkeypatch.setattr(sf.SoundFile, "read", read)
    return reads


def test_an_8_kb_wav_claiming_1_hz_is_refused_from_its_header(tmp_path: Path, no_reads: list[str]) -> None:
    """The issue's case: 4000 frames at 1 Hz are 4000 s, 64 M samples once resampled to 16 kHz."""
    path = riff_wav(tmp_path / "one_hz.wav", 1, np.zeros(4000, np.int16).tobytes())
    assert path.stat().st_size < 8200
    with pytest.raises(DecodeError, match=f"sample rate 1 Hz is outside {MIN_RATE}-{MAX_RATE} Hz"):
        decode(path)
    with pytest.raises(SkipUtterance, match="sample rate 1 Hz"):
        process_file(path, FeatureConfig(), VadConfig())
    assert no_reads == []


def test_a_header_lying_about_its_data_is_bounded(tmp_path: Path) -> None:
    """A data chunk claiming 4 GB in an 8 KB file decodes to what is there, at a sane rate."""
    path = riff_wav(tmp_path / "liar.wav", 16000, np.zeros(4000, np.int16).tobytes(), claimed_bytes=0xFFFFFFF0)
    data, rate = decode(path)
    assert rate == 16000 and data.shape[0] <= 4000


@pytest.mark.parametrize("rate", [MIN_RATE - 1, MAX_RATE + 1, 2_000_000])
def test_rates_outside_the_bounds(rate: int, tmp_path: Path, no_reads: list[str]) -> None:
    path = riff_wav(tmp_path / "odd.wav", rate, np.zeros(64, np.int16).tobytes())
    with pytest.raises(DecodeError, match=f"sample rate {rate} Hz"):
        decode(path)


def test_too_long_and_too_large_are_refused_before_decoding(tmp_path: Path, no_reads: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = riff_wav(tmp_path / "long.wav", 8000, np.zeros(6 * 16000, np.int16).tobytes(), channels=6)  # 2 s
    monkeypatch.setattr(audio, "MAX_DURATION_S", 1.0)  # the 4 h cap, made small
    with pytest.raises(DecodeError, match=r"too long: 2.0 s at 8000 Hz, more than the 1.0 s a file may hold"):
        decode(path)
    monkeypatch.setattr(audio, "MAX_DURATION_S", 3600.0)
    monkeypatch.setattr(audio, "MAX_DECODED_VALUES", 50_000)  # 16000 frames x 6 channels = 96000
    with pytest.raises(DecodeError, match="too large: 16000 frames x 6 channels"):
        decode(path)
    assert no_reads == []


def test_resampling_is_bounded_too() -> None:
    with pytest.raises(DecodeError, match="sample rate 1 Hz"):
        resample(np.zeros(4000, np.float32), 1, 16000)
    assert resample(np.zeros(4000, np.float32), 8000, 16000).shape[0] == 8000


def test_within_the_bounds_nothing_changes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    wav = utterance(random_voice(rng), 1.0, MIN_RATE * 8, rng)
    sf.write(tmp_path / "ok.wav", wav, MIN_RATE * 8)
    data, rate = decode(tmp_path / "ok.wav")
    assert rate == 8000 and data.shape == (wav.shape[0], 1)


def test_the_build_skips_and_lists_the_file(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write_corpus(root, 2, 3, seed=9, duration_s=(1.0, 1.5))
    riff_wav(root / "spk001" / "one_hz.wav", 1, np.zeros(4000, np.int16).tobytes())
    report = build_shards([str(root)], tmp_path / "shards", BuildConfig(min_shards=2, block_size=2), workers=1)
    assert [(f["source"], f["reason"]) for f in report.failures] == [
        ("spk001/one_hz.wav", f"sample rate 1 Hz is outside {MIN_RATE}-{MAX_RATE} Hz (a damaged header?)")]
    assert report.utterances_ok == 6 and report.index_written
