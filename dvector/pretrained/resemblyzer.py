"""``dvector import resemblyzer -o RUN``: Resemblyzer's pretrained voice encoder as a dvector run folder.

Resemblyzer (PyPI ``resemblyzer``, Apache-2.0; ``pip install 'dvector[resemblyzer]'``) ships a GE2E
d-vector (3 x 256 LSTM over 40 mel bands, trained on thousands of speakers) as ``pretrained.pt`` inside
its wheel. :func:`import_resemblyzer` copies those weights, exactly, into ``RUN/checkpoints/`` as a
step-0 checkpoint of the ``resemblyzer`` network, and records what that network was trained and used
with as the run's settings: ``FeatureConfig.preset("resemblyzer")`` (librosa's mel power, the level
raised to -30 dBFS), ``WindowConfig.preset("resemblyzer")`` (160-frame partials at 1.3 per second),
our VAD set to trim as Resemblyzer's webrtcvad does (``VadConfig.preset("resemblyzer")``) and L = 160 frames for training from it. Nothing is
downloaded, and once imported the run needs neither ``resemblyzer`` nor ``librosa`` nor ``webrtcvad``.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvector.config import FeatureConfig, VadConfig, WindowConfig
from dvector.errors import DvectorError
from dvector.files import sha256_file
from dvector.nn.resemblyzer import PRESET, load_resemblyzer, resemblyzer_weights_path
from dvector.training.checkpoint import checkpoint_dir, save_checkpoint

LICENSE = "Apache-2.0"
SEG_LEN = 160  # frames: Resemblyzer's partial utterances, and L for training from the import


@dataclass
class Imported:
    """What ``import_resemblyzer`` wrote."""

    run: Path
    checkpoint: Path
    weights: Path  # the file the weights came from
    sha256: str  # of that file
    version: str | None  # the installed resemblyzer's version (None: a file given by path)
    parameters: int


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("resemblyzer")
    except importlib.metadata.PackageNotFoundError:
        return None


def import_state(weights: str | os.PathLike[str] | None = None) -> tuple[dict[str, Any], Path, str, str | None]:
    """The checkpoint dict of the imported encoder, and the weights file, its sha256 and the package
    version it came from. ``weights``: a ``pretrained.pt`` elsewhere (default: the installed package's)."""
    path = Path(weights) if weights is not None else resemblyzer_weights_path()
    version = installed_version() if weights is None else None
    loaded = load_resemblyzer(path)
    digest = sha256_file(path)
    features = FeatureConfig.preset(PRESET)
    state = {
        "step": 0,
        "model": {name: t.detach().clone() for name, t in loaded.model.state_dict().items()},
        "model_config": loaded.config.to_dict(),
        "feature_config": features.to_dict(),
        "vad_config": VadConfig.preset(PRESET).to_dict(),
        "window_config": WindowConfig.preset(PRESET).to_dict(),
        "train_config": {"seg_len": [SEG_LEN, SEG_LEN]},
        "best_eer": None,
        "imported": {"from": "resemblyzer", "version": version, "weights": str(path.resolve()), "sha256": digest,
                     "source_step": loaded.step, "license": LICENSE,
                     "ge2e": {"w": loaded.similarity_weight, "b": loaded.similarity_bias}},
    }
    return state, path, digest, version


def import_resemblyzer(out: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None,
                       overwrite: bool = False) -> Imported:
    """Write Resemblyzer's encoder into the run folder ``out`` (``checkpoints/step-000000000.pt``,
    ``latest.pt`` and ``best.pt``). A folder that already holds checkpoints is refused unless ``overwrite``."""
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise DvectorError(f"{run} is a file, not a folder for the imported run")
    folder = checkpoint_dir(run)
    if folder.is_dir() and any(folder.glob("*.pt")) and not overwrite:
        raise DvectorError(f"{run} already holds checkpoints; choose another folder or pass --overwrite")
    state, path, digest, version = import_state(weights)
    if overwrite and folder.is_dir():
        for old in folder.glob("*.pt"):
            old.unlink()
    try:
        saved = save_checkpoint(state, run, keep=1, best=True)
    except OSError as exc:
        raise DvectorError(f"cannot write the imported run into {run}: {exc.strerror or exc}") from None
    parameters = sum(t.numel() for t in state["model"].values())
    return Imported(run, saved, path, digest, version, parameters)


