"""The base every training criterion derives from: the protocol the trainer calls, with do-nothing defaults.

A criterion overrides only what it has (see ``dvector.nn.criteria`` for the protocol): ``begin_step``
(AAM-softmax's margin warm-up), ``project_`` (keeping a scale ``w`` positive), ``scalars`` (what to
log) and ``paper_scaled_parameters`` (GE2E's w and b).
"""

from __future__ import annotations

from torch import nn


class Criterion(nn.Module):
    """``forward(embeds (N, M, D), speakers (N*M,)) -> scalar``, plus the trainer's hooks below."""

    needs_classes = False  # True: classifies over the index's speaker table (needs n_classes)

    def begin_step(self, step: int) -> None:
        """Called before each step with the step about to be taken."""

    def project_(self) -> None:
        """Keep constrained parameters in bounds (after ``optimizer.step()``)."""

    def scalars(self) -> dict[str, float]:
        """What to log."""
        return {}

    def paper_scaled_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients the GE2E paper scales by 0.01."""
        return []
