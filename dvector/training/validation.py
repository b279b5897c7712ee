"""Validation on speakers never seen in training: a held-out set, its embeddings, its EER."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from dvector.errors import DvectorError
from dvector.metrics import all_pairs_scores, eer
from dvector.stream.loader import index_checks
from dvector.stream.sampling import crop
from dvector.stream.validation_samples import ReadReport, good_samples

MAX_VALID_SPEAKERS = 64


def heldout_speakers(index: dict[str, Any], fraction: float, seed: int) -> list[int]:
    """A deterministic ~``fraction`` of the speakers (at least 2, at most 64) that have 2+ utterances."""
    candidates = sorted(s["index"] for s in index["speakers"] if s["utterances"] >= 2)
    if len(candidates) < 4:
        raise DvectorError(f"only {len(candidates)} speakers have 2+ utterances: too few to hold any out for "
                           "validation; give a separate set with --valid")
    count = int(min(MAX_VALID_SPEAKERS, max(2, round(fraction * len(index["speakers"])))))
    count = min(count, len(candidates) // 2)
    rng = np.random.default_rng([seed, 0xE7A1])
    return sorted(int(s) for s in rng.choice(candidates, size=count, replace=False))


@dataclass
class ValidationSet:
    mels: torch.Tensor  # (U, L, n_mels) float32
    speakers: np.ndarray  # (U,)

    @property
    def n_speakers(self) -> int:
        """How many speakers the set holds."""
        return len(np.unique(self.speakers))


def _fixed_length(mel: np.ndarray, frames: int) -> np.ndarray:
    """The middle ``frames`` of an utterance (T, n_mels), or the utterance tiled from its start to
    ``frames`` if shorter, as a new (frames, n_mels) float32 array."""
    T = mel.shape[0]
    start = (T - frames) // 2 if T >= frames else 0
    return crop(mel, start, frames, np.empty((frames, mel.shape[1]), np.float32))


def collect_validation(urls: Sequence[str], index: dict[str, Any] | None, speakers: Sequence[int] | None,
                       per_speaker: int, frames: int, seed: int = 0) -> ValidationSet:
    """Up to ``per_speaker`` utterances of each chosen speaker (all speakers, at most 64, if None),
    each cut to ``frames`` frames; reads only the shards that hold them when the index says which.

    Damage is skipped as in training, with a warning naming it (bad samples, among them mels of
    another width than the index's or with non-finite values; broken, missing or unreachable
    shards). Only too little left (fewer than 2 speakers with 2+ utterances) is an error.
    """
    wanted: set[int] | None = set(speakers) if speakers is not None else None
    names = {u.rsplit("/", 1)[-1]: u for u in urls}
    if index is not None and wanted is not None:
        urls = [names[s["name"]] for s in index["shards"] if wanted & set(s["speakers"]) and s["name"] in names]
    n_mels, top = index_checks(index)
    report = ReadReport()
    taken: dict[int, list[np.ndarray]] = {}
    for sample in good_samples(urls, report, n_mels=n_mels, max_speaker_index=top):
        spk, mel = int(sample["speaker_index"]), sample["mel"]
        if wanted is not None and spk not in wanted:
            continue
        if wanted is None and spk not in taken and len(taken) >= MAX_VALID_SPEAKERS:
            continue
        if len(taken.get(spk, ())) >= per_speaker:
            continue
        taken.setdefault(spk, []).append(_fixed_length(mel, frames))  # one mel width: the stream's checks
        if wanted is not None and len(taken) == len(wanted) and all(len(v) >= per_speaker for v in taken.values()):
            break
    taken = {k: v for k, v in taken.items() if len(v) >= 2}
    if len(taken) < 2:
        skipped = report.describe()
        raise DvectorError(f"validation needs at least 2 speakers with 2+ utterances each; its {len(urls)} "
                           f"shard(s) gave {len(taken)}" + (f" ({skipped}: see the warnings)" if skipped else ""))
    mels = [m for k in sorted(taken) for m in taken[k]]
    labels = np.array([k for k in sorted(taken) for _ in taken[k]])
    return ValidationSet(torch.from_numpy(np.stack(mels)), labels)


@torch.no_grad()
def embed_batches(model: torch.nn.Module, mels: torch.Tensor, device: torch.device, batch: int = 256) -> np.ndarray:
    """Embeddings (U, D) of ``mels`` (U, L, n_mels), ``batch`` at a time in eval mode, as float32 numpy."""
    was_training = model.training
    model.eval()
    out = [model(mels[i:i + batch].to(device)).float().cpu() for i in range(0, len(mels), batch)]
    model.train(was_training)
    return torch.cat(out).numpy()


def validation_eer(model: torch.nn.Module, data: ValidationSet, device: torch.device) -> float:
    """EER (a fraction) over every pair of validation utterances, by cosine score."""
    embeddings = embed_batches(model, data.mels, device)
    scores, labels = all_pairs_scores(embeddings, data.speakers)
    return eer(scores, labels)[0]
