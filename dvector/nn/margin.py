"""Additive angular margin softmax (AAM-softmax, ArcFace: Deng et al. 2019, arXiv 1801.07698).

A classifier over the index's speaker table: class weights ``W`` (``n_classes x K``, D), unit
rows; every utterance's cosine with every class; with ``K > 1`` sub-centres per class (sub-centre
ArcFace, Deng et al. 2020) a class's cosine is the largest of its K. The target class's cosine
``cos θ`` becomes ``cos(θ + m)``, all logits are multiplied by ``s``, and the loss is the mean
cross-entropy over the N*M utterances (as clovaai/voxceleb_trainer ``loss/aamsoftmax.py`` and
WeSpeaker's ``ArcMarginProduct``).

Where ``θ + m > π`` the function ``cos(θ + m)`` is no longer decreasing in θ (a target pushed past
the antipode would be rewarded); there, as in those implementations (``th = cos(π - m)``,
``mm = sin(π - m) m``), the target logit is ``cos θ - m sin m`` instead: still decreasing in θ and
still a penalty (below ``cos θ``). It is not continuous at ``θ = π - m``: it lies about ``m²/2``
below ``cos(θ + m) = -1`` there; kept as is, since it is the form those recipes were tuned with.

Margin warm-up: ``begin_step(step)`` sets the margin used to ``m * min(1, step / warmup)`` (``m``
at once when warmup is 0). It is a pure function of the step, never state of its own, so a run
resumed at step k uses the margin of step k.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.errors import DvectorError
from dvector.nn.criterion_base import Criterion

SINE_FLOOR = 1e-12  # 1 - cos^2 is floored here so that sqrt's gradient stays finite at cos = +-1


def check_speakers(speakers: Optional[Tensor], rows: int, n_classes: Optional[int], who: str) -> None:
    """Raise a one-line DvectorError unless ``speakers`` is ``(rows,)`` integer indices in ``[0, n_classes)``
    (no upper bound when ``n_classes`` is None)."""
    if speakers is None:
        raise DvectorError(f"{who} needs every row's speaker index (got none)")
    if speakers.shape != (rows,) or speakers.dtype.is_floating_point:
        raise DvectorError(f"{who} needs speaker indices of shape ({rows},), integers; "
                           f"got {list(speakers.shape)} {speakers.dtype}")
    # on a GPU this check would cost a device sync every step; there the shard reader (which drops a sample whose
    # speaker index lies outside the index's table) and cross_entropy's own device-side check stand for it
    if n_classes is not None and rows and not speakers.is_cuda and (
            int(speakers.min()) < 0 or int(speakers.max()) >= n_classes):
        raise DvectorError(f"{who}: speaker index {int(speakers.max())} (min {int(speakers.min())}) lies outside "
                           f"the speaker table of {n_classes} speakers the classifier was built for; "
                           "were the shards built with another index?")


def margin_at(step: int, margin: float, warmup: int) -> float:
    """The margin in use at ``step``: linear from 0 to ``margin`` over ``warmup`` steps, then ``margin``."""
    if warmup <= 0:
        return float(margin)
    return float(margin) * min(1.0, max(0, step) / warmup)


def additive_angular_margin(cos_target: Tensor, margin: float) -> Tensor:
    """``cos(θ + m)`` of target cosines ``cos θ`` (any shape), ``cos θ - m sin m`` where ``θ + m > π``."""
    sine = torch.sqrt((1.0 - cos_target * cos_target).clamp(min=SINE_FLOOR))
    phi = cos_target * math.cos(margin) - sine * math.sin(margin)  # cos(θ + m)
    threshold = math.cos(math.pi - margin)  # cos θ > this  <=>  θ + m < π
    return torch.where(cos_target > threshold, phi, cos_target - margin * math.sin(margin))


class AAMSoftmax(Criterion):
    """AAM-softmax criterion: ``forward(embeds (N, M, D), speakers (N*M,)) -> scalar`` (mean).

    ``weight``: ``(n_classes * subcentres, D)``, rows ``c*K .. c*K+K-1`` are class c's sub-centres.
    Follows the criterion protocol of ``dvector.nn.criteria``.
    """

    needs_classes = True

    def __init__(self, embed_dim: int, n_classes: int, margin: float = 0.2, scale: float = 30.0,
                 margin_warmup: int = 0, subcentres: int = 1) -> None:
        super().__init__()
        if embed_dim < 1 or n_classes < 1 or subcentres < 1:
            raise DvectorError(f"AAM-softmax needs embed_dim, n_classes and subcentres >= 1; "
                               f"got {embed_dim}, {n_classes}, {subcentres}")
        if not (0 <= margin < math.pi / 2 and scale > 0 and margin_warmup >= 0):
            raise DvectorError(f"AAM-softmax needs 0 <= margin < pi/2, scale > 0, warm-up >= 0; "
                               f"got {margin}, {scale}, {margin_warmup}")
        self.n_classes, self.subcentres = int(n_classes), int(subcentres)
        self.margin, self.scale, self.margin_warmup = float(margin), float(scale), int(margin_warmup)
        self.margin_now = margin_at(0, self.margin, self.margin_warmup)
        self.weight = nn.Parameter(torch.empty(self.n_classes * self.subcentres, embed_dim))
        nn.init.xavier_normal_(self.weight, gain=1.0)

    def cosines(self, x: Tensor) -> Tensor:
        """Cosines of rows ``x`` (B, D) with every class, the best sub-centre's: (B, n_classes)."""
        cos = F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))  # (B, C*K)
        if self.subcentres > 1:
            cos = cos.view(x.size(0), self.n_classes, self.subcentres).amax(dim=2)  # (B, C)
        return cos

    def logits(self, x: Tensor, speakers: Tensor) -> Tensor:
        """``s * cos`` with the target column's cosine replaced by its margin form: (B, n_classes)."""
        cos = self.cosines(x)  # (B, C)
        target = speakers.view(-1, 1)  # (B, 1)
        with_margin = additive_angular_margin(cos.gather(1, target), self.margin_now)  # (B, 1)
        return self.scale * cos.scatter(1, target, with_margin)  # (B, C)

    def forward(self, embeds: Tensor, speakers: Tensor) -> Tensor:
        if embeds.dim() != 3:
            raise DvectorError(f"AAM-softmax expects embeddings (N, M, D), got shape {list(embeds.shape)}")
        N, M, D = embeds.shape
        check_speakers(speakers, N * M, self.n_classes, "AAM-softmax")
        speakers = speakers.long()
        return F.cross_entropy(self.logits(embeds.reshape(N * M, D), speakers), speakers)

    # ---- the criterion protocol (dvector.nn.criterion_base) ----

    def begin_step(self, step: int) -> None:
        self.margin_now = margin_at(step, self.margin, self.margin_warmup)

    def scalars(self) -> dict[str, float]:
        return {"margin": self.margin_now}

    def extra_repr(self) -> str:
        return (f"n_classes={self.n_classes}, subcentres={self.subcentres}, margin={self.margin}, "
                f"scale={self.scale}, margin_warmup={self.margin_warmup}")
