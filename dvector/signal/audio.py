"""Find speakers and utterances under root directories; decode, downmix and resample audio.

A root holds speaker directories; a speaker directory may nest subfolders. Speakers are
namespaced by root (``vctk/p225``) unless ``merge_speakers`` keys them by directory name alone,
as the original project did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf
import soxr

from dvector.errors import DvectorError

# What soundfile (libsndfile) cannot read but PyAV (FFmpeg) can: VoxCeleb2 ships m4a.
FFMPEG_ONLY_EXTENSIONS = frozenset({"m4a", "aac", "mp4", "wma", "opus", "webm"})


class DecodeError(Exception):
    """One file could not be turned into audio; the message is the reason."""


@dataclass(frozen=True)
class Utterance:
    path: Path  # absolute path of the audio file
    root: str  # the root directory as given
    speaker: str  # global speaker id (``rootname/speakerdir`` unless merged)
    source: str  # path relative to its root, as printed in the index


@dataclass
class ScanResult:
    utterances: list[Utterance]
    speakers: list[str]  # sorted global ids
    root_names: dict[str, str]  # root as given -> its namespace
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): scan warnings
    empty_roots: list[str] = field(default_factory=list)


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """``["WAV", ".flac", "wav"]`` -> ``("flac", "wav")``: lower case, no dots, sorted, unique."""
    out = sorted({e.strip().lower().lstrip(".") for e in extensions if e.strip()})
    if not out:
        raise DvectorError("no audio extensions given (e.g. -e wav,flac)")
    return tuple(out)


def root_namespaces(roots: Sequence[str]) -> dict[str, str]:
    """A short, unique name per root: its folder name, with parent folders added to break ties."""
    paths = {r: Path(os.path.abspath(r)).parts for r in roots}
    depth = {r: 1 for r in roots}
    while True:
        names = {r: "_".join(paths[r][-depth[r]:]).strip("/") or "root" for r in roots}
        clash = [r for r in roots if list(names.values()).count(names[r]) > 1 and depth[r] < len(paths[r])]
        if not clash:
            return {r: names[r].replace("/", "_") for r in roots}
        for r in clash:
            depth[r] += 1


def _walk_files(top: Path, extensions: frozenset[str], problems: list[tuple[str, str]]) -> list[Path]:
    """All non-hidden audio files below ``top``, following symlinks without looping, sorted."""
    found: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError as exc:
            problems.append((str(folder), f"cannot read folder: {exc.strerror or exc}"))
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            continue  # a symlink loop or a folder reached twice
        seen_dirs.add(ident)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append((str(folder), f"cannot list folder: {exc.strerror or exc}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    subdirs.append(Path(entry.path))
                elif entry.is_file() and entry.name.rsplit(".", 1)[-1].lower() in extensions and "." in entry.name:
                    found.append(Path(entry.path))
            except OSError as exc:
                problems.append((entry.path, f"cannot stat: {exc.strerror or exc}"))
        stack.extend(reversed(subdirs))
    return sorted(found)


def scan_roots(roots: Sequence[str], extensions: Iterable[str], merge_speakers: bool = False) -> ScanResult:
    """List every speaker directory and utterance under ``roots``, deterministically."""
    if not roots:
        raise DvectorError("give at least one root directory")
    exts = frozenset(normalize_extensions(extensions))
    for root in roots:
        if not os.path.isdir(root):
            raise DvectorError(f"root directory {root!r} does not exist or is not a directory")
    names = root_namespaces(list(roots))
    utterances: list[Utterance] = []
    problems: list[tuple[str, str]] = []
    empty_roots: list[str] = []
    for root in roots:
        top = Path(os.path.abspath(root))
        count_before = len(utterances)
        try:
            entries = sorted(os.scandir(top), key=lambda e: e.name)
        except OSError as exc:
            raise DvectorError(f"cannot list root {root!r}: {exc.strerror or exc}") from exc
        loose = 0
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                speaker = entry.name if merge_speakers else f"{names[root]}/{entry.name}"
                for path in _walk_files(Path(entry.path), exts, problems):
                    source = str(path.relative_to(top))
                    utterances.append(Utterance(path=path, root=root, speaker=speaker, source=source))
            elif entry.name.rsplit(".", 1)[-1].lower() in exts:
                loose += 1
        if loose:
            problems.append((root, f"{loose} audio file(s) directly in the root are not in a speaker directory and were ignored"))
        if len(utterances) == count_before:
            empty_roots.append(root)
    speakers = sorted({u.speaker for u in utterances})
    return ScanResult(utterances, speakers, names, problems, empty_roots)


def _decode_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    try:
        import av  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DecodeError(
            f"{path.suffix} needs FFmpeg decoders: pip install 'dvector[m4a]' (PyAV), "
            "or convert first, e.g. ffmpeg -i in.m4a -ar 16000 out.flac"
        ) from exc
    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise DecodeError("no audio stream")
            resampler = av.AudioResampler(format="fltp")
            chunks = []
            rate = stream.rate
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())  # (channels, samples)
        if not chunks:
            raise DecodeError("no audio samples")
        data = np.concatenate(chunks, axis=1).T
        return np.ascontiguousarray(data, dtype=np.float32), int(rate)
    except DecodeError:
        raise
    except Exception as exc:  # FFmpeg raises many types
        raise DecodeError(f"cannot decode: {exc}") from exc


def decode(path: Path) -> tuple[np.ndarray, int]:
    """Read a file as float32 ``(samples, channels)`` and its sample rate; DecodeError if it cannot."""
    ext = path.suffix.lower().lstrip(".")
    if ext in FFMPEG_ONLY_EXTENSIONS:
        return _decode_ffmpeg(path)
    try:
        if os.stat(path).st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        # bytes, so that names that are not valid UTF-8 open too (soundfile encodes str paths strictly)
        data, rate = sf.read(os.fsencode(path), dtype="float32", always_2d=True)
    except DecodeError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as exc:
        # the reason goes into index.json: name the file, not where the corpus happens to be mounted
        name = os.fsencode(path.name).decode("utf-8", "backslashreplace")  # printable, even if not UTF-8
        reason = str(exc).replace(repr(os.fsencode(path)), f"'{name}'")
        raise DecodeError(f"cannot decode: {reason}") from exc
    return data, int(rate)


def to_mono(data: np.ndarray) -> np.ndarray:
    """Average the channels of ``(samples, channels)`` audio into float32 ``(samples,)``."""
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0])
    return data.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample with soxr (high quality); a no-op at the target rate."""
    if rate == target_rate:
        return wav
    return soxr.resample(wav, rate, target_rate, quality="HQ").astype(np.float32, copy=False)

