"""Pictures: the t-SNE map (few and many speakers, tiny sets) and the DET curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.evaluation.plot import plot_det, plot_tsne, sample_speaker_files, speaker_colors, tsne_2d

PNG = b"\x89PNG\r\n\x1a\n"


def clusters(n_speakers: int, per_speaker: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_speakers, dim))
    x = np.repeat(centres, per_speaker, axis=0) + 0.3 * rng.standard_normal((n_speakers * per_speaker, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, [f"root/spk{s:03d}" for s in range(n_speakers) for _ in range(per_speaker)]


def test_tsne_png_for_20_speakers(tmp_path: Path) -> None:
    x, labels = clusters(20, 6)
    out = plot_tsne(x, labels, tmp_path / "sub" / "tsne.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000


def test_tsne_hundreds_of_points_and_speakers(tmp_path: Path) -> None:
    x, labels = clusters(150, 2)  # 300 points, colours only
    assert plot_tsne(x, labels, tmp_path / "many.png").read_bytes()[:8] == PNG
    x, labels = clusters(40, 3)  # names at the cluster centres
    assert plot_tsne(x, labels, tmp_path / "labelled.png").read_bytes()[:8] == PNG


def test_tsne_small_sets(tmp_path: Path) -> None:
    x, labels = clusters(2, 2)
    assert tsne_2d(x).shape == (4, 2)  # perplexity adapted to 4 points
    assert plot_tsne(x[:3], labels[:3], tmp_path / "three.png").exists()
    with pytest.raises(DvectorError, match="at least 3"):
        tsne_2d(x[:2])
    with pytest.raises(DvectorError, match="speaker labels"):
        plot_tsne(x, labels[:3], tmp_path / "bad.png")


def test_tsne_keeps_clusters_apart() -> None:
    x, labels = clusters(5, 10)
    points = tsne_2d(x)
    codes = np.array([int(s[-3:]) for s in labels])
    centres = np.stack([points[codes == k].mean(0) for k in range(5)])
    spread = np.mean([np.linalg.norm(points[codes == k] - centres[k], axis=1).mean() for k in range(5)])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(5, 1)]
    assert gaps.min() > 2 * spread


def test_speaker_colors_distinct() -> None:
    for n in (3, 15, 300):
        colours = speaker_colors(n)
        assert colours.shape == (n, 4)
        assert len({tuple(np.round(c, 6)) for c in colours}) == n


def test_det_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    far = np.r_[0.0, np.sort(rng.random(200)), 1.0]
    frr = 1.0 - far ** 0.2
    out = plot_det(far, frr, tmp_path / "det.png", eer=0.2, dcf_points={"minDCF": (0.01, 0.6)})
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(DvectorError):
        plot_det(np.zeros(3), np.zeros(4), tmp_path / "bad.png")


def test_sample_speaker_files(tmp_path: Path) -> None:
    for s in range(6):
        for u in range(5):
            (tmp_path / "root" / f"spk{s}").mkdir(parents=True, exist_ok=True)
            (tmp_path / "root" / f"spk{s}" / f"u{u}.wav").write_bytes(b"")
    picked = sample_speaker_files(tmp_path / "root", ["wav"], max_speakers=4, per_speaker=3, seed=0)
    assert len(picked) == 4 and all(len(v) == 3 for v in picked.values())
    assert picked == sample_speaker_files(tmp_path / "root", ["wav"], max_speakers=4, per_speaker=3, seed=0)
    with pytest.raises(DvectorError):
        sample_speaker_files(tmp_path / "root", ["wav"], max_speakers=0, per_speaker=3)
