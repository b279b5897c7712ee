"""Where a run's network comes from, and whether the shards fit it: ``train --init`` and ``-c``.

``--init RUN_OR_CHECKPOINT`` (:func:`load_init`) starts a new run from another run's encoder: its
network (``ModelConfig``) and feature settings come with it, and only the encoder's weights are
copied (:func:`start_from`, strict: every name and shape must match); the loss's own weights,
the optimizer, the schedule and the step count start anew. The new run's checkpoints record where
it started (:func:`init_record`: path, sha256 and step of the init checkpoint), and a continued
run (``-c``) carries that record on without loading the init weights again.

:func:`check_shard_features` is the one place that refuses shards whose features differ from the
network's (a continued checkpoint's or an init run's), naming ``build-shards --features``;
:func:`settle_network` decides the network, features and VAD settings a run trains and records.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dvector.config import FeatureConfig, ModelConfig, TrainConfig, VadConfig
from dvector.errors import DvectorError
from dvector.files import sha256_file
from dvector.training.checkpoint import INIT_KEYS, load_resume_checkpoint


@dataclass
class SavedRun:
    """What a checkpoint says about its run: the network, the features and VAD settings it trained on,
    where that run started (its ``init`` record, if it began with --init)."""

    where: str  # the run as messages name it (its folder, or the checkpoint file)
    model_cfg: ModelConfig
    features: FeatureConfig | None  # None: its shards recorded none
    vad: dict[str, Any] | None
    init: dict[str, Any] | None


def run_name(path: Path) -> str:
    """A checkpoint file as messages name it: its run folder for ``RUN/checkpoints/*.pt``, else the file."""
    return str(path.parent.parent) if path.parent.name == "checkpoints" else str(path)


def saved_run(state: dict[str, Any], path: Path) -> SavedRun:
    """The :class:`SavedRun` of the checkpoint ``state`` read from ``path``."""
    features = state.get("feature_config")
    return SavedRun(run_name(path), ModelConfig.from_dict(state["model_config"]),
                    FeatureConfig.from_dict(features) if features else None, state.get("vad_config"), state.get("init"))


@dataclass
class InitSource:
    """The encoder a run starts from (``--init``), and the run it comes from."""

    encoder: dict[str, torch.Tensor]  # the init checkpoint's ``model`` state dict
    run: SavedRun
    record: dict[str, Any]  # what the new run's checkpoints record as ``init``: path, sha256, step


def init_record(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``{"path", "sha256", "step"}`` of the checkpoint file a run started from."""
    return {"path": os.path.abspath(path), "sha256": sha256_file(path), "step": int(state.get("step") or 0)}


def load_init(init: str | os.PathLike[str], model_cfg: ModelConfig | None,
              say: Callable[[str], None]) -> InitSource:
    """The encoder, network and features of ``init`` (a run folder: its latest readable checkpoint, as
    ``-c`` finds it; or a checkpoint file, which needs only ``model`` and ``model_config``). ``model_cfg`` (``--model``), when given, must name the
    same network: the init run's is used, sizes and all."""
    state, path = load_resume_checkpoint(init, say, INIT_KEYS)  # an encoder alone will do
    run = saved_run(state, path)
    if model_cfg is not None and model_cfg.name != run.model_cfg.name:
        raise DvectorError(f"--model {model_cfg.name} differs from the {run.model_cfg.name!r} network of --init "
                           f"{run.where}: --init brings its own network and features; leave --model out")
    return InitSource(state["model"], run, init_record(path, state))


def start_from(model: nn.Module, init: InitSource, cfg: TrainConfig, say: Callable[[str], None]) -> None:
    """Copy the init run's encoder weights into ``model`` (strict: the same names and shapes), and say so."""
    try:
        model.load_state_dict(init.encoder, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise DvectorError(f"the encoder of --init {init.run.where} does not fit a {init.run.model_cfg.name!r} "
                           f"network: {first}") from None
    frozen = f"; only the loss's weights train for the first {cfg.freeze_steps} steps" if cfg.freeze_steps else ""
    say(f"starting from the encoder of {init.record['path']} (step {init.record['step']}): a new {cfg.loss} loss, "
        f"optimizer and schedule{frozen}")


def _differences(shards: FeatureConfig, network: FeatureConfig) -> str:
    a, b = shards.to_dict(), network.to_dict()
    return ", ".join(f"{k} {a.get(k)} here, {b.get(k)} there" for k in sorted({*a, *b}) if a.get(k) != b.get(k))


def check_shard_features(shards: FeatureConfig | None, model_cfg: ModelConfig, features: FeatureConfig | None,
                         where: str, verb: str = "continue") -> None:
    """Refuse shards (their index's ``shards`` features) that another front end made than the one the
    network of ``where`` (a continued or init run) was trained on: another mel width (``model_cfg.n_mels``),
    or any other feature setting (``features``, where that run recorded them). One line, naming the
    command that builds fitting shards (``verb``: what the user does with them, "continue" or "train")."""
    if shards is None:  # no index: the batches' mel width is still checked at the first step
        return
    rebuild = f"`dvector build-shards ROOT... -o OUT --features {where}`"
    if shards.n_mels != model_cfg.n_mels:
        raise DvectorError(f"these shards hold {shards.n_mels} mel bands per frame, but the network of {where} reads "
                           f"{model_cfg.n_mels}: {verb} on shards built with --n-mels {model_cfg.n_mels}, or with all "
                           f"its features: {rebuild}")
    if features is not None and features != shards:
        raise DvectorError(f"these shards were built with other features than the network of {where} "
                           f"({_differences(shards, features)}): {verb} on shards built with its features: {rebuild}")


def vad_note(shards_vad: dict[str, Any] | None, vad: dict[str, Any] | None, where: str) -> str:
    """A note when the shards were trimmed with other VAD settings than the run ``where``'s ("" if not)."""
    if shards_vad is None or vad is None or VadConfig.from_dict(shards_vad) == VadConfig.from_dict(vad):
        return ""
    return (f"note: these shards were trimmed with other VAD settings than {where}'s; this run records the "
            f"shards' (`dvector build-shards ROOT... -o OUT --features {where}` copies both)")


@dataclass
class Network:
    """The network a run trains, the features and VAD settings its checkpoints record, and where it started."""

    model_cfg: ModelConfig
    features: FeatureConfig | None
    vad: dict[str, Any] | None
    init: dict[str, Any] | None  # :func:`init_record` of the run's start (--init), carried on by -c


def settle_network(model_cfg: ModelConfig | None, index: dict[str, Any] | None, checkpoint: dict[str, Any] | None,
                   resume_path: Path | None, init: InitSource | None, say: Callable[[str], None]) -> Network:
    """A continued checkpoint's network (``--model`` is then ignored, with a note), an init run's, else
    ``model_cfg`` (default: "attentive") with the shards' n_mels. Refuses shards whose features differ
    from a continued or init run's (:func:`check_shard_features`). The shards' features and VAD
    settings (``index``) are what the run records, else the continued or init run's."""
    features = FeatureConfig.from_dict(index["config"]["features"]) if index else None
    vad = index["config"].get("vad") if index else None
    if checkpoint is None and init is None:
        model_cfg = model_cfg or ModelConfig.preset("attentive", n_mels=features.n_mels if features else 40)
        if features and model_cfg.n_mels != features.n_mels:
            model_cfg = replace(model_cfg, n_mels=features.n_mels)
        return Network(model_cfg, features, vad, None)
    if checkpoint is not None:
        assert resume_path is not None
        run = saved_run(checkpoint, resume_path)
        if model_cfg is not None and model_cfg.name != run.model_cfg.name:
            say(f"note: continuing the checkpoint's {run.model_cfg.name!r} model; --model {model_cfg.name} is ignored")
        record = run.init
    else:
        assert init is not None
        run, record = init.run, init.record
    check_shard_features(features, run.model_cfg, run.features, run.where, "continue" if checkpoint else "train")
    note = vad_note(vad, run.vad, run.where)
    if note:
        say(note)
    return Network(run.model_cfg, features or run.features, vad or run.vad, record)
