"""Finding a trained model and reading how it was made: the one place for checkpoints and exports.

A model is given as a run folder (its ``checkpoints/best.pt``, else the latest checkpoint), a
checkpoint file, or an exported bundle (a folder with ``dvector.pt`` + ``dvector.json``, or the
``dvector.pt`` TorchScript file itself). :func:`checkpoint_settings` reads a checkpoint's network,
feature and VAD settings and window length with one set of fallbacks; :func:`read_export` reads an
export and its record. :func:`load_model_checkpoint` is the one way a checkpoint is loaded for use
(embedding, export): weights that hold NaN or Inf are refused there, naming the tensors.

"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dvector.config import FeatureConfig, ModelConfig, VadConfig, WindowConfig
from dvector.errors import DvectorError
from dvector.files import display_path
from dvector.training.checkpoint import checkpoint_dir, load_checkpoint, nonfinite_weights, resolve_checkpoint

EXPORT_MODULE = "dvector.pt"  # the TorchScript module of an exported bundle
EXPORT_META = "dvector.json"  # its record (also stored inside the module)
DEFAULT_SEG_LEN = 160  # window length L when a checkpoint does not record its training segments


def find_checkpoint(checkpoint_or_run: str | os.PathLike[str]) -> Path:
    """A checkpoint file as given; for a run folder, ``checkpoints/best.pt`` if present, else the latest."""
    p = Path(checkpoint_or_run)
    if p.is_dir():
        for candidate in (checkpoint_dir(p) / "best.pt", p / "best.pt"):
            if candidate.is_file():
                return candidate
    return resolve_checkpoint(p)


def refuse_nonfinite(bad: list[str], where: str | os.PathLike[str]) -> None:
    """A DvectorError naming the first tensors of ``bad`` (weights holding NaN or Inf), if any."""
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DvectorError(f"{display_path(where)}: NaN or Inf in the weights {', '.join(bad[:3])}{more}: "
                           "the model cannot be used (take an earlier checkpoint)")


def load_model_checkpoint(checkpoint_or_run: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint a model path names (:func:`find_checkpoint`) and its contents, for use: refused
    (:class:`DvectorError` naming the tensors) when the network's weights hold NaN or Inf."""
    source = find_checkpoint(checkpoint_or_run)
    state = load_checkpoint(source, map_location="cpu")
    refuse_nonfinite([name for name in nonfinite_weights(state) if name.startswith("model.")], source)
    return source, state


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (``torch.jit.save``) holds code; a ``torch.save`` checkpoint does not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def find_export(path: Path) -> Path | None:
    """The ``dvector.pt`` of an exported bundle at ``path`` (its folder or the file), else None."""
    if path.is_dir():
        if (path / EXPORT_MODULE).is_file() and (path / EXPORT_META).is_file():
            return path / EXPORT_MODULE
        return None
    if path.is_file() and is_torchscript(path):
        return path
    return None


@dataclass
class ModelSettings:
    """How a model turns audio into embeddings: its network, features, VAD and window length L."""

    model: ModelConfig | None  # None for an export that does not record it
    features: FeatureConfig
    vad: VadConfig
    seg_len: int | None  # None: unknown (an export may not say)
    defaulted: list[str] = field(default_factory=list)  # settings the model did not record
    windows: WindowConfig = field(default_factory=WindowConfig)  # how an utterance is cut into windows


def checkpoint_settings(state: dict[str, Any]) -> ModelSettings:
    """The settings of a loaded checkpoint, and which were defaulted.

    A checkpoint trained on shards without an index records no feature or VAD settings; the
    defaults (with the network's ``n_mels``) are used then, and named in ``defaulted``; so is
    ``seg_len`` (default ``DEFAULT_SEG_LEN``) where the training settings lack it.
    """
    try:
        model_cfg = ModelConfig.from_dict(state["model_config"])
    except (KeyError, TypeError) as exc:
        raise DvectorError(f"not a usable dvector checkpoint: no network settings ({type(exc).__name__}: {exc})") from exc
    defaulted: list[str] = []
    features = FeatureConfig(n_mels=model_cfg.n_mels)
    if state.get("feature_config"):
        features = FeatureConfig.from_dict(state["feature_config"])
    else:
        defaulted.append("feature_config")
    vad = VadConfig()
    if state.get("vad_config"):
        vad = VadConfig.from_dict(state["vad_config"])
    else:
        defaulted.append("vad_config")
    seg_len = (state.get("train_config") or {}).get("seg_len")
    if seg_len is None:
        seg_len, defaulted = DEFAULT_SEG_LEN, defaulted + ["seg_len"]
    else:
        seg_len = int(seg_len[1]) if isinstance(seg_len, (list, tuple)) else int(seg_len)
    windows = WindowConfig.from_dict(state["window_config"]) if state.get("window_config") else WindowConfig()
    return ModelSettings(model_cfg, features, vad, seg_len, defaulted, windows)


def find_key(meta: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` found at the top of an export's record or one level down (records of
    older exports nest settings under other keys)."""
    for name in names:
        if name in meta:
            return meta[name]
    for value in meta.values():
        if isinstance(value, dict):
            for name in names:
                if name in value:
                    return value[name]
    return None


def load_exported(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """An exported module (``dvector.pt`` or its folder) and the record stored inside it."""
    p = Path(path)
    if p.is_dir():
        p = p / EXPORT_MODULE
    if not p.is_file():
        raise DvectorError(f"no exported model at {p}")
    extra = {EXPORT_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise DvectorError(f"cannot load exported model {p}: {exc}") from exc
    meta = json.loads(extra[EXPORT_META]) if extra[EXPORT_META] else {}
    return module, meta


def read_export(module_path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any], ModelSettings]:
    """An exported module, its record (the one inside, updated by ``dvector.json`` beside it) and its
    settings; where the record lacks them, the module's own attributes, else the defaults."""
    scripted, meta = load_exported(module_path)
    meta_path = module_path.with_suffix(".json")
    if not meta_path.is_file():
        meta_path = module_path.parent / EXPORT_META
    if meta_path.is_file():
        try:
            meta = {**meta, **json.loads(meta_path.read_text(encoding="utf-8"))}
        except (OSError, ValueError) as exc:
            raise DvectorError(f"cannot read {meta_path}: {exc}") from exc
    feature_dict = find_key(meta, "feature_config", "features")
    vad_dict = find_key(meta, "vad_config", "vad")
    try:
        features = FeatureConfig.from_dict(feature_dict) if isinstance(feature_dict, dict) else \
            FeatureConfig(sample_rate=int(getattr(scripted, "sample_rate", 16000)))
        vad = VadConfig.from_dict(vad_dict) if isinstance(vad_dict, dict) else VadConfig()
    except DvectorError as exc:
        raise DvectorError(f"{module_path}: {exc}") from exc
    seg_len = find_key(meta, "seg_len") or getattr(scripted, "seg_len", None)
    if isinstance(seg_len, (list, tuple)):
        seg_len = seg_len[-1]
    window_dict = find_key(meta, "window_config")
    windows = WindowConfig.from_dict(window_dict) if isinstance(window_dict, dict) else WindowConfig()
    return scripted, meta, ModelSettings(None, features, vad, int(seg_len) if seg_len else None, windows=windows)


def training_shards(model: str | os.PathLike[str]) -> list[str] | None:
    """The shard URLs a checkpoint (or run folder) was trained on, where it records them (None for
    exports and for checkpoints made before the record existed)."""
    p = Path(model)
    if p.is_dir() and not (checkpoint_dir(p).is_dir() or (p / "best.pt").is_file()):
        return None  # an exported folder
    try:
        path = find_checkpoint(p)
        if is_torchscript(path):
            return None
        shards = load_checkpoint(path).get("shards")
    except (DvectorError, OSError):
        return None
    return [str(u) for u in shards] if shards else None
