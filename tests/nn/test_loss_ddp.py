"""The losses under torch.distributed: two CPU processes, gloo.

(a) An encoder and AAM-softmax wrapped together in one DistributedDataParallel module, different data
    on each rank: after a few SGD steps every parameter, the classifier's included, is the same on
    both ranks and has moved.
(b) angleproto with gather: each rank's loss (and its gradients) equal a single-process loop over
    both ranks' batches in which every query meets every rank's anchors, and a speaker drawn by both
    ranks is masked out.

Both scenarios run in one spawn of two processes (started once per module; the rendezvous is a
TCP store that the test process holds on a port the OS picks).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dvector.config import ModelConfig
from dvector.nn.margin import AAMSoftmax
from dvector.nn.model import DVector
from dvector.nn.proto import AngleProtoLoss

WORLD = 2
N, M, D, C, T = 3, 2, 64, 7, 12  # speakers, utterances, embedding size, classes, frames
STEPS = 3
RANK_SPEAKERS = ([0, 1, 2], [3, 1, 4])  # speaker 1 is drawn by both ranks


class EncoderWithLoss(nn.Module):
    """One module for DDP: the encoder and the criterion, so the classifier is averaged too."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = DVector(ModelConfig.preset("tiny"))
        self.criterion = AAMSoftmax(self.encoder.embed_dim, C, margin=0.2, scale=30.0, margin_warmup=2)

    def forward(self, mels: torch.Tensor, speakers: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.encoder(mels).view(N, M, -1), speakers)


def ddp_aam(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(100 + rank)  # a different initialisation on each rank: DDP must broadcast rank 0's
    model = DistributedDataParallel(EncoderWithLoss())
    initial = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(rank)  # different data on each rank
    for step in range(STEPS):
        model.module.criterion.begin_step(step)
        mels = torch.randn(N * M, T, model.module.encoder.n_mels, generator=gen)
        speakers = torch.randperm(C, generator=gen)[:N].repeat_interleave(M)
        optimizer.zero_grad()
        model(mels, speakers).backward()
        optimizer.step()
    return {"initial": initial, "final": {k: v.detach().clone() for k, v in model.module.state_dict().items()}}


def both_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Both ranks' batches (WORLD, N, M, 8) in float64 and speakers (WORLD, N*M), the same in every process."""
    gen = torch.Generator().manual_seed(7)
    embeds = torch.randn(WORLD, N, M, 8, generator=gen, dtype=torch.float64)
    speakers = torch.tensor(RANK_SPEAKERS).repeat_interleave(M, dim=1)
    return embeds, speakers


def gathered_angleproto(rank: int) -> dict:
    embeds, speakers = both_batches()
    crit = AngleProtoLoss(gather=True).double()
    x = embeds[rank].clone().requires_grad_(True)
    loss = crit(x, speakers[rank])
    loss.backward()
    return {"loss": loss.detach(), "grad": x.grad, "w_grad": crit.w.grad, "b_grad": crit.b.grad}


def worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        torch.save({"aam": ddp_aam(rank), "proto": gathered_angleproto(rank)}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other is still in a collective
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp")
    # the test process holds the rendezvous store (a port the OS picks) until both ranks are done, so no rank's
    # teardown can pull the store from under the other (a file store did: "terminate called", SIGABRT, under load)
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    mp.spawn(worker, args=(store.port, str(folder)), nprocs=WORLD, join=True)
    del store
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_keeps_encoder_and_classifier_equal_and_moving(ranks):
    finals = [r["aam"]["final"] for r in ranks]
    initial = ranks[0]["aam"]["initial"]
    assert "criterion.weight" in finals[0]
    for name, value in finals[0].items():
        assert torch.equal(value, finals[1][name]), f"{name} differs between the ranks"
        assert not torch.equal(value, initial[name]), f"{name} did not move"
    for name, value in ranks[1]["aam"]["initial"].items():
        assert torch.equal(value, initial[name]), f"DDP did not start {name} from rank 0's values"


def reference_rank_loss(embeds: torch.Tensor, speakers: torch.Tensor, rank: int, w: float, b: float,
                        mask: bool = True) -> torch.Tensor:
    """Rank ``rank``'s gathered angleproto loss, one query and one anchor at a time: its queries
    against every rank's anchors, other columns of the query's speaker left out (``mask``)."""
    W = embeds.size(0)
    anchors = [(r, k, embeds[r, k, 1:].mean(0)) for r in range(W) for k in range(N)]
    ids = speakers.view(W, N, M)[:, :, 0]
    total = embeds.new_zeros(())
    for j in range(N):
        query = embeds[rank, j, 0]
        terms, own = [], None
        for r, k, anchor in anchors:
            if (r, k) == (rank, j):
                own = len(terms)
            elif mask and ids[r, k] == ids[rank, j]:
                continue
            terms.append(w * torch.dot(query, anchor) / (query.norm() * anchor.norm()) + b)
        total = total - terms[own] + torch.log(sum(torch.exp(t) for t in terms))
    return total / N


def test_gathered_angleproto_equals_the_all_anchor_reference(ranks):
    embeds, speakers = both_batches()
    x = embeds.clone().requires_grad_(True)
    per_rank = [reference_rank_loss(x, speakers, r, 10.0, -5.0) for r in range(WORLD)]
    sum(per_rank).backward()  # each rank's gradient is that of the sum of every rank's loss (see nn.proto)
    for r in range(WORLD):
        got = ranks[r]["proto"]
        torch.testing.assert_close(got["loss"], per_rank[r].detach(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["grad"], x.grad[r], rtol=1e-9, atol=1e-9)
    # the speaker both ranks drew is masked: without the mask the losses would differ
    unmasked = [reference_rank_loss(embeds, speakers, r, 10.0, -5.0, mask=False) for r in range(WORLD)]
    for r in range(WORLD):
        assert not math.isclose(ranks[r]["proto"]["loss"].item(), unmasked[r].item(), rel_tol=1e-6)


def test_gathered_w_and_b_gradients_are_each_ranks_own(ranks):
    embeds, speakers = both_batches()
    for r in range(WORLD):
        w = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
        reference_rank_loss(embeds, speakers, r, w, b).backward()
        torch.testing.assert_close(ranks[r]["proto"]["w_grad"], w.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ranks[r]["proto"]["b_grad"], b.grad, rtol=1e-9, atol=1e-9)
