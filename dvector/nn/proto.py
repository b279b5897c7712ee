"""Angular prototypical loss (Chung et al. 2020, "In defence of metric learning", arXiv 2003.11982)
and softmax + angular prototypical, as clovaai/voxceleb_trainer ``loss/angleproto.py`` and
``loss/softmaxproto.py``.

AngleProto, for a batch ``(N, M, D)`` with M >= 2: each speaker's query (positive) is utterance 0,
its prototype (anchor) the mean of utterances 1..M-1; ``S = w cos(query_j, anchor_k) + b`` is
``(N, N)``; the loss is the mean cross-entropy with the diagonal as target. ``w`` (init 10) is
kept ``>= W_MIN`` by the same in-place projection as ``GE2ELoss`` (see ``dvector.nn.loss``), ``b``
starts at -5.

Gather (``gather=True``, under ``torch.distributed`` with world W > 1): every rank's anchors are
all-gathered with autograd (``torch.distributed.nn.functional.all_gather``), so each rank's N
queries are compared with all W*N anchors; a query's target is its own anchor's global column
``rank*N + j``. Two ranks may draw the same speaker: every other column whose speaker equals the
query's is masked out (it is neither target nor negative). Every rank must use the same N.

Gradients under DDP: the all-gather's backward sums, over ranks, the gradients each rank's loss
sends to this rank's anchors, so rank r's gradient is that of ``sum_q L_q`` with respect to rank
r's embeddings (its queries appear only in ``L_r``). DDP then averages over the W ranks: the
model's update is the gradient of ``mean_q L_q``, which is exactly the loss of one process on the
W*N-speaker batch (the mean over all W*N queries against all W*N anchors). Without gather each
rank's loss sees only its own N speakers and DDP averages W such losses. ``w`` and ``b`` get
each rank's own gradient; they stay equal across ranks only if the criterion's parameters are
averaged too (wrap them under DDP together with the encoder, or all-reduce their gradients).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.errors import DvectorError
from dvector.nn.criterion_base import Criterion
from dvector.nn.loss import COS_EPS, W_MIN
from dvector.nn.margin import check_speakers


def distributed_world() -> tuple[int, int]:
    """``(rank, world)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_anchors(anchors: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, int]:
    """All ranks' anchors ``(W*N, D)`` (differentiable), their speaker ids ``(W*N,)`` and this rank's
    first column ``rank*N``. Unchanged, with offset 0, outside ``torch.distributed`` or with W = 1."""
    rank, world = distributed_world()
    if world == 1:
        return anchors, ids, 0
    import torch.distributed.nn.functional as dist_fn  # autograd-aware collectives

    all_anchors = torch.cat(dist_fn.all_gather(anchors), dim=0)  # (W*N, D)
    id_parts = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(id_parts, ids.contiguous())
    return all_anchors, torch.cat(id_parts), rank * anchors.size(0)


class AngleProtoLoss(Criterion):
    """Angular prototypical loss: ``forward(embeds (N, M, D), speakers (N*M,) or None) -> scalar`` (mean).

    ``speakers`` is only needed to mask out other columns of a query's own speaker (with gather,
    where two ranks may draw one speaker); it is required when ``gather`` is set.
    """

    def __init__(self, init_w: float = 10.0, init_b: float = -5.0, gather: bool = False) -> None:
        super().__init__()
        if not init_w > 0:
            raise DvectorError(f"angleproto w must start positive, got {init_w}")
        self.gather = bool(gather)
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))

    def forward(self, embeds: Tensor, speakers: Optional[Tensor] = None) -> Tensor:
        if embeds.dim() != 3 or embeds.size(1) < 2:
            raise DvectorError(f"angleproto needs embeddings (N, M, D) with M >= 2 utterances per speaker "
                               f"(one query, the rest its prototype); got shape {list(embeds.shape)}")
        N, M, D = embeds.shape
        ids = None
        if speakers is not None:
            check_speakers(speakers, N * M, None, "angleproto")
            ids = speakers.view(N, M)[:, 0].long()  # (N,)
        elif self.gather:
            raise DvectorError("angleproto with gather needs every row's speaker index (to mask shared speakers)")
        self.project_()
        queries = embeds[:, 0]  # (N, D)
        anchors = embeds[:, 1:].mean(dim=1)  # (N, D)
        offset = 0
        if self.gather:
            anchors, ids, offset = gather_anchors(anchors, ids)  # (A, D), (A,): A = W*N
        cos = F.normalize(queries, dim=-1, eps=COS_EPS) @ F.normalize(anchors, dim=-1, eps=COS_EPS).t()  # (N, A)
        logits = self.w * cos + self.b  # (N, A)
        target = torch.arange(N, device=embeds.device) + offset  # (N,)
        if ids is not None:
            own = ids[offset:offset + N]  # (N,): this rank's query speakers
            same = own.unsqueeze(1) == ids.unsqueeze(0)  # (N, A)
            same[torch.arange(N, device=embeds.device), target] = False
            logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, target)

    # ---- the criterion protocol (dvector.nn.criteria) ----

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``w`` in place onto ``[W_MIN, inf)`` (called by ``forward``; harmless to repeat)."""
        self.w.clamp_(min=W_MIN)

    def scalars(self) -> dict[str, float]:
        return {"w": float(self.w.detach()), "b": float(self.b.detach())}

    def extra_repr(self) -> str:
        return f"gather={self.gather}"


class SoftmaxProtoLoss(Criterion):
    """Softmax classifier over the speaker table (``Linear(D, n_classes)``, mean cross-entropy over all
    N*M rows) plus angular prototypical loss, summed. ``forward(embeds (N, M, D), speakers (N*M,))``."""

    needs_classes = True

    def __init__(self, embed_dim: int, n_classes: int, gather: bool = False) -> None:
        super().__init__()
        if embed_dim < 1 or n_classes < 1:
            raise DvectorError(f"softmaxproto needs embed_dim and n_classes >= 1, got {embed_dim}, {n_classes}")
        self.n_classes = int(n_classes)
        self.classifier = nn.Linear(embed_dim, n_classes)
        self.proto = AngleProtoLoss(gather=gather)

    def forward(self, embeds: Tensor, speakers: Tensor) -> Tensor:
        if embeds.dim() != 3:
            raise DvectorError(f"softmaxproto expects embeddings (N, M, D), got shape {list(embeds.shape)}")
        N, M, D = embeds.shape
        check_speakers(speakers, N * M, self.n_classes, "softmaxproto")
        softmax = F.cross_entropy(self.classifier(embeds.reshape(N * M, D)), speakers.long())
        return softmax + self.proto(embeds, speakers)

    def project_(self) -> None:
        self.proto.project_()

    def scalars(self) -> dict[str, float]:
        return self.proto.scalars()
