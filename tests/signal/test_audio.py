"""Tests for dvector.signal.audio: scanning speaker folders under roots, decoding, downmixing, resampling."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.corpus import roots as corpus
from dvector.config import normalize_extensions
from dvector.corpus import root_namespaces, scan_roots
from dvector.signal.audio import (DecodeError, decode, resample,
                           to_mono)
from dvector.config import FeatureConfig, VadConfig
from dvector.errors import DvectorError
from dvector.signal.process import SkipUtterance, process_file
from dvector.demo.synth import random_voice, utterance


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sources(scan) -> set[tuple[str, str]]:
    return {(u.speaker, u.source) for u in scan.utterances}


# ---- extensions and namespaces -------------------------------------------------------------------

def test_normalize_extensions() -> None:
    assert normalize_extensions(["WAV", ".flac", "wav", " Mp3 "]) == ("flac", "mp3", "wav")
    with pytest.raises(DvectorError):
        normalize_extensions(["", " "])


def test_root_namespaces_are_unique() -> None:
    names = root_namespaces(["/data/vctk/wav48", "/data/libri/wav48", "/data/other"])
    assert names == {"/data/vctk/wav48": "vctk_wav48", "/data/libri/wav48": "libri_wav48", "/data/other": "other"}
    same = root_namespaces(["/a/x/wav", "/b/x/wav"])
    assert len(set(same.values())) == 2
    assert all("/" not in n for n in same.values())


# ---- scanning ------------------------------------------------------------------------------------

def test_scan_nested_case_insensitive_hidden(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    touch(root / "p225" / "a.wav")
    touch(root / "p225" / "deep" / "er" / "b.WAV")
    touch(root / "p225" / "c.Flac")
    touch(root / "p225" / "notes.txt")
    touch(root / "p225" / ".hidden.wav")
    touch(root / "p225" / ".cache" / "d.wav")
    touch(root / "p225" / "wav")  # a name equal to an extension, without a dot, is not audio
    touch(root / ".trash" / "e.wav")  # a hidden speaker folder
    touch(root / "p226" / "f.mp3")
    scan = scan_roots([str(root)], ["wav", "FLAC"])
    assert sources(scan) == {("corpus/p225", "p225/a.wav"), ("corpus/p225", "p225/deep/er/b.WAV"),
                             ("corpus/p225", "p225/c.Flac")}
    assert scan.speakers == ["corpus/p225"]  # p226 has no file with a chosen extension
    assert all(u.path.is_absolute() and u.root == str(root) for u in scan.utterances)
    assert [u.source for u in scan.utterances] == sorted(u.source for u in scan.utterances)


def test_scan_is_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for s in ("b", "a", "c"):
        for u in ("3", "1", "2"):
            touch(root / s / f"{u}.wav")
    first = scan_roots([str(root)], ["wav"])
    second = scan_roots([str(root)], ["wav"])
    assert first.utterances == second.utterances
    assert first.speakers == ["r/a", "r/b", "r/c"]


def test_scan_survives_symlink_loops(tmp_path: Path) -> None:
    root = tmp_path / "r"
    touch(root / "spk" / "sub" / "a.wav")
    touch(root / "spk" / "b.wav")
    os.symlink(root / "spk", root / "spk" / "sub" / "loop")  # spk/sub/loop -> spk
    os.symlink(root / "spk" / "sub", root / "spk" / "sub" / "self")  # a folder linking to itself
    os.symlink(tmp_path / "nowhere", root / "spk" / "dangling.wav")  # a broken link
    scan = scan_roots([str(root)], ["wav"])
    paths = [u.path.resolve() for u in scan.utterances]
    assert sorted(paths) == sorted({(root / "spk" / "sub" / "a.wav").resolve(), (root / "spk" / "b.wav").resolve()})


def test_scan_reports_unreadable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    touch(root / "spk" / "ok.wav")
    touch(root / "spk" / "locked" / "hidden_from_us.wav")
    real_scandir = os.scandir

    def scandir(path):  # tests may run as root, where chmod 000 does not stop reading
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(corpus.os, "scandir", scandir)
    scan = scan_roots([str(root)], ["wav"])
    assert sources(scan) == {("r/spk", "spk/ok.wav")}
    assert len(scan.problems) == 1
    where, reason = scan.problems[0]
    assert where.endswith("locked") and "Permission denied" in reason


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_scan_reports_chmod_000_folder(tmp_path: Path) -> None:
    root = tmp_path / "r"
    touch(root / "spk" / "ok.wav")
    locked = root / "spk" / "locked"
    touch(locked / "a.wav")
    locked.chmod(0)
    try:
        scan = scan_roots([str(root)], ["wav"])
    finally:
        locked.chmod(0o755)
    assert sources(scan) == {("r/spk", "spk/ok.wav")}
    assert any(p.endswith("locked") for p, _ in scan.problems)


def test_speakers_are_namespaced_by_root(tmp_path: Path) -> None:
    a, b = tmp_path / "vctk", tmp_path / "libri"
    touch(a / "p1" / "x.wav")
    touch(b / "p1" / "y.wav")
    touch(b / "p2" / "z.wav")
    scan = scan_roots([str(a), str(b)], ["wav"])
    assert scan.speakers == ["libri/p1", "libri/p2", "vctk/p1"]
    assert scan.root_names == {str(a): "vctk", str(b): "libri"}
    merged = scan_roots([str(a), str(b)], ["wav"], merge_speakers=True)
    assert merged.speakers == ["p1", "p2"]
    assert {u.source for u in merged.utterances if u.speaker == "p1"} == {"p1/x.wav", "p1/y.wav"}


def test_roots_with_the_same_name_get_distinct_namespaces(tmp_path: Path) -> None:
    a, b = tmp_path / "one" / "wav", tmp_path / "two" / "wav"
    touch(a / "s" / "x.wav")
    touch(b / "s" / "x.wav")
    scan = scan_roots([str(a), str(b)], ["wav"])
    assert len(scan.speakers) == 2
    assert scan.speakers == sorted([f"{scan.root_names[str(a)]}/s", f"{scan.root_names[str(b)]}/s"])
    assert scan.root_names[str(a)] != scan.root_names[str(b)]


def test_loose_files_and_empty_roots_are_reported(tmp_path: Path) -> None:
    full, empty, loose = tmp_path / "full", tmp_path / "empty", tmp_path / "loose"
    touch(full / "s" / "a.wav")
    (empty / "speaker_without_audio").mkdir(parents=True)
    touch(empty / "speaker_without_audio" / "readme.txt")
    touch(loose / "a.wav")
    touch(loose / "B.WAV")
    scan = scan_roots([str(full), str(empty), str(loose)], ["wav"])
    assert sources(scan) == {("full/s", "s/a.wav")}
    assert scan.empty_roots == [str(empty), str(loose)]
    assert [(p, r) for p, r in scan.problems if p == str(loose)] == [
        (str(loose), "2 audio file(s) directly in the root are not in a speaker directory and were ignored")]


def test_scan_refuses_missing_roots(tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match="does not exist"):
        scan_roots([str(tmp_path / "missing")], ["wav"])
    touch(tmp_path / "file.wav")
    with pytest.raises(DvectorError, match="not a directory"):
        scan_roots([str(tmp_path / "file.wav")], ["wav"])
    with pytest.raises(DvectorError):
        scan_roots([], ["wav"])


def test_scan_handles_dots_spaces_and_non_utf8_names(tmp_path: Path) -> None:
    root = tmp_path / "r"
    touch(root / "spk.with.dots" / "a.wav")
    touch(root / "spk with spaces" / "b c.wav")
    (root / "odd").mkdir()
    odd = os.path.join(os.fsencode(root / "odd"), b"\xff\xfe.wav")
    with open(odd, "wb") as f:
        f.write(b"x")
    scan = scan_roots([str(root)], ["wav"])
    assert sources(scan) == {("r/spk.with.dots", "spk.with.dots/a.wav"), ("r/spk with spaces", "spk with spaces/b c.wav"),
                             ("r/odd", os.fsdecode(b"odd/\xff\xfe.wav"))}


# ---- decoding ------------------------------------------------------------------------------------

SR = 16000


@pytest.fixture(scope="module")
def voice_wav() -> np.ndarray:
    rng = np.random.default_rng(5)
    return utterance(random_voice(rng), 1.5, SR, rng)


def test_decode_six_channels_to_mono(tmp_path: Path, voice_wav: np.ndarray) -> None:
    gains = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 1.2], dtype=np.float32) * 0.6
    six = voice_wav[:, None] * gains[None, :]
    sf.write(tmp_path / "six.wav", six, SR, subtype="FLOAT")
    data, rate = decode(tmp_path / "six.wav")
    assert data.shape == (voice_wav.shape[0], 6) and data.dtype == np.float32 and rate == SR
    mono = to_mono(data)
    assert mono.shape == voice_wav.shape and mono.dtype == np.float32
    np.testing.assert_allclose(mono, voice_wav * gains.mean(), atol=1e-6)
    processed = process_file(tmp_path / "six.wav", FeatureConfig(), VadConfig())
    assert processed.mel.dtype == np.float16 and processed.mel.shape[1] == 40
    assert processed.input_rate == SR


def test_decode_8_bit(tmp_path: Path, voice_wav: np.ndarray) -> None:
    sf.write(tmp_path / "u8.wav", voice_wav, SR, subtype="PCM_U8")
    assert sf.info(str(tmp_path / "u8.wav")).subtype == "PCM_U8"
    data, rate = decode(tmp_path / "u8.wav")
    assert data.dtype == np.float32 and rate == SR and data.shape == (voice_wav.shape[0], 1)
    assert np.abs(data[:, 0] - voice_wav).max() <= 1 / 128 + 1e-6  # 8-bit quantisation, centred on 0
    sf.write(tmp_path / "f32.wav", voice_wav, SR, subtype="FLOAT")
    frames_u8 = process_file(tmp_path / "u8.wav", FeatureConfig(), VadConfig()).mel.shape[0]
    frames_f32 = process_file(tmp_path / "f32.wav", FeatureConfig(), VadConfig()).mel.shape[0]
    assert 0.8 * frames_f32 <= frames_u8 <= 1.25 * frames_f32  # the VAD still finds the speech


def test_decode_96k_resamples(tmp_path: Path) -> None:
    rate = 96000
    t = np.arange(rate) / rate
    tone = (0.4 * np.sin(2 * np.pi * 1000 * t) + 0.2 * np.sin(2 * np.pi * 30000 * t)).astype(np.float32)
    sf.write(tmp_path / "hi.wav", tone, rate, subtype="PCM_24")
    data, got_rate = decode(tmp_path / "hi.wav")
    assert got_rate == rate
    out = resample(to_mono(data), got_rate, SR)
    assert out.dtype == np.float32 and abs(out.shape[0] - SR) <= 1
    spectrum = np.abs(np.fft.rfft(out[1000:-1000]))
    freqs = np.fft.rfftfreq(out[1000:-1000].shape[0], 1 / SR)
    assert abs(freqs[np.argmax(spectrum)] - 1000) < 5
    assert np.abs(out[1000:-1000]).max() < 0.45  # the 30 kHz part is filtered out, not aliased
    processed = process_file(tmp_path / "hi.wav", FeatureConfig(), VadConfig(enabled=False))
    assert processed.input_rate == rate and processed.duration_s == pytest.approx(1.0)
    assert processed.mel.shape == (1 + SR // 160, 40)


def test_resample_is_a_no_op_at_the_target_rate(voice_wav: np.ndarray) -> None:
    assert resample(voice_wav, SR, SR) is voice_wav
    down = resample(voice_wav, SR, 8000)
    assert down.dtype == np.float32 and abs(down.shape[0] - voice_wav.shape[0] // 2) <= 1


@pytest.mark.parametrize("name,content,reason", [
    ("zero.wav", b"", "empty file"),
    ("text.wav", b"hello, this is text\n" * 10, "cannot decode"),
    ("noise.flac", bytes(range(256)) * 4, "cannot decode"),
])
def test_decode_errors(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    touch(tmp_path / name, content)
    with pytest.raises(DecodeError, match=reason):
        decode(tmp_path / name)
    with pytest.raises(SkipUtterance, match=reason):
        process_file(tmp_path / name, FeatureConfig(), VadConfig())


def test_decode_truncated_flac(tmp_path: Path, voice_wav: np.ndarray) -> None:
    sf.write(tmp_path / "full.flac", voice_wav, SR)
    data = (tmp_path / "full.flac").read_bytes()
    for cut in (0.5, 0.1):
        (tmp_path / "cut.flac").write_bytes(data[: int(len(data) * cut)])
        with pytest.raises(DecodeError):
            decode(tmp_path / "cut.flac")


def test_decode_non_utf8_file_name(tmp_path: Path, voice_wav: np.ndarray) -> None:
    path = os.path.join(os.fsencode(tmp_path), b"\xff\xfe.wav")
    sf.write(path, voice_wav, SR)
    data, rate = decode(Path(os.fsdecode(path)))
    assert rate == SR and data.shape == (voice_wav.shape[0], 1)


def test_decode_error_reason_names_no_absolute_path(tmp_path: Path) -> None:
    touch(tmp_path / "deep" / "text.wav", b"not audio at all, just text")
    with pytest.raises(DecodeError) as info:
        decode(tmp_path / "deep" / "text.wav")
    assert str(tmp_path) not in str(info.value)


def test_process_file_skips_silence_and_too_short(tmp_path: Path, voice_wav: np.ndarray) -> None:
    sf.write(tmp_path / "silence.wav", np.zeros(SR, np.float32), SR)
    with pytest.raises(SkipUtterance, match="empty after VAD"):
        process_file(tmp_path / "silence.wav", FeatureConfig(), VadConfig())
    sf.write(tmp_path / "short.wav", voice_wav[5000:5300], SR)
    with pytest.raises(SkipUtterance, match="too short"):
        process_file(tmp_path / "short.wav", FeatureConfig(), VadConfig())
    sf.write(tmp_path / "nan.wav", np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    with pytest.raises(SkipUtterance, match="NaN"):
        process_file(tmp_path / "nan.wav", FeatureConfig(), VadConfig())


def write_m4a(path: Path, wav: np.ndarray, rate: int) -> None:
    av = pytest.importorskip("av", reason="PyAV (dvector[m4a]) is not installed")
    stereo = np.ascontiguousarray(np.stack([wav, 0.5 * wav]).astype(np.float32))  # (2, samples)
    try:
        with av.open(str(path), "w", format="ipod") as container:
            stream = container.add_stream("aac", rate=rate)
            stream.layout = "stereo"
            for i in range(0, stereo.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, i:i + 1024]), format="fltp",
                                                   layout="stereo")
                frame.sample_rate, frame.pts = rate, i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    except Exception as exc:  # an FFmpeg build without an AAC encoder
        pytest.skip(f"cannot encode AAC with this PyAV: {exc}")


def test_decode_m4a_through_pyav(tmp_path: Path) -> None:
    rate = 22050
    t = np.arange(2 * rate) / rate
    wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    write_m4a(tmp_path / "clip.m4a", wav, rate)
    data, got_rate = decode(tmp_path / "clip.m4a")
    assert got_rate == rate and data.dtype == np.float32 and data.shape[1] == 2
    assert abs(data.shape[0] - wav.shape[0]) < 4096  # AAC adds encoder delay and padding
    assert 0.25 < np.abs(data[:, 0]).max() < 0.35 and 0.12 < np.abs(data[:, 1]).max() < 0.18
    mono = resample(to_mono(data), got_rate, SR)
    spectrum = np.abs(np.fft.rfft(mono))
    assert abs(np.fft.rfftfreq(mono.shape[0], 1 / SR)[np.argmax(spectrum)] - 440) < 5
    (tmp_path / "bad.m4a").write_bytes(b"not an mp4 container")
    with pytest.raises(DecodeError):
        decode(tmp_path / "bad.m4a")


def test_decode_m4a_is_bounded_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyAV decodes m4a: its rate and length are bounded like soundfile's (see test_decode_bounds)."""
    from dvector.signal import audio

    rate = 22050
    wav = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)).astype(np.float32)
    write_m4a(tmp_path / "clip.m4a", wav, rate)
    monkeypatch.setattr(audio, "MAX_DURATION_S", 1.0)
    with pytest.raises(DecodeError, match="too long"):
        decode(tmp_path / "clip.m4a")
    monkeypatch.setattr(audio, "MIN_RATE", 32000)
    with pytest.raises(DecodeError, match="sample rate 22050 Hz is outside"):
        decode(tmp_path / "clip.m4a")
