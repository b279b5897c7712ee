"""GE2E loss: the vectorised loss against a loop written straight from the paper's equations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dvector.config import ModelConfig
from dvector.errors import DvectorError
from dvector.nn.loss import W_MIN, GE2ELoss, apply_paper_gradient_scale
from dvector.nn.model import DVector

METHODS = ("softmax", "contrast")
REDUCTIONS = ("sum", "mean")


def reference_ge2e(embeds: torch.Tensor, w: torch.Tensor, b: torch.Tensor, method: str, reduction: str) -> torch.Tensor:
    """GE2E from Wan et al. 2018, eqs. 5-9, one utterance and one centroid at a time."""
    N, M, _ = embeds.shape
    total = embeds.new_zeros(())
    for j in range(N):
        for i in range(M):
            e_ji = embeds[j, i]
            S = []
            for k in range(N):
                if k == j:  # eq. 8: the own centroid leaves the utterance out
                    c = sum(embeds[j, m] for m in range(M) if m != i) / (M - 1)
                else:  # eq. 1
                    c = sum(embeds[k, m] for m in range(M)) / M
                cos = torch.dot(e_ji, c) / (torch.linalg.norm(e_ji) * torch.linalg.norm(c))
                S.append(w * cos + b)  # eq. 5 / 9
            if method == "softmax":  # eq. 6
                loss = -S[j] + torch.log(sum(torch.exp(s) for s in S))
            else:  # eq. 7
                loss = 1 - torch.sigmoid(S[j]) + max(torch.sigmoid(S[k]) for k in range(N) if k != j)
            total = total + loss
    return total if reduction == "sum" else total / (N * M)


def _compare(N: int, M: int, D: int, method: str, reduction: str, seed: int, w: float = 10.0, b: float = -5.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(N, M, D, generator=gen, dtype=torch.float64)

    criterion = GE2ELoss(method, reduction, init_w=w, init_b=b).double()
    w, b = criterion.w.item(), criterion.b.item()  # the float32-rounded initial values
    x = embeds.clone().requires_grad_(True)
    loss = criterion(x)
    loss.backward()

    w_ref = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    b_ref = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    x_ref = embeds.clone().requires_grad_(True)
    loss_ref = reference_ge2e(x_ref, w_ref, b_ref, method, reduction)
    loss_ref.backward()

    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss, loss_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(criterion.w.grad, w_ref.grad, **tol)
    torch.testing.assert_close(criterion.b.grad, b_ref.grad, **tol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,M,D", [(2, 2, 3), (3, 4, 8), (5, 3, 16), (4, 6, 32)])
def test_matches_loop_reference(N: int, M: int, D: int, method: str, reduction: str) -> None:
    _compare(N, M, D, method, reduction, seed=N * 100 + M * 10 + D)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(2, 5),
    M=st.integers(2, 5),
    D=st.integers(1, 8),
    method=st.sampled_from(METHODS),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**31 - 1),
    w=st.floats(0.1, 20.0),
    b=st.floats(-10.0, 10.0),
)
def test_matches_loop_reference_hypothesis(N, M, D, method, reduction, seed, w, b) -> None:
    _compare(N, M, D, method, reduction, seed, w=w, b=b)


def test_float32_close_to_reference() -> None:
    embeds = torch.randn(6, 5, 64, generator=torch.Generator().manual_seed(1))
    for method in METHODS:
        loss = GE2ELoss(method)(embeds)
        ref = reference_ge2e(embeds.double(), torch.tensor(10.0).double(), torch.tensor(-5.0).double(), method, "sum")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)


def _anti_clustered(N: int = 4, D: int = 8) -> torch.Tensor:
    """Each speaker's two utterances point in opposite directions: every step lowers w."""
    v = torch.randn(N, 1, D, generator=torch.Generator().manual_seed(0))
    return torch.cat([v, -v], dim=1)  # (N, 2, D)


@pytest.mark.parametrize("method", METHODS)
def test_w_stays_positive_under_optimizer(method: str) -> None:
    criterion = GE2ELoss(method, init_w=1.0, init_b=0.0)
    optimizer = torch.optim.SGD(criterion.parameters(), lr=5.0)
    embeds = _anti_clustered()
    w_min = torch.tensor(W_MIN).item()  # the bound as a float32 parameter holds it
    pushed_below = False
    for _ in range(10):
        optimizer.zero_grad()
        loss = criterion(embeds)
        assert criterion.w.item() >= w_min  # the value this forward used
        assert torch.isfinite(loss)
        loss.backward()
        assert criterion.w.grad is not None and criterion.w.grad.item() != 0  # gradient still flows
        optimizer.step()
        pushed_below |= criterion.w.item() < 0
    assert pushed_below, "the test setup should push w below zero"
    criterion.project_()
    assert criterion.w.item() >= w_min


def test_w_recovers_from_the_bound() -> None:
    criterion = GE2ELoss()
    with torch.no_grad():
        criterion.w.fill_(-3.0)
    # Well-separated speakers: the loss wants a larger w, and the projected w can grow again.
    centres = torch.eye(4, 8).unsqueeze(1)  # (4, 1, 8)
    embeds = centres + 0.05 * torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(criterion.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        criterion(embeds).backward()
        optimizer.step()
    assert criterion.w.item() > 0.1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(3, 4, 8),  # all-zero embeddings
        lambda: torch.ones(3, 4, 8),  # every embedding identical
        lambda: torch.randn(1, 1, 8).expand(3, 2, 8).clone(),  # identical, M = 2
        lambda: torch.randn(2, 2, 8),  # smallest batch
        _anti_clustered,  # zero centroids
    ],
    ids=["zeros", "identical", "identical-M2", "N2-M2", "zero-centroids"],
)
def test_finite_on_degenerate_inputs(make, method: str, reduction: str) -> None:
    criterion = GE2ELoss(method, reduction)
    embeds = make().requires_grad_(True)
    loss = criterion(embeds)
    loss.backward()
    assert torch.isfinite(loss)
    for grad in (embeds.grad, criterion.w.grad, criterion.b.grad):
        assert grad is not None and torch.isfinite(grad).all()


def test_rejects_bad_input() -> None:
    with pytest.raises(DvectorError):
        GE2ELoss("triplet")
    with pytest.raises(DvectorError):
        GE2ELoss(reduction="max")
    with pytest.raises(DvectorError):
        GE2ELoss(init_w=0.0)
    criterion = GE2ELoss()
    for shape in [(1, 4, 8), (4, 1, 8), (4, 8)]:
        with pytest.raises(DvectorError):
            criterion(torch.randn(*shape))


def test_sum_is_mean_times_batch() -> None:
    embeds = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(3))
    for method in METHODS:
        total = GE2ELoss(method, "sum")(embeds)
        mean = GE2ELoss(method, "mean")(embeds)
        torch.testing.assert_close(total, mean * 20)


def test_invariant_to_embedding_scale() -> None:
    embeds = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(4))
    criterion = GE2ELoss()
    torch.testing.assert_close(criterion(embeds), criterion(embeds * 7.5))


def _fill_grads(*modules: nn.Module) -> None:
    for module in modules:
        for p in module.parameters():
            p.grad = torch.ones_like(p)


def _check_scaled(model: DVector, criterion: GE2ELoss, wrapped: nn.Module) -> set[str]:
    _fill_grads(model, criterion)
    apply_paper_gradient_scale(wrapped, criterion)
    projection = {id(p) for p in model.projection_parameters()}
    assert projection, "a model always has projection parameters"
    names = set()
    for name, p in model.named_parameters():
        expected = 0.5 if id(p) in projection else 1.0
        assert torch.all(p.grad == expected), name
        if id(p) in projection:
            names.add(name)
    assert criterion.w.grad.item() == pytest.approx(0.01)
    assert criterion.b.grad.item() == pytest.approx(0.01)
    return names


def test_gradient_scale_paper_projection() -> None:
    config = ModelConfig.preset("paper", hidden_size=16, proj_size=8, embed_dim=8)
    model = DVector(config)
    names = _check_scaled(model, GE2ELoss(), model)
    assert names == {"lstm.weight_hr_l0", "lstm.weight_hr_l1", "lstm.weight_hr_l2"}


class _Wrapper(nn.Module):  # stands in for DistributedDataParallel
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_gradient_scale_attention_embedding_through_wrapper() -> None:
    model = DVector(ModelConfig.preset("tiny"))
    names = _check_scaled(model, GE2ELoss(), _Wrapper(model))
    assert names == {"embedding.weight", "embedding.bias"}


def test_gradient_scale_skips_missing_grads() -> None:
    model = DVector(ModelConfig.preset("tiny"))
    criterion = GE2ELoss()
    apply_paper_gradient_scale(model, criterion)  # no gradients yet: nothing to do, no error
    assert all(p.grad is None for p in model.parameters())
