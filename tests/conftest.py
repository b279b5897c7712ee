"""Shared fixtures. Build-shards fixtures: small synthetic corpora and builds of them, made once per session.

Session fixtures are read-only for tests: a test that changes a build copies it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from build_helpers import SMALL_CFG, Corpus, make_messy_root, make_synth_roots
from dvector.shards.build import build_shards
from dvector.config import BuildConfig


@pytest.fixture(scope="session")
def synth_roots(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Two roots (vctk: 3 speakers x 6 flac at 22.05 kHz; libri: 3 speakers, wav, one nested)."""
    return make_synth_roots(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="session")
def synth_build(synth_roots: Corpus, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``synth_roots`` built once with SMALL_CFG on two workers."""
    out = tmp_path_factory.mktemp("synth_build") / "shards"
    report = build_shards(synth_roots.roots, out, SMALL_CFG, workers=2)
    return SimpleNamespace(out=out, report=report, cfg=SMALL_CFG, corpus=synth_roots)


@pytest.fixture(scope="session")
def messy_root(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """A root with good files and every bad-input case of the build-shards issue."""
    return make_messy_root(tmp_path_factory.mktemp("messy"))


@pytest.fixture(scope="session")
def messy_build(messy_root: Corpus, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("messy_build") / "shards"
    cfg = BuildConfig(min_shards=3, block_size=2)
    report = build_shards(messy_root.roots, out, cfg, workers=2)
    return SimpleNamespace(out=out, report=report, cfg=cfg, corpus=messy_root)


@pytest.fixture
def synth_build_copy(synth_build: SimpleNamespace, tmp_path: Path) -> Path:
    """A private copy of ``synth_build`` (shards, index and build state) that a test may change."""
    dest = tmp_path / "shards"
    shutil.copytree(synth_build.out, dest)
    return dest
