"""angleproto, softmaxproto and AAM-softmax against loops written from their definitions; the factory
and the criterion protocol."""

from __future__ import annotations

import math

import pytest
import torch

from dvector.config import LOSSES, ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.nn.criteria import CLASSIFIER_LOSSES, Criterion, make_criterion
from dvector.nn.loss import W_MIN, GE2ELoss, apply_paper_gradient_scale
from dvector.nn.margin import AAMSoftmax, additive_angular_margin, margin_at
from dvector.nn.model import DVector
from dvector.nn.proto import AngleProtoLoss, SoftmaxProtoLoss

TOL = dict(rtol=1e-9, atol=1e-9)


def cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.dot(x, y) / (torch.linalg.norm(x) * torch.linalg.norm(y))


def cross_entropy(logits: list, target: int) -> torch.Tensor:
    return -logits[target] + torch.log(sum(torch.exp(z) for z in logits))


def reference_angleproto(embeds: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chung et al. 2020: query = utterance 0, prototype = mean of the rest, softmax over speakers."""
    N, M, _ = embeds.shape
    anchors = [sum(embeds[k, i] for i in range(1, M)) / (M - 1) for k in range(N)]
    total = embeds.new_zeros(())
    for j in range(N):
        total = total + cross_entropy([w * cos(embeds[j, 0], anchors[k]) + b for k in range(N)], j)
    return total / N


def reference_aam(embeds: torch.Tensor, speakers: torch.Tensor, weight: torch.Tensor, m: float, s: float,
                  K: int) -> torch.Tensor:
    """ArcFace from its definition: angle to the best sub-centre, cos(theta + m) for the target
    while theta + m < pi, else cos(theta) - m sin(m); logits times s; mean cross-entropy."""
    rows = embeds.reshape(-1, embeds.size(-1))
    C = weight.size(0) // K
    total = rows.new_zeros(())
    for r in range(rows.size(0)):
        logits = []
        for c in range(C):
            best = max((cos(rows[r], weight[c * K + k]) for k in range(K)), key=lambda v: v.item())
            if c == int(speakers[r]):
                theta = torch.acos(best)
                best = torch.cos(theta + m) if theta.item() + m < math.pi else best - m * math.sin(m)
            logits.append(s * best)
        total = total + cross_entropy(logits, int(speakers[r]))
    return total / rows.size(0)


def batch(N: int, M: int, D: int, seed: int, n_classes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    ids = torch.randperm(max(n_classes, N), generator=gen)[:N]  # N distinct speakers of the table
    return embeds, ids.repeat_interleave(M)


def grads_of(loss_fn, embeds: torch.Tensor, params: list[torch.Tensor]) -> tuple[torch.Tensor, list]:
    x = embeds.clone().requires_grad_(True)
    loss = loss_fn(x)
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in params]


# ---- angleproto -----------------------------------------------------------------------------------


@pytest.mark.parametrize("N,M,D", [(2, 2, 3), (4, 3, 8), (5, 6, 16)])
def test_angleproto_matches_loop_reference(N, M, D):
    embeds, speakers = batch(N, M, D, seed=N * 100 + M)
    crit = AngleProtoLoss(init_w=7.5, init_b=-2.0).double()
    loss, grads = grads_of(lambda x: crit(x, speakers), embeds, [crit.w, crit.b])
    w_ref = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    b_ref = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = grads_of(lambda x: reference_angleproto(x, w_ref, b_ref), embeds, [w_ref, b_ref])
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert crit(embeds, None).item() == pytest.approx(loss.item())  # speakers are optional without gather


def test_angleproto_keeps_w_positive_like_ge2e():
    crit = AngleProtoLoss()
    with torch.no_grad():
        crit.w.fill_(-3.0)
    embeds, speakers = batch(3, 2, 4, seed=1)
    crit(embeds.float(), speakers).backward()
    assert crit.w.item() == pytest.approx(W_MIN) and crit.w.grad is not None
    assert crit.scalars() == {"w": pytest.approx(W_MIN), "b": -5.0}


def test_angleproto_masks_a_repeated_speaker():
    """A speaker twice in one batch: its other column is neither target nor negative."""
    embeds, _ = batch(3, 3, 5, seed=2)
    speakers = torch.tensor([7, 9, 7]).repeat_interleave(3)
    crit = AngleProtoLoss().double()
    logits = crit.w * torch.nn.functional.cosine_similarity(
        embeds[:, 0].unsqueeze(1), embeds[:, 1:].mean(1).unsqueeze(0), dim=-1) + crit.b  # (3, 3)
    logits[0, 2] = logits[2, 0] = float("-inf")
    want = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    torch.testing.assert_close(crit(embeds, speakers), want, **TOL)
    assert not torch.isclose(crit(embeds, None), want)


def test_angleproto_needs_two_utterances():
    with pytest.raises(DvectorError, match="M >= 2"):
        AngleProtoLoss()(torch.randn(4, 1, 8), torch.arange(4))


# ---- softmaxproto ---------------------------------------------------------------------------------


def test_softmaxproto_is_softmax_plus_angleproto():
    N, M, D, C = 4, 3, 6, 9
    embeds, speakers = batch(N, M, D, seed=3, n_classes=C)
    crit = SoftmaxProtoLoss(D, C).double()
    params = [crit.classifier.weight, crit.classifier.bias, crit.proto.w, crit.proto.b]
    loss, grads = grads_of(lambda x: crit(x, speakers), embeds, params)

    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    W, c, w, b = ref_params

    def reference(x):
        rows = x.reshape(N * M, D)
        softmax = sum(cross_entropy(list(W @ rows[r] + c), int(speakers[r])) for r in range(N * M)) / (N * M)
        return softmax + reference_angleproto(x, w, b)

    ref, ref_grads = grads_of(reference, embeds, ref_params)
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert crit.scalars() == {"w": 10.0, "b": -5.0}


# ---- AAM-softmax ----------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("N,M,D,C", [(2, 2, 4, 3), (3, 4, 8, 7)])
def test_aam_matches_loop_reference(N, M, D, C, K):
    embeds, speakers = batch(N, M, D, seed=10 * N + K, n_classes=C)
    crit = AAMSoftmax(D, C, margin=0.3, scale=20.0, subcentres=K).double()
    assert crit.weight.shape == (C * K, D)
    loss, grads = grads_of(lambda x: crit(x, speakers), embeds, [crit.weight])
    W = crit.weight.detach().clone().requires_grad_(True)
    ref, ref_grads = grads_of(lambda x: reference_aam(x, speakers, W, 0.3, 20.0, K), embeds, [W])
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_aam_subcentres_take_the_closest_centre():
    """With K = 2, moving a class's second centre onto an utterance makes that class's cosine 1."""
    crit = AAMSoftmax(4, 3, subcentres=2).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    with torch.no_grad():
        crit.weight[2 * 1 + 1] = 5 * x[0]  # class 1, sub-centre 1
    cosines = crit.cosines(x)
    assert cosines.shape == (1, 3)
    assert cosines[0, 1].item() == pytest.approx(1.0)


def test_aam_without_margin_is_normalised_softmax():
    embeds, speakers = batch(3, 4, 8, seed=4, n_classes=5)
    crit = AAMSoftmax(8, 5, margin=0.0, scale=30.0).double()
    rows = torch.nn.functional.normalize(embeds.reshape(12, 8), dim=-1)
    logits = 30.0 * rows @ torch.nn.functional.normalize(crit.weight, dim=-1).t()
    torch.testing.assert_close(crit(embeds, speakers), torch.nn.functional.cross_entropy(logits, speakers), **TOL)


def test_aam_fallback_past_the_antipode():
    """theta + m > pi: the target logit is cos(theta) - m sin(m), and both sides agree at the seam."""
    m = 0.5
    crit = AAMSoftmax(4, 2, margin=m, scale=10.0).double()
    x = torch.randn(2, 1, 4, dtype=torch.float64)
    speakers = torch.tensor([0, 0])
    with torch.no_grad():
        crit.weight[0] = -x[0, 0] + 0.01 * torch.randn(4, dtype=torch.float64)  # theta close to pi
    target_cos = crit.cosines(x[0]).detach()[0, 0]
    assert float(torch.acos(target_cos)) + m > math.pi
    logits = crit.logits(x[0], speakers[:1])
    assert logits[0, 0].item() == pytest.approx(10.0 * (target_cos.item() - m * math.sin(m)))
    W = crit.weight.detach().clone().requires_grad_(True)
    loss, grads = grads_of(lambda e: crit(e, speakers), x, [crit.weight])
    ref, ref_grads = grads_of(lambda e: reference_aam(e, speakers, W, m, 10.0, 1), x, [W])
    torch.testing.assert_close(loss, ref, **TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)
    # the seam at theta = pi - m: the margin form gives cos(pi) = -1 just before it, the fallback (the
    # recipes' "th/mm" form, not continuous) cos(theta) - m sin(m) just past it
    seam = math.cos(math.pi - m)
    before, after = additive_angular_margin(torch.tensor([seam + 1e-9, seam - 1e-9], dtype=torch.float64), m)
    assert before.item() == pytest.approx(-1.0, abs=1e-6)
    assert after.item() == pytest.approx(-math.cos(m) - m * math.sin(m), abs=1e-6)
    past = torch.linspace(-1.0, seam - 1e-6, 50, dtype=torch.float64)  # every cosine in the fallback region
    assert bool((additive_angular_margin(past, m) < past).all()), "the fallback is still a penalty"


def test_margin_warmup_is_a_function_of_the_step():
    assert [margin_at(s, 0.2, 100) for s in (0, 50, 100, 1000)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert margin_at(0, 0.2, 0) == 0.2
    crit = AAMSoftmax(8, 4, margin=0.2, margin_warmup=100)
    assert crit.scalars() == {"margin": 0.0}
    embeds, speakers = batch(2, 2, 8, seed=5, n_classes=4)
    values = []
    for step in (0, 50, 100, 1000):
        crit.begin_step(step)
        values.append((crit.scalars()["margin"], crit(embeds.float(), speakers).item()))
    assert [v[0] for v in values] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert values[0][1] < values[1][1] < values[2][1] == values[3][1]  # a larger margin, a larger loss
    resumed = AAMSoftmax(8, 4, margin=0.2, margin_warmup=100)
    resumed.begin_step(50)
    assert resumed.scalars()["margin"] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [4, -1])
def test_a_speaker_outside_the_table_is_a_clear_error(bad):
    embeds = torch.randn(2, 2, 8)
    speakers = torch.tensor([0, 0, 1, bad])
    for crit in (AAMSoftmax(8, 4), SoftmaxProtoLoss(8, 4)):
        with pytest.raises(DvectorError, match="outside the speaker table of 4 speakers"):
            crit(embeds, speakers)


def test_speakers_must_match_the_rows():
    with pytest.raises(DvectorError, match=r"shape \(4,\)"):
        AAMSoftmax(8, 4)(torch.randn(2, 2, 8), torch.tensor([0, 1]))
    with pytest.raises(DvectorError, match="speaker index"):
        AAMSoftmax(8, 4)(torch.randn(2, 2, 8), None)


# ---- the factory and the protocol -----------------------------------------------------------------


EXPECTED = {"ge2e": GE2ELoss, "contrast": GE2ELoss, "angleproto": AngleProtoLoss, "aamsoftmax": AAMSoftmax,
            "softmaxproto": SoftmaxProtoLoss}


@pytest.mark.parametrize("name", LOSSES)
def test_make_criterion_for_every_loss(name):
    cfg = TrainConfig(loss=name, reduction="mean", margin=0.3, scale=16.0, margin_warmup=10, subcentres=2,
                      gather=True)
    crit = make_criterion(cfg, 6, embed_dim=8)
    assert type(crit) is EXPECTED[name] and isinstance(crit, Criterion)
    assert crit.needs_classes == (name in CLASSIFIER_LOSSES)
    for method in ("forward", "begin_step", "project_", "scalars", "paper_scaled_parameters"):
        assert callable(getattr(crit, method))
    crit.begin_step(5)
    crit.project_()
    embeds = torch.randn(3, 2, 8, requires_grad=True)
    speakers = torch.tensor([0, 3, 5]).repeat_interleave(2)
    loss = crit(embeds, speakers)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    scalars = crit.scalars()
    assert all(isinstance(v, float) for v in scalars.values())
    if name in ("ge2e", "contrast"):
        assert crit.method == ("softmax" if name == "ge2e" else "contrast") and crit.reduction == "mean"
        assert set(scalars) == {"w", "b"} and crit.paper_scaled_parameters() == [crit.w, crit.b]
    else:
        assert crit.paper_scaled_parameters() == []
    if name == "aamsoftmax":
        assert scalars == {"margin": pytest.approx(0.15)} and crit.weight.shape == (12, 8) and crit.scale == 16.0
    if name in ("angleproto", "softmaxproto"):
        assert set(scalars) == {"w", "b"}
        assert (crit if name == "angleproto" else crit.proto).gather


def test_softmax_is_the_old_name_of_ge2e():
    crit = make_criterion(TrainConfig(loss="softmax"), None)
    assert isinstance(crit, GE2ELoss) and crit.method == "softmax" and crit.reduction == "sum"


@pytest.mark.parametrize("name", CLASSIFIER_LOSSES)
def test_classifier_losses_need_the_speaker_table(name):
    with pytest.raises(DvectorError, match="speaker table"):
        make_criterion(TrainConfig(loss=name), None, embed_dim=8)
    for name_ok in ("ge2e", "contrast", "angleproto"):
        assert make_criterion(TrainConfig(loss=name_ok), None) is not None


def test_ge2e_ignores_the_speakers():
    embeds, speakers = batch(3, 4, 5, seed=6)
    crit = GE2ELoss().double()
    torch.testing.assert_close(crit(embeds, speakers), crit(embeds), **TOL)


def test_paper_gradient_scale_leaves_other_criteria_alone():
    model = DVector(ModelConfig.preset("tiny"))
    crit = AngleProtoLoss()
    mels = torch.randn(6, 20, model.n_mels)
    crit(model(mels).view(3, 2, -1)).backward()
    before = crit.w.grad.clone(), [p.grad.clone() for p in model.projection_parameters()]
    apply_paper_gradient_scale(model, crit)
    assert torch.equal(crit.w.grad, before[0])
    for p, g in zip(model.projection_parameters(), before[1]):
        torch.testing.assert_close(p.grad, 0.5 * g)
