"""The training criteria and their factory: ``make_criterion(cfg, n_classes, embed_dim=...)``.

``TrainConfig.loss`` names one of the losses of clovaai/voxceleb_trainer (``LOSSES``):

- ``ge2e`` / ``contrast``: ``GE2ELoss("softmax" | "contrast", cfg.reduction)`` (``dvector.nn.loss``);
- ``angleproto``: ``AngleProtoLoss(gather=cfg.gather)`` (``dvector.nn.proto``);
- ``aamsoftmax``: ``AAMSoftmax`` with ``cfg.margin``, ``scale``, ``margin_warmup``, ``subcentres``
  (``dvector.nn.margin``), a classifier over the index's speaker table;
- ``softmaxproto``: ``SoftmaxProtoLoss`` (softmax classifier + angleproto, ``cfg.gather``).

The protocol every criterion follows (``Criterion``, in ``dvector.nn.criterion_base``, with do-nothing
defaults), so the trainer needs no case per loss:

- ``forward(embeds, speakers) -> Tensor``: ``embeds`` (N, M, D), rows speaker-major; ``speakers``
  (N*M,) int64, each row's index into the shard index's speaker table; returns a scalar.
- ``begin_step(step) -> None``: called before each step with the step about to be taken (counted
  as the trainer counts them); only AAM-softmax uses it (its margin warm-up, a pure function of
  the step, so a resumed run continues exactly).
- ``project_() -> None``: keep ``w >= W_MIN`` (call after ``optimizer.step()``); a no-op where
  there is no ``w``.
- ``scalars() -> dict[str, float]``: what to log: ``{"w", "b"}`` for GE2E, angleproto and
  softmaxproto (its angleproto's), ``{"margin"}`` (the one in use) for AAM-softmax.
- ``paper_scaled_parameters() -> list[nn.Parameter]``: GE2E's ``[w, b]``, whose gradients the
  paper scales by 0.01 (``apply_paper_gradient_scale``); ``[]`` for the others.
- ``needs_classes: bool`` (class attribute): whether it classifies over the speaker table and so
  needs ``n_classes`` (aamsoftmax, softmaxproto).

Criteria with parameters of their own (all of them: w, b or class weights) must be optimised with
the encoder and, under DDP, kept equal across ranks (e.g. wrapped in one module with the encoder).
"""

from __future__ import annotations

from typing import Optional

from dvector.config import LOSSES, TrainConfig
from dvector.errors import DvectorError
from dvector.nn.criterion_base import Criterion
from dvector.nn.loss import GE2ELoss
from dvector.nn.margin import AAMSoftmax
from dvector.nn.proto import AngleProtoLoss, SoftmaxProtoLoss

CLASSIFIER_LOSSES = ("aamsoftmax", "softmaxproto")  # the ones that need the index's speaker table

__all__ = ["CLASSIFIER_LOSSES", "Criterion", "make_criterion"]


def make_criterion(cfg: TrainConfig, n_classes: Optional[int], embed_dim: Optional[int] = None) -> Criterion:
    """The criterion ``cfg.loss`` names. ``n_classes``: the size of the shard index's speaker table
    (None when the shards have no index); ``embed_dim``: the encoder's output size. Both are needed
    only by the classifier losses (aamsoftmax, softmaxproto)."""
    loss = cfg.loss
    if loss not in LOSSES:
        raise DvectorError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if loss == "ge2e":
        return GE2ELoss("softmax", cfg.reduction)
    if loss == "contrast":
        return GE2ELoss("contrast", cfg.reduction)
    if loss == "angleproto":
        return AngleProtoLoss(gather=cfg.gather)
    if n_classes is None:
        raise DvectorError(f"--loss {loss} classifies over the speakers of the shards' index.json (its speaker "
                           "table), but these shards have no index; build them with `dvector build-shards` or use "
                           "ge2e, contrast or angleproto")
    if n_classes < 2:
        raise DvectorError(f"--loss {loss} needs at least 2 speakers in the index's speaker table, got {n_classes}")
    if embed_dim is None:
        raise DvectorError(f"--loss {loss} needs the encoder's embedding size to build its classifier")
    if loss == "aamsoftmax":
        return AAMSoftmax(embed_dim, n_classes, margin=cfg.margin, scale=cfg.scale,
                          margin_warmup=cfg.margin_warmup, subcentres=cfg.subcentres)
    return SoftmaxProtoLoss(embed_dim, n_classes, gather=cfg.gather)
