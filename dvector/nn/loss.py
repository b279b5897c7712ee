"""The generalized end-to-end (GE2E) loss (Wan et al. 2018, arXiv 1710.10467), fully vectorised.

For a batch of N speakers x M utterances with embeddings ``e_ji`` (speaker j, utterance i):

- centroids ``c_k = mean_i e_ki``; for the utterance's own speaker the centroid excludes the
  utterance itself: ``c_j^(-i) = (M c_j - e_ji) / (M - 1)`` (paper eq. 8);
- similarity ``S_ji,k = w cos(e_ji, c_k) + b`` with ``w > 0`` (eq. 5, 9);
- softmax: ``L(e_ji) = -S_ji,j + log sum_k exp(S_ji,k)`` (eq. 6);
- contrast: ``L(e_ji) = 1 - sigmoid(S_ji,j) + max_{k != j} sigmoid(S_ji,k)`` (eq. 7);
- the loss is summed over all N*M utterances (the paper, so that its SGD lr 0.01 applies), or
  averaged with ``reduction="mean"``.

The similarity matrix is ``(N*M, N)``: one matrix product of unit utterance embeddings with unit
centroids, whose own-speaker column is then replaced by the cosine with the exclusive centroid.
No ``N*M*N*D`` tensor and no Python loop over speakers or utterances.

Keeping ``w`` positive: ``forward`` first projects the parameter in place, under ``no_grad``,
onto ``[W_MIN, inf)`` and then uses the parameter itself. This is projected gradient descent:
the value used is always positive, gradients still flow to ``w`` (so a ``w`` pushed to the
bound can come back), and the stored parameter equals the value used. The trainer may also call
``project_()`` right after ``optimizer.step()`` so that a checkpoint never holds ``w < W_MIN``.
Caveat of the in-place update: run ``backward`` for one forward before the next forward on the
same criterion (summing two forwards' losses before one backward fails loudly with autograd's
"modified by an inplace operation" error; it never computes silently wrong gradients).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dvector.errors import DvectorError
from dvector.nn.criterion_base import Criterion

W_MIN = 1e-6  # lower bound of the similarity scale w (the paper requires w > 0)
COS_EPS = 1e-8  # norms below this count as this when normalising (zero vectors stay finite)

METHODS = ("softmax", "contrast")
REDUCTIONS = ("sum", "mean")


def cosine_similarity_matrix(embeds: Tensor, eps: float = COS_EPS) -> Tensor:
    """Cosines of every utterance with every speaker centroid, own centroid exclusive.

    ``embeds``: (N, M, D) with M >= 2. Returns (N, M, N): entry ``[j, i, k]`` is
    ``cos(e_ji, c_k)`` for ``k != j`` and ``cos(e_ji, c_j^(-i))`` for ``k == j``.
    """
    assert embeds.dim() == 3 and embeds.size(1) >= 2, f"need (N, M>=2, D), got {list(embeds.shape)}"
    N, M, D = embeds.shape
    totals = embeds.sum(dim=1, keepdim=True)  # (N, 1, D)
    centroids = totals / M  # (N, 1, D)
    exclusive = (totals - embeds) / (M - 1)  # (N, M, D): (M c_j - e_ji) / (M - 1)

    unit = F.normalize(embeds, dim=-1, eps=eps)  # (N, M, D)
    unit_centroids = F.normalize(centroids.view(N, D), dim=-1, eps=eps)  # (N, D)
    unit_exclusive = F.normalize(exclusive, dim=-1, eps=eps)  # (N, M, D)

    cos_all = (unit.reshape(N * M, D) @ unit_centroids.t()).view(N, M, N)  # (N, M, N)
    cos_own = (unit * unit_exclusive).sum(dim=-1)  # (N, M)
    own = torch.eye(N, dtype=torch.bool, device=embeds.device).view(N, 1, N)  # (N, 1, N)
    return torch.where(own, cos_own.unsqueeze(-1), cos_all)  # (N, M, N)


class GE2ELoss(Criterion):
    """GE2E loss over a batch of embeddings ``(N, M, D)``, returning a scalar.

    ``method``: ``"softmax"`` (default) or ``"contrast"``. ``reduction``: ``"sum"`` (default,
    the paper's) or ``"mean"`` over the N*M utterances. ``w`` (init 10) and ``b`` (init -5) are
    learnable; ``w`` is kept ``>= W_MIN`` by an in-place projection at the start of every
    forward (see the module docstring). Needs N >= 2 speakers and M >= 2 utterances each.
    Follows the criterion protocol of ``dvector.nn.criteria`` (``forward`` takes and ignores the
    rows' speaker indices: GE2E needs only the batch's N x M layout).
    """

    def __init__(
        self,
        method: str = "softmax",
        reduction: str = "sum",
        init_w: float = 10.0,
        init_b: float = -5.0,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise DvectorError(f"GE2E method must be one of {METHODS}, got {method!r}")
        if reduction not in REDUCTIONS:
            raise DvectorError(f"GE2E reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not init_w > 0:
            raise DvectorError(f"GE2E w must start positive, got {init_w}")
        self.method = method
        self.reduction = reduction
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp ``w`` in place onto ``[W_MIN, inf)`` (called by ``forward``; harmless to repeat)."""
        self.w.clamp_(min=W_MIN)

    def similarity(self, embeds: Tensor) -> Tensor:
        """The scaled similarity matrix ``S = w cos + b``, shape (N, M, N) (no projection of w)."""
        return self.w * cosine_similarity_matrix(embeds) + self.b  # (N, M, N)

    def forward(self, embeds: Tensor, speakers: Optional[Tensor] = None) -> Tensor:
        if embeds.dim() != 3:
            raise DvectorError(f"GE2E loss expects embeddings (N, M, D), got shape {list(embeds.shape)}")
        N, M, _ = embeds.shape
        if N < 2 or M < 2:
            raise DvectorError(f"GE2E loss needs at least 2 speakers x 2 utterances, got N={N}, M={M}")
        self.project_()
        S = self.similarity(embeds).reshape(N * M, N)  # (N*M, N)
        target = torch.arange(N, device=embeds.device).repeat_interleave(M)  # (N*M,)
        if self.method == "softmax":
            losses = F.cross_entropy(S, target, reduction="none")  # (N*M,)
        else:
            sig = torch.sigmoid(S)  # (N*M, N)
            own = F.one_hot(target, N).bool()  # (N*M, N)
            sig_own = sig.gather(1, target.unsqueeze(1)).squeeze(1)  # (N*M,)
            sig_other = sig.masked_fill(own, float("-inf")).amax(dim=1)  # (N*M,)
            losses = 1.0 - sig_own + sig_other  # (N*M,)
        return losses.sum() if self.reduction == "sum" else losses.mean()

    # ---- the rest of the criterion protocol (dvector.nn.criterion_base) ----

    def scalars(self) -> dict[str, float]:
        return {"w": float(self.w.detach()), "b": float(self.b.detach())}

    def paper_scaled_parameters(self) -> list[nn.Parameter]:
        """``[w, b]``: the paper scales their gradients by 0.01."""
        return [self.w, self.b]

    def extra_repr(self) -> str:
        return f"method={self.method!r}, reduction={self.reduction!r}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel/DataParallel wrappers (or the model itself)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def _scale_grads(params: Iterable[Tensor], scale: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)


@torch.no_grad()
def apply_paper_gradient_scale(
    model: nn.Module,
    criterion: nn.Module,
    projection_scale: float = 0.5,
    wb_scale: float = 0.01,
) -> None:
    """The paper's gradient scales: x0.5 on the projection parameters, x0.01 on ``w`` and ``b``.

    ``criterion``: any criterion of ``dvector.nn.criteria``; its ``paper_scaled_parameters()``
    (GE2E's ``[w, b]``, nothing for the other losses) get the ``wb_scale``.

    Call after ``loss.backward()`` and BEFORE ``clip_grad_norm_(..., 3.0)``: the scaled gradients
    are what gets clipped, then stepped (the original project clipped first, so its clipping saw
    unscaled gradients). ``model`` may be wrapped in DDP; its ``projection_parameters()`` says
    which parameters count as the projection (see ``DVector.projection_parameters``); an encoder
    without that method (ECAPA, ResNet) has none. Parameters without a gradient are left alone.
    """
    inner = _unwrap(model)
    projection = getattr(inner, "projection_parameters", None)
    if projection is not None:  # the LSTM d-vectors; the convolutional encoders have no projection
        _scale_grads(projection(), projection_scale)
    _scale_grads(criterion.paper_scaled_parameters(), wb_scale)
