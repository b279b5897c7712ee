"""Helpers shared by the build-shards tests: small synthetic corpora, reading shards back, comparing builds."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import webdataset as wds

from dvector.config import BuildConfig
from dvector.demo.synth import random_voice, utterance, write_corpus

# Small and fast: a few shards, several blocks per shard.
SMALL_CFG = BuildConfig(min_shards=4, block_size=3)
# The same settings on the command line (extensions spelled in upper case on purpose).
SMALL_ARGS = ["--min-shards", "4", "--block-size", "3"]


@dataclass
class Corpus:
    roots: list[str]
    sources: set[tuple[str, str]]  # (root namespace, path relative to the root) of every usable file
    speakers: set[str]  # expected global speaker ids
    bad: dict[tuple[str, str], str] = field(default_factory=dict)  # unusable file -> reason fragment


def _rel(root: Path, path: Path | bytes) -> str:
    return os.fsdecode(os.path.relpath(path, os.fsencode(root) if isinstance(path, bytes) else root))


def make_synth_roots(base: Path) -> Corpus:
    """Two roots whose speaker folders share names; nested folders, mixed rates, formats and case."""
    vctk, libri = base / "vctk", base / "libri"
    files = write_corpus(vctk, 3, 6, seed=101, sample_rate=22050, duration_s=(1.0, 2.5))  # flac
    libri_files = write_corpus(libri, 2, 5, seed=102, extension="wav", duration_s=(1.0, 2.5))
    nested = write_corpus(libri / "84", 2, 3, seed=103, prefix="chapter", duration_s=(1.0, 2.5))
    # an upper-case extension counts; hidden files and other extensions do not
    upper = libri / "spk001" / "UTT009.WAV"
    os.rename(libri_files[-1], upper)
    libri_files[-1] = upper
    (libri / "spk000" / ".hidden.wav").write_bytes(libri_files[0].read_bytes())
    (libri / "spk000" / "notes.txt").write_text("not audio")
    sources = {("vctk", _rel(vctk, p)) for p in files}
    sources |= {("libri", _rel(libri, p)) for p in libri_files + nested}
    speakers = {f"vctk/spk{i:03d}" for i in range(3)} | {"libri/spk000", "libri/spk001", "libri/84"}
    return Corpus([str(vctk), str(libri)], sources, speakers)


NON_UTF8_NAME = b"\xff\xfe.wav"
BAD_NON_UTF8_NAME = b"bad \xfe.wav"


def make_messy_root(base: Path) -> Corpus:
    """One root with good speakers and every kind of bad input the build must survive."""
    root = base / "messy"
    good = write_corpus(root, 2, 3, seed=7, duration_s=(1.0, 2.0))
    rng = np.random.default_rng(8)
    voice = random_voice(rng)
    wav = utterance(voice, 2.0, 16000, rng)
    dots, spaces = root / "spk.one", root / "spk two"
    dots.mkdir()
    spaces.mkdir()
    sources = {("messy", _rel(root, p)) for p in good}
    bad: dict[tuple[str, str], str] = {}

    def add_good(path: Path | bytes) -> None:
        sources.add(("messy", _rel(root, path)))

    sf.write(dots / "full.flac", wav, 16000)
    add_good(dots / "full.flac")
    six = np.stack([wav * (0.4 + 0.1 * c) for c in range(6)], axis=1)
    sf.write(spaces / "six_channels.wav", six, 16000)
    add_good(spaces / "six_channels.wav")
    sf.write(spaces / "eight_bit.wav", wav, 16000, subtype="PCM_U8")
    add_good(spaces / "eight_bit.wav")
    sf.write(spaces / "rate96k.wav", soxr.resample(wav, 16000, 96000), 96000, subtype="PCM_24")
    add_good(spaces / "rate96k.wav")
    odd = os.path.join(os.fsencode(spaces), NON_UTF8_NAME)
    sf.write(odd, wav, 16000)
    add_good(odd)

    def add_bad(path: Path, reason: str) -> None:
        bad[("messy", _rel(root, path))] = reason

    (dots / "zero_bytes.wav").write_bytes(b"")
    add_bad(dots / "zero_bytes.wav", "empty file")
    flac = (dots / "full.flac").read_bytes()
    (dots / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    add_bad(dots / "truncated.flac", "cannot decode")
    (dots / "text.wav").write_text("this is not audio\n")
    add_bad(dots / "text.wav", "cannot decode")
    sf.write(dots / "silence.wav", np.zeros(32000, np.float32), 16000)
    add_bad(dots / "silence.wav", "empty after VAD")
    sf.write(dots / "hiss.wav", (1e-3 * rng.standard_normal(32000)).astype(np.float32), 16000)
    add_bad(dots / "hiss.wav", "empty after VAD")
    sf.write(dots / "short.wav", wav[8000:8200], 16000)
    add_bad(dots / "short.wav", "too short")
    (spaces / "[take 1] [red]x.wav").write_text("brackets are not markup")
    add_bad(spaces / "[take 1] [red]x.wav", "cannot decode")
    bad_odd = os.path.join(os.fsencode(spaces), BAD_NON_UTF8_NAME)
    with open(bad_odd, "wb") as f:
        f.write(b"not audio either")
    bad[("messy", _rel(root, bad_odd))] = "cannot decode"
    (root / "loose.wav").write_bytes((dots / "full.flac").read_bytes())  # not in a speaker folder: ignored, reported
    speakers = {"messy/spk000", "messy/spk001", "messy/spk.one", "messy/spk two"}
    return Corpus([str(root)], sources, speakers, bad)


def shard_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("shard-*.tar"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """The bytes of every shard and the index: what must be identical between equivalent builds."""
    files = {p.name: p.read_bytes() for p in shard_files(folder)}
    if (Path(folder) / "index.json").exists():
        files["index.json"] = (Path(folder) / "index.json").read_bytes()
    return files


def rebuild_after_losing(corpus: list[str], built: Path, out: Path, cfg: BuildConfig, shard: str) -> Any:
    """Copy the build ``built`` to ``out``, delete its index and ``shard``, build again (resume);
    the build's report."""
    import shutil

    from dvector.shards.build import build_shards

    shutil.copytree(built, out)
    (out / "index.json").unlink()
    (out / shard).unlink()
    return build_shards(corpus, out, cfg, workers=1)


def read_back(folder: Path) -> list[dict[str, Any]]:
    """Every sample of a shard folder read with plain webdataset, decoding only .npy and .json."""
    urls = [str(p) for p in shard_files(folder)]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    out = []
    for raw in dataset:
        members = {k for k in raw if not k.startswith("__")}
        assert members == {"mel.npy", "json"}, f"unexpected members {members}"
        meta = json.loads(raw["json"])
        mel = np.load(io.BytesIO(raw["mel.npy"]), allow_pickle=False)
        out.append({"key": raw["__key__"], "url": raw["__url__"], "mel": mel, **meta})
    return out


def load_index(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "index.json").read_text())


def squash(text: str) -> str:
    """Text without any whitespace: robust to the console wrapping long lines."""
    return re.sub(r"\s+", "", text)


def display(source: str) -> str:
    """How a (possibly non-UTF-8) relative path is printed."""
    return os.fsencode(source).decode("utf-8", "backslashreplace")
