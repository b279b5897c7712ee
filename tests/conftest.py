"""Shared fixtures. Build-shards fixtures: small synthetic corpora and builds of them, made once per session.

Session fixtures are read-only for tests: a test that changes a build copies it first.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from build_helpers import SMALL_CFG, Corpus, make_messy_root, make_synth_roots
from dvector.shards.build import build_shards
from dvector.config import BuildConfig
from train_helpers import session_shards
from use_helpers import trained_run


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


# ---- training: the session's synthetic shards, and torch threads put back after every test ----

@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training shards (16 synthetic speakers x 10 utterances), built once per session; a test module
    may define its own ``shards`` fixture instead."""
    return session_shards(tmp_path_factory)


@pytest.fixture(autouse=True)
def restore_threads():  # noqa: ANN201
    """Tests that set torch's thread count (training does) leave it as they found it; likewise the
    warnings format that the CLI's ``main`` sets."""
    before, formatwarning = torch.get_num_threads(), warnings.formatwarning
    yield
    torch.set_num_threads(before)
    warnings.formatwarning = formatwarning


# ---- using a trained model: one small run per session, its embedder, a quick evaluation root ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A trained run (``root``, ``shards``, ``run``), trained once per session (use_helpers.trained_run)."""
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def embedder(trained: SimpleNamespace):  # noqa: ANN201
    """The trained run's embedder, one torch thread."""
    from dvector.inference.embedder import load

    return load(trained.run, threads=1)


@pytest.fixture(scope="module")
def small_root(trained: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 speakers x 3 files of the trained run's corpus: quick to evaluate."""
    root = tmp_path_factory.mktemp("small") / "root"
    for speaker in sorted(p for p in trained.root.iterdir() if p.is_dir())[:3]:
        for f in sorted(speaker.iterdir())[:3]:
            (root / speaker.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / speaker.name / f.name)
    return root


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (exact resume compares runs computed with the same thread count), put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
