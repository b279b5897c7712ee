"""Reliability item 3: a long file through the front end in bounded memory. A file longer than
``LONG_FILE_S`` is read in blocks (``dvector.signal.blocks``) and gives the features of the whole-file
path but for rounding, the same reasons when it gives none, and holds a few blocks of audio at a time
instead of the whole file. The threshold and the block are made small here, so that seconds of audio
stand for hours; memory is measured by allocation (tracemalloc), not by time."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.config import FeatureConfig, VadConfig
from dvector.demo.synth import random_voice, utterance
from dvector.signal import features as features_module
from dvector.signal import process
from dvector.signal.blocks import MelStream, exact_blocks
from dvector.signal.features import log_mel
from dvector.signal.process import SkipUtterance, process_file


def talk(path: Path, seconds: float, rate: int = 16000, channels: int = 1, seed: int = 0) -> Path:
    """Speech-like audio: voices in turns with pauses, ``seconds`` long."""
    rng = np.random.default_rng(seed)
    parts, held = [], 0
    while held < seconds * rate:
        parts.append(utterance(random_voice(rng), float(rng.uniform(1.5, 3.0)), rate, rng))
        parts.append(np.zeros(int(rng.uniform(0.1, 1.5) * rate), np.float32))
        held += parts[-2].shape[0] + parts[-1].shape[0]
    wav = np.concatenate(parts)[: int(seconds * rate)]
    sf.write(path, np.stack([wav * (1 - 0.3 * c) for c in range(channels)], axis=1), rate)
    return path


def both_ways(path: Path, features: FeatureConfig, vad: VadConfig, speed: float = 1.0,
              monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[process.Processed, process.Processed]:
    """The whole-file path's result and the block path's (threshold 1 s, blocks of 0.73 s)."""
    assert monkeypatch is not None
    monkeypatch.setattr(process, "LONG_FILE_S", float("inf"))
    whole = process_file(path, features, vad, speed)
    monkeypatch.setattr(process, "LONG_FILE_S", 1.0)
    monkeypatch.setattr(process, "BLOCK_S", 0.73)
    return whole, process_file(path, features, vad, speed)


def same_but_rounding(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes, values within one float16 step (the block path sums some things in another order)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    return a.shape == b.shape and bool(np.all(np.abs(a32 - b32) <= 2.0 ** -9 * np.maximum(1.0, np.abs(a32))))


@pytest.mark.parametrize("case", ["default", "stereo 22.05 kHz", "speed 0.9", "level raised", "no VAD",
                                  "resemblyzer"])
def test_a_long_file_in_blocks_gives_the_whole_files_features(tmp_path: Path, case: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rate, channels = (22050, 2) if case == "stereo 22.05 kHz" else (16000, 1)
    path = talk(tmp_path / "long.wav", 12.0, rate, channels)
    features = {"level raised": FeatureConfig(raise_to_dbfs=-15.0),
                "resemblyzer": FeatureConfig.preset("resemblyzer")}.get(case, FeatureConfig())
    vad = VadConfig(enabled=case != "no VAD")
    whole, blocks = both_ways(path, features, vad, 0.9 if case == "speed 0.9" else 1.0, monkeypatch)
    assert same_but_rounding(whole.mel, blocks.mel), np.abs(whole.mel.astype(float) - blocks.mel).max()
    assert blocks.mel.dtype == np.float16 and blocks.duration_s == pytest.approx(whole.duration_s, abs=1e-9)
    assert blocks.vad_kept == pytest.approx(whole.vad_kept, abs=1e-9) and blocks.input_rate == whole.input_rate
    assert set(blocks.seconds) == {"decode", "resample", "vad", "features"}


def test_a_long_file_gives_the_same_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sf.write(tmp_path / "silence.wav", np.zeros(16000 * 3, np.float32), 16000)
    nan = np.full(16000 * 3, 0.1, np.float32)
    nan[20000] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    monkeypatch.setattr(process, "LONG_FILE_S", 1.0)
    monkeypatch.setattr(process, "BLOCK_S", 0.5)
    with pytest.raises(SkipUtterance, match="empty after VAD: no speech found"):
        process_file(tmp_path / "silence.wav", FeatureConfig(), VadConfig())
    with pytest.raises(SkipUtterance, match="audio holds NaN or infinite samples"):
        process_file(tmp_path / "nan.wav", FeatureConfig(), VadConfig())


def test_a_long_file_holds_a_few_blocks_not_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak allocation besides the output (float16 features), for a file and one twice as long: the
    block path's stays far below the decoded file and does not grow with it; the whole-file path's
    takes several times the decoded file."""
    from dvector.signal import audio

    monkeypatch.setattr(audio, "BLOCK_FRAMES", 8000)  # half a second read at a time
    monkeypatch.setattr(process, "BLOCK_S", 1.0)

    def peak(path: Path, long_file_s: float) -> int:
        monkeypatch.setattr(process, "LONG_FILE_S", long_file_s)
        process_file(path, FeatureConfig(), VadConfig())  # warm: caches, kernels
        tracemalloc.start()
        try:
            result = process_file(path, FeatureConfig(), VadConfig())
            return tracemalloc.get_traced_memory()[1] - result.mel.nbytes
        finally:
            tracemalloc.stop()

    short, long = talk(tmp_path / "short.wav", 30.0), talk(tmp_path / "long.wav", 60.0)
    decoded = 30 * 16000 * 4  # the short file as float32
    assert peak(short, float("inf")) > 2 * decoded and peak(long, float("inf")) > 4 * decoded
    in_blocks = peak(short, 1.0), peak(long, 1.0)
    assert max(in_blocks) < decoded // 2, in_blocks  # a block, its frames and spectra: about 0.6 MB
    assert in_blocks[1] - in_blocks[0] < decoded // 20, f"grows with the length: {in_blocks}"


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
@pytest.mark.parametrize("pieces", [[400], [1, 200, 199], [137] * 40, [5000, 3, 2000]])
def test_mel_stream_is_log_mel_of_the_whole(pad_mode: str, pieces: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features_module, "MEL_CHUNK_FRAMES", 7)  # chunk edges inside the pieces
    cfg = FeatureConfig(pad_mode=pad_mode)
    wav = np.random.default_rng(len(pieces)).standard_normal(sum(pieces)).astype(np.float32) * 0.1
    stream = MelStream(wav.shape[0], cfg)
    start = 0
    for n in pieces:
        stream.push(wav[start:start + n])
        start += n
    got = stream.finish()
    want = log_mel(wav, cfg).astype(np.float16)
    assert same_but_rounding(want, got)


def test_exact_blocks_cut_the_stream_into_equal_blocks() -> None:
    chunks = [np.arange(a, b, dtype=np.float32) for a, b in ((0, 3), (3, 4), (4, 17), (17, 17), (17, 30))]
    blocks = list(exact_blocks(chunks, 5))
    assert [b.shape[0] for b in blocks] == [5] * 6 and np.array_equal(np.concatenate(blocks), np.arange(30))
    assert [b.shape[0] for b in exact_blocks([np.zeros(7, np.float32)], 5)] == [5, 2]
