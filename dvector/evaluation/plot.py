"""Pictures: a t-SNE map of utterance embeddings coloured by speaker, and the DET curve.

Figures are drawn with matplotlib's object API onto the Agg canvas (no pyplot, no GUI, no change
to the caller's backend), rendered in memory and written atomically: a failure to write leaves no
file under the picture's name and is one ``DvectorError`` line.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dvector.files import output_folder, write_output
from dvector.corpus import scan_roots
from dvector.errors import DvectorError
from dvector.inference.embed_inputs import NothingEmbedded, embed_each

LEGEND_MAX = 20  # speakers: a legend up to this many
LABEL_MAX = 60  # text labels at cluster centres up to this many; beyond, colours only


def _figure(width: float, height: float):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def picture_format(path: str | os.PathLike[str]) -> str:
    """The image format a picture at ``path`` is drawn in: its extension (png without one); an
    extension matplotlib cannot write is an error."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    known = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in known:
        raise DvectorError(f"{path}: cannot draw a .{fmt} picture; name it .png (or {', '.join(sorted(known))})")
    return fmt


def check_picture_path(path: str | os.PathLike[str]) -> None:
    """A picture can be written at ``path`` (a known format, a folder that takes files), else one
    ``DvectorError`` line: checked before the work that draws it."""
    picture_format(path)
    output_folder(Path(path).parent)


def _save(fig, path: str | os.PathLike[str]) -> Path:  # noqa: ANN001
    out = Path(path)
    image = io.BytesIO()
    fig.savefig(image, format=picture_format(out), bbox_inches="tight")
    return write_output(out, image.getvalue())


def speaker_colors(n: int) -> np.ndarray:
    """``n`` distinct RGBA colours: tab10/tab20 for few speakers; for many, hues spaced by the golden
    ratio (neighbours in the list differ most) at alternating saturation and brightness."""
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb

    if n <= 10:
        return colormaps["tab10"](np.arange(n))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    i = np.arange(n)
    hsv = np.stack([(i * 0.6180339887) % 1.0, np.where(i % 2, 0.55, 0.9), 0.95 - 0.25 * ((i // 2) % 3) / 2], axis=1)
    return np.concatenate([hsv_to_rgb(hsv), np.ones((n, 1))], axis=1)


def tsne_2d(embeddings: np.ndarray, seed: int = 0, threads: int | None = 1) -> np.ndarray:
    """2-D t-SNE (scikit-learn) of (U, D) embeddings, perplexity adapted to small sets.

    ``threads`` limits OpenMP/BLAS threads (None: no limit). One thread is the default: for the few
    thousand points a map shows, it costs little, and on a busy CPU several OpenMP threads waiting
    for each other can make t-SNE ten times slower.
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    if x.ndim != 2 or n < 3:
        raise DvectorError(f"t-SNE needs at least 3 embeddings, got {n}")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto")
    with threadpool_limits(limits=threads):
        return tsne.fit_transform(x)


def plot_tsne(embeddings: np.ndarray, speakers: Sequence[str], path: str | os.PathLike[str],
              title: str | None = None, seed: int = 0, threads: int | None = 1) -> Path:
    """A PNG of the t-SNE map, one colour per speaker: a legend for up to 20 speakers, names at the
    cluster centres up to 60, colours alone beyond."""
    speakers = [str(s) for s in speakers]
    if len(speakers) != len(embeddings):
        raise DvectorError(f"{len(embeddings)} embeddings but {len(speakers)} speaker labels")
    points = tsne_2d(embeddings, seed, threads)
    names = sorted(set(speakers))
    index = {s: i for i, s in enumerate(names)}
    codes = np.array([index[s] for s in speakers])
    colours = speaker_colors(len(names))
    many = len(names) > LEGEND_MAX
    fig = _figure(9 if many else 8, 8 if many else 6)
    ax = fig.add_subplot(1, 1, 1)
    size = float(np.clip(3000 / max(len(points), 1), 4, 30))
    for i, name in enumerate(names):
        mine = points[codes == i]
        ax.scatter(mine[:, 0], mine[:, 1], s=size, color=colours[i], label=name, alpha=0.85, linewidths=0)
    if not many:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=1.5,
                  title="speaker")
    elif len(names) <= LABEL_MAX:
        for i, name in enumerate(names):
            cx, cy = np.median(points[codes == i], axis=0)
            ax.annotate(name.rsplit("/", 1)[-1], (cx, cy), fontsize=6, ha="center", va="center", alpha=0.9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {len(points)} utterance embeddings, {len(names)} speakers")
    return _save(fig, path)


# ---- DET -----------------------------------------------------------------------------------------

DET_TICKS = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99])


def _ppf(p: np.ndarray) -> np.ndarray:
    from scipy.stats import norm

    return norm.ppf(np.clip(p, 1e-6, 1 - 1e-6))


def plot_det(false_accept: np.ndarray, false_reject: np.ndarray, path: str | os.PathLike[str],
             eer: float | None = None, label: str | None = None, title: str | None = None,
             dcf_points: dict[str, tuple[float, float]] | None = None) -> Path:
    """A DET curve (miss vs false-alarm probability on normal-deviate axes) as a PNG.

    ``dcf_points`` maps a legend label to an operating point ``(false_accept, false_reject)``.
    """
    far, frr = np.asarray(false_accept, dtype=np.float64), np.asarray(false_reject, dtype=np.float64)
    if far.shape != frr.shape or far.size < 2:
        raise DvectorError("a DET curve needs matching false-accept and false-reject rates")
    lo = max(min(far[far > 0].min(initial=1.0), frr[frr > 0].min(initial=1.0)) / 2, 5e-4)
    ticks = DET_TICKS[(DET_TICKS >= lo * 0.999) & (DET_TICKS <= 0.99)]
    if ticks.size < 2:
        ticks = DET_TICKS[-6:]
    fig = _figure(6, 6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(_ppf(far), _ppf(frr), lw=1.6, label=label or "DET")
    if eer is not None:
        ax.plot(_ppf(np.array([eer])), _ppf(np.array([eer])), "o", color="black", ms=5,
                label=f"EER {100 * eer:.2f}%")
    for name, (fa, fr) in (dcf_points or {}).items():
        ax.plot(_ppf(np.array([fa])), _ppf(np.array([fr])), "s", ms=4, label=name)
    limits = _ppf(np.array([ticks[0], ticks[-1]]))
    ax.plot(limits, limits, ":", color="grey", lw=0.8)
    ax.set_xlim(*limits)
    ax.set_ylim(*limits)
    labels = [f"{100 * t:g}" for t in ticks]
    ax.set_xticks(_ppf(ticks))
    ax.set_xticklabels(labels)
    ax.set_yticks(_ppf(ticks))
    ax.set_yticklabels(labels)
    ax.set_xlabel("false alarm (false accept) rate, %")
    ax.set_ylabel("miss (false reject) rate, %")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or "DET curve")
    return _save(fig, path)


# ---- embeddings of a root, mapped ----------------------------------------------------------------

def sample_speaker_files(root: str | os.PathLike[str], extensions: Sequence[str], max_speakers: int,
                         per_speaker: int, seed: int = 0) -> dict[str, list[Path]]:
    """Up to ``max_speakers`` speakers of ``root`` (a seeded sample when there are more) and up to
    ``per_speaker`` files of each (likewise)."""
    if max_speakers < 1 or per_speaker < 1:
        raise DvectorError("--max-speakers and --per-speaker must be >= 1")
    scan = scan_roots([str(root)], extensions)
    if not scan.speakers:
        raise DvectorError(f"{root} holds no speaker folders with audio")
    rng = np.random.default_rng([seed, 0x75E])
    speakers = scan.speakers
    if len(speakers) > max_speakers:
        speakers = [speakers[i] for i in sorted(rng.choice(len(speakers), size=max_speakers, replace=False))]
    files: dict[str, list[Path]] = {s: [] for s in speakers}
    for u in scan.utterances:
        if u.speaker in files:
            files[u.speaker].append(u.path)
    for s, paths in files.items():
        if len(paths) > per_speaker:
            files[s] = [paths[i] for i in sorted(rng.choice(len(paths), size=per_speaker, replace=False))]
    return files


def visualize(embedder, root: str | os.PathLike[str], out: str | os.PathLike[str],  # noqa: ANN001
              extensions: Sequence[str], max_speakers: int = 100, per_speaker: int = 20, seed: int = 0,
              on_start=None, on_file=None, threads: int | None = 1) -> tuple[Path, int, int, list[tuple[str, str]]]:  # noqa: ANN001
    """Embed a sample of ``root``'s speakers and write their t-SNE map; returns (png, points,
    speakers, skipped files). ``out`` (its format and folder) is checked before the work; too few
    files embedded is :class:`NothingEmbedded`, with the skipped files."""
    check_picture_path(out)
    files = sample_speaker_files(root, extensions, max_speakers, per_speaker, seed)
    total = sum(len(v) for v in files.values())
    if on_start:
        on_start(total)
    speaker_of = {str(path): speaker for speaker, paths in files.items() for path in paths}
    embedded, skipped = embed_each(((str(p), p) for paths in files.values() for p in paths), embedder.embed,
                                   on_item=(lambda _key: on_file()) if on_file else None)
    vectors, labels = list(embedded.values()), [speaker_of[key] for key in embedded]
    if len(vectors) < 3:
        raise NothingEmbedded(f"only {len(vectors)} files of {root} could be embedded: too few to map", skipped)
    png = plot_tsne(np.stack(vectors), labels, out, seed=seed, threads=threads or 1)  # t-SNE: 0 means one
    return png, len(vectors), len(set(labels)), skipped
