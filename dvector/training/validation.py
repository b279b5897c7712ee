"""Validation on speakers never seen in training: a held-out set, its embeddings, its EER and minDCF.

Trials pair utterances within one root (corpus) only: speaker ids are namespaced ``ROOT/SPEAKER``
(one root with ``--merge-speakers``), and a pair of speakers from two corpora is told apart by the
recording channel alone, which says nothing about the voices. The best checkpoint is the one of
the lowest EER; ties (a saturated 0.00%, say) go to the lower minDCF, then to the later step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from dvector.errors import DvectorError
from dvector.metrics import all_pairs_scores, eer, min_dcf
from dvector.stream import index_checks
from dvector.stream.sampling import crop
from dvector.stream.validation_samples import ReadReport, good_samples

MAX_VALID_SPEAKERS = 64
VALID_P_TARGET = 0.01  # the validation minDCF's prior
TIE = 1e-9  # measures closer than this are equal


def source_of(speaker_id: str) -> str:
    """The speaker a speed-perturbed copy was made from (``vctk/p225`` of ``vctk/p225@sp0.9``); else itself."""
    head, sep, tail = speaker_id.rpartition("@sp")
    try:
        return head if sep and float(tail) > 0 else speaker_id
    except ValueError:
        return speaker_id


def root_of(speaker_id: str) -> str:
    """The root (corpus) namespace of a global speaker id: ``vctk`` of ``vctk/p225``, "" without one."""
    return speaker_id.rsplit("/", 1)[0] if "/" in speaker_id else ""


def heldout_speakers(index: dict[str, Any], fraction: float, seed: int) -> list[int]:
    """A deterministic ~``fraction`` of the speakers (at least 2, at most 64) that have 2+ utterances.

    Speed-perturbed copies (``ROOT/SPK@sp0.9``) are never chosen, nor counted: they go with their
    source speaker (:func:`perturbed_copies`), so no voice is both trained on and validated on."""
    sources = [s for s in index["speakers"] if source_of(str(s.get("id", ""))) == str(s.get("id", ""))]
    candidates = sorted(s["index"] for s in sources if s["utterances"] >= 2)
    if len(candidates) < 4:
        raise DvectorError(f"only {len(candidates)} speakers have 2+ utterances: too few to hold any out for "
                           "validation; give a separate set with --valid")
    count = int(min(MAX_VALID_SPEAKERS, max(2, round(fraction * len(sources)))))
    count = min(count, len(candidates) // 2)
    rng = np.random.default_rng([seed, 0xE7A1])
    return sorted(int(s) for s in rng.choice(candidates, size=count, replace=False))


def perturbed_copies(index: dict[str, Any], speakers: Sequence[int]) -> list[int]:
    """The speed-perturbed copies of ``speakers`` (speaker indices): kept out of training with them."""
    ids = {int(s["index"]): str(s.get("id", "")) for s in index["speakers"]}
    chosen = {ids[k] for k in speakers if k in ids}
    return sorted(k for k, i in ids.items() if source_of(i) != i and source_of(i) in chosen)


@dataclass
class ValidationSet:
    mels: torch.Tensor  # (U, L, n_mels) float32
    speakers: np.ndarray  # (U,)
    roots: np.ndarray | None = None  # (U,) the root (corpus) of each utterance's speaker; None: one root
    skipped: dict[str, int] = field(default_factory=dict)  # damage met while reading it: bad_samples, bad_shards

    @property
    def n_speakers(self) -> int:
        """How many speakers the set holds."""
        return len(np.unique(self.speakers))

    def speakers_per_root(self) -> dict[str, int]:
        """How many validation speakers each root gives."""
        roots = self.roots if self.roots is not None else np.full(len(self.speakers), "")
        return {str(r): len(np.unique(self.speakers[roots == r])) for r in sorted(set(roots.tolist()))}

    @property
    def pair_groups(self) -> np.ndarray | None:
        """The labels that trials pair within (None: every pair): the roots, unless no root gives 2+
        speakers (then the only non-target pairs there are cross roots, and are kept)."""
        counts = self.speakers_per_root()
        if len(counts) < 2 or all(n < 2 for n in counts.values()):
            return None
        return self.roots

    def root_notes(self) -> list[str]:
        """What to say once about roots of one validation speaker (no non-target pairs of their own)."""
        counts = self.speakers_per_root()
        single = [r for r, n in counts.items() if n == 1]
        if len(counts) < 2 or not single:
            return []
        if len(single) == len(counts):
            return [f"warning: validation: each of its {len(counts)} roots gives a single speaker, so no "
                    "non-target pair lies within a root; its EER is scored on pairs across roots, which the "
                    "recording channel alone tells apart: give a --valid set with 2+ speakers per root"]
        names = ", ".join(single[:8]) + (f" (+{len(single) - 8} more)" if len(single) > 8 else "")
        return [f"note: validation pairs speakers within one root only; {len(single)} root(s) give a single "
                f"held-out speaker, so no non-target pairs of their own (their target pairs still count): {names}"]


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
    checks = index_checks(index)
    n_mels, top = checks.n_mels, checks.max_speaker_index
    report = ReadReport()
    taken: dict[int, list[np.ndarray]] = {}
    ids = {int(s["index"]): str(s.get("id", "")) for s in index["speakers"]} if index is not None else {}
    for sample in good_samples(urls, report, n_mels=n_mels, max_speaker_index=top):
        spk, mel = int(sample["speaker_index"]), sample["mel"]
        if spk not in ids and isinstance(sample.get("speaker"), str):
            ids[spk] = sample["speaker"]  # no index: the sample's own global id
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
    roots = np.array([root_of(ids.get(k, "")) for k in sorted(taken) for _ in taken[k]])
    return ValidationSet(torch.from_numpy(np.stack(mels)), labels, roots, report.to_dict())


@torch.no_grad()
def embed_batches(model: torch.nn.Module, mels: torch.Tensor, device: torch.device, batch: int = 256) -> np.ndarray:
    """Embeddings (U, D) of ``mels`` (U, L, n_mels), ``batch`` at a time in eval mode, as float32 numpy."""
    was_training = model.training
    model.eval()
    out = [model(mels[i:i + batch].to(device)).float().cpu() for i in range(0, len(mels), batch)]
    model.train(was_training)
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class ValidationScores:
    """The validation measures of one step."""

    eer: float  # a fraction
    min_dcf: float  # at p_target VALID_P_TARGET

    def to_dict(self) -> dict[str, float]:
        return {"eer": self.eer, "min_dcf": self.min_dcf}


def validation_scores(model: torch.nn.Module, data: ValidationSet, device: torch.device) -> ValidationScores:
    """EER and minDCF over every pair of validation utterances within one root, by cosine score."""
    embeddings = embed_batches(model, data.mels, device)
    scores, labels = all_pairs_scores(embeddings, data.speakers, data.pair_groups)
    return ValidationScores(eer(scores, labels)[0], min_dcf(scores, labels, p_target=VALID_P_TARGET)[0])



def improves(now: ValidationScores, best_eer: float | None, best_min_dcf: float | None) -> bool:
    """Whether ``now`` (a later step's scores) beats the best so far: a lower EER, or an equal one
    with a minDCF no higher, so the later of equal steps wins and a saturated score (0.00% again)
    never freezes ``best.pt``. A best without a minDCF (an older checkpoint's) yields to an equal EER."""
    if best_eer is None or now.eer < best_eer - TIE:
        return True
    if now.eer > best_eer + TIE:
        return False
    return best_min_dcf is None or now.min_dcf <= best_min_dcf + TIE


def validation_note(data: ValidationSet | None, best_eer: float | None, best_min_dcf: float | None) -> str:
    """Why validation could not choose a checkpoint well, in a sentence, or "" when it could."""
    if data is None:
        return ""
    counts = data.speakers_per_root()
    paired = [r for r, n in counts.items() if n >= 2]
    if len(counts) >= 2 and not paired:
        return ("too easy to choose a checkpoint: no root (corpus) gives 2+ validation speakers, so every "
                "non-target pair crosses corpora and the channel alone tells it apart; give a --valid set with "
                "2+ speakers per root")
    if best_eer is not None and best_eer <= TIE and not best_min_dcf:
        return ("too easy to choose a checkpoint: the best EER and minDCF are both 0 (saturated), so best.pt is "
                "only the latest of the tied steps; validate on more or harder speakers (--valid, --valid-fraction)")
    if len(counts) >= 2 and len(paired) < 2:
        return (f"narrow: of its {len(counts)} roots only {paired[0]} gives 2+ validation speakers, so the "
                "non-target pairs come from that corpus alone; give a --valid set with 2+ speakers per root")
    return ""
