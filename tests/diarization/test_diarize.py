"""Diarization: clustering with K given and estimated, resegmentation, and the whole recipe on
synthetic two-speaker audio (turns recovered)."""

from __future__ import annotations

import numpy as np
import pytest

from diarize_helpers import RATE, MeanSpectrum, conversation
from dvector.errors import DvectorError
from dvector.diarization.clustering import ClusterConfig, cluster, first_appearance
from dvector.diarization.diarize import DiarizeConfig, diarize_waveform, viterbi, window_ranges
from dvector.inference.embedder import Embedder


def separated(n_speakers: int, seed: int = 0, per_turn: int = 6, dim: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Time-ordered window embeddings of ``n_speakers`` well-separated speakers taking turns twice."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_speakers, dim))
    truth = np.repeat(np.concatenate([np.arange(n_speakers), np.arange(n_speakers)[::-1]]), per_turn)
    return centres[truth] + 0.3 * rng.standard_normal((truth.size, dim)), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(first_appearance(a), first_appearance(b))


@pytest.mark.parametrize("method", ["spectral", "ahc"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_clustering_known_and_estimated(method: str, k: int) -> None:
    vectors, truth = separated(k, seed=k)
    assert same_partition(cluster(vectors, ClusterConfig(method=method, speakers=k)), truth)
    estimated = cluster(vectors, ClusterConfig(method=method, min_speakers=2, max_speakers=6, threshold=0.5))
    assert same_partition(estimated, truth)


def test_clustering_bounds_and_edges() -> None:
    vectors, _ = separated(4, seed=1)
    assert len(set(cluster(vectors, ClusterConfig(max_speakers=3)).tolist())) <= 3
    assert len(set(cluster(vectors, ClusterConfig(method="ahc", threshold=-1.0, min_speakers=3)).tolist())) == 3
    assert cluster(vectors[:1], ClusterConfig(speakers=3)).tolist() == [0]
    with pytest.raises(DvectorError, match="--min-speakers"):
        ClusterConfig(min_speakers=5, max_speakers=2)
    with pytest.raises(DvectorError, match="method"):
        ClusterConfig(method="kmeans")


def test_window_ranges_cover_the_region() -> None:
    assert window_ranges(10, 20, 150, 75) == [(10, 20)]
    assert window_ranges(0, 400, 150, 75) == [(0, 150), (75, 225), (150, 300), (225, 375), (250, 400)]


def test_viterbi_switches_only_when_it_pays() -> None:
    scores = np.array([[1, 0]] * 5 + [[0, 0.6]] + [[1, 0]] * 3 + [[0, 1]] * 6, dtype=float)
    path = viterbi(scores, penalty=1.0)
    assert path.tolist() == [0] * 9 + [1] * 6  # the one-step blip does not pay for two switches


@pytest.mark.parametrize("speakers", [2, None])
def test_diarize_recovers_the_turns(speakers: int | None) -> None:
    pytest.importorskip("pyannote.metrics")
    from dvector.diarization.der import score_turns

    embedder = Embedder.from_model(MeanSpectrum(), seg_len=100)
    wav, ref = conversation(seed=1)
    result = diarize_waveform(embedder, wav, DiarizeConfig(cluster=ClusterConfig(speakers=speakers)), "conv")
    assert result.n_speakers == 2
    assert [t.speaker for t in result.turns] == ["SPEAKER_00", "SPEAKER_01"] * 3  # one hypothesis turn per turn
    errors = [abs(g - w) for got, want in zip(result.turns, ref)
              for g, w in ((got.start, want.start), (got.end, want.end))]
    assert np.median(errors) < 0.15 and max(errors) < 1.0  # to the 0.1 s step, not the 0.75 s hop (a quiet last
    assert score_turns(ref, result.turns).der < 0.05  # syllable may go to the next speaker)


def test_diarize_with_a_trained_model_writes_sane_turns(embedder: Embedder) -> None:
    """The session's (barely) trained run: two speakers found, turns inside the audio, no overlap."""
    wav, ref = conversation(seed=0)
    result = diarize_waveform(embedder, wav, DiarizeConfig(cluster=ClusterConfig(speakers=2)), "conv")
    assert result.n_speakers == 2 and result.n_windows > 10
    assert all(0 <= t.start < t.end <= wav.size / RATE for t in result.turns)
    assert all(a.end <= b.start for a, b in zip(result.turns, result.turns[1:]))
    speech_s = sum(t.duration for t in result.turns)
    assert 0.8 * sum(t.duration for t in ref) < speech_s < 1.2 * sum(t.duration for t in ref)


def test_silence_gives_no_turns() -> None:
    embedder = Embedder.from_model(MeanSpectrum(), seg_len=100)
    result = diarize_waveform(embedder, np.zeros(3 * RATE, np.float32), DiarizeConfig(), "quiet")
    assert result.turns == [] and result.n_speakers == 0


def test_one_speaker_is_found_only_when_allowed() -> None:
    one, _ = separated(1, seed=3, per_turn=12)
    three, truth = separated(3, seed=3)
    allow_one = ClusterConfig(min_speakers=1, threshold=0.5)
    assert set(cluster(one, allow_one).tolist()) == {0}
    assert same_partition(cluster(three, allow_one), truth)
    assert len(set(cluster(one, ClusterConfig()).tolist())) == 2  # the default: at least two


def test_short_pauses_are_filled_only_within_one_speaker() -> None:
    from dvector.diarization.diarize import _turns

    labels = np.array([0] * 10 + [-1] * 3 + [0] * 10 + [-1] * 2 + [1] * 2 + [-1] * 2 + [0] * 5 + [-1] * 20 + [0] * 5)
    turns = _turns(labels, 0.1, 0.5, "f")
    assert [(round(t.start, 1), round(t.end, 1), t.speaker[-1]) for t in turns] == [
        (0.0, 2.3, "0"), (2.5, 2.7, "1"), (2.9, 3.4, "0"), (5.4, 5.9, "0")]


def test_fewer_speakers_than_asked_for_come_with_a_note() -> None:
    """Before: --speakers 50 on 10 s quietly gave a few speakers."""
    embedder = Embedder.from_model(MeanSpectrum(), seg_len=100)
    wav, _ = conversation(seed=1)
    ten = wav[:10 * RATE]
    many = diarize_waveform(embedder, ten, DiarizeConfig(cluster=ClusterConfig(speakers=50)), "ten")
    assert many.n_speakers < 50 and many.n_windows < 50
    assert many.note == (f"--speakers 50, but only {many.n_windows} window(s) of speech to cluster: "
                         f"{many.n_speakers} speaker(s) found")
    assert diarize_waveform(embedder, ten, DiarizeConfig(cluster=ClusterConfig(speakers=2)), "ten").note == ""
    assert diarize_waveform(embedder, ten, DiarizeConfig(), "ten").note == ""  # estimated: nothing was asked
    quiet = diarize_waveform(embedder, np.zeros(3 * RATE, np.float32), DiarizeConfig(cluster=ClusterConfig(speakers=2)))
    assert quiet.note == "--speakers 2, but no speech was found"
