"""A tiny trained run shared by the embed/evaluate/plot/CLI tests: synthetic speakers, shards,
5 training steps of the tiny model. Made once per test session (cached here, in a session temp dir)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dvector.shards.build import build_shards
from dvector.config import BuildConfig, ModelConfig, TrainConfig
from dvector.demo.synth import write_corpus
from dvector.inference.embed_inputs import _embed_job as _real_embed_job  # before any test patches it

_CACHE: dict[str, SimpleNamespace] = {}


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """``root`` (14 speakers x 8 utterances of 1.5-3 s, flac), ``shards``, ``run`` (a run folder)."""
    if "run" not in _CACHE:
        base = tmp_path_factory.mktemp("trained")
        root = base / "corpus"
        files = write_corpus(root, 14, 8, seed=5, duration_s=(1.5, 3.0))
        shards = base / "shards"
        build_shards([str(root)], shards, BuildConfig(min_shards=4, block_size=4), workers=1)
        from dvector.training.loop import train

        run = base / "run"
        cfg = TrainConfig(steps=5, save_every=5, valid_every=5, log_every=5, n_speakers=4, n_utterances=4,
                          seg_len=(100, 100), workers=0)
        train(str(shards), run, cfg, ModelConfig.preset("tiny"), say=lambda m: None)
        _CACHE["run"] = SimpleNamespace(root=root, shards=shards, run=run, files=files)
    return _CACHE["run"]


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a run folder (checkpoints only), for tests that write into it."""
    import shutil

    shutil.copytree(run / "checkpoints", dest / "checkpoints")
    return dest


def write_wav(path: Path, wav, rate: int = 16000) -> Path:  # noqa: ANN001
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav, rate)
    return path


def run_main(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:  # noqa: ANN002
    """The console entry point as a user runs it: exit status, stdout, stderr (paths and bytes
    arguments as the shell would pass them)."""
    import os

    from dvector.cli import main

    capsys.readouterr()
    try:
        main([os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def flat(text: str) -> str:
    """Text with every run of whitespace as one space (rich wraps lines at the terminal width)."""
    return " ".join(text.split())


KILL_MARK = "kill-me"  # a worker that meets an input with this in its name dies (dying_embed_job)


def dying_embed_job(recipe, method, pairs):  # noqa: ANN001, ANN201
    """``embed_inputs._embed_job``, except that the worker process kills itself (SIGKILL, as the
    kernel's OOM killer would) when its job holds an input whose name has ``KILL_MARK`` in it.

    Tests monkeypatch ``embed_inputs._embed_job`` with it: the pool pickles it by name, so the
    (spawned) workers import it from here and run it, and its deaths are the only difference."""
    import os
    import signal

    if any(KILL_MARK in os.fspath(source) for _, source in pairs):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_embed_job(recipe, method, pairs)


# ---- Kaldi data directories over a root (tests/evaluation) ---------------------------------------
def uid(rel: str) -> str:
    speaker, name = rel.split("/")
    return f"{speaker}-{Path(name).stem}"


def files_of(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.flac"))


def kaldi_dir(root: Path, dest: Path) -> Path:
    """A Kaldi data directory over ``root``'s speaker folders: ids ``SPEAKER-UTT``, paths relative to ``root``."""
    dest.mkdir(parents=True)
    rels = files_of(root)
    (dest / "wav.scp").write_text("".join(f"{uid(r)} {r}\n" for r in rels))
    (dest / "utt2spk").write_text("".join(f"{uid(r)} {r.split('/')[0]}\n" for r in rels))
    return dest
