"""Embeddings as a Kaldi archive: ``DIR/embeddings.ark`` (binary float32 vectors) and its index
``DIR/embeddings.scp`` (``KEY ARK_PATH:OFFSET``), written through ``kaldiio`` (the optional extra
``dvector[kaldi]``), as Kaldi's ``ivector-*`` tools and WeSpeaker's back-ends read them.

- Keys are ``embed``'s: a listed utterance's id, a file's path as reached from the input given.
  Per-window vectors are keyed ``KEY-START-END``, START and END the window's times in milliseconds,
  zero-padded to 8 digits (WeSpeaker's sub-segment ids; see :func:`window_key`).
- A Kaldi key cannot hold whitespace and is UTF-8: a key that is not is skipped with its reason
  (``--format npz`` keeps any file name).
- Both files are written under temporary names in DIR, flushed, then renamed: the archive first,
  the index last (an older index is removed before the archive is replaced). A reader that finds
  ``embeddings.scp`` finds the complete archive it indexes; the index names the archive by its
  final, absolute path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from dvector.errors import DvectorError
from dvector.files import output_file, output_folder
from dvector.inference.embed_inputs import EmbedResult, NothingEmbedded

ARK_NAME = "embeddings.ark"
SCP_NAME = "embeddings.scp"
MISSING = "--format kaldi needs kaldiio: pip install 'dvector[kaldi]'"


def kaldiio_module() -> Any:
    """``kaldiio``, or the one-line error that says how to install it."""
    try:
        import kaldiio
    except ImportError:
        raise DvectorError(MISSING) from None
    return kaldiio


def check_kaldi_output(folder: str | os.PathLike[str]) -> Path:
    """Before the work: kaldiio is importable and ``folder`` is a folder that takes files."""
    kaldiio_module()
    text = os.fspath(folder)
    if text.endswith((".npz", ".ark", ".scp")):
        raise DvectorError(f"-o {text}: with --format kaldi, -o names a folder (it receives {ARK_NAME} and "
                           f"{SCP_NAME})")
    return output_folder(folder)


def window_key(key: str, start_s: float, end_s: float) -> str:
    """``KEY-START-END`` of one window: its start and end in milliseconds, zero-padded to 8 digits."""
    return f"{key}-{int(round(start_s * 1000)):08d}-{int(round(end_s * 1000)):08d}"


def bad_key(key: str) -> str | None:
    """Why ``key`` cannot be a Kaldi key, or None."""
    if not key:
        return "an empty name cannot be a Kaldi key"
    if any(c.isspace() for c in key):
        return "a Kaldi key cannot hold whitespace (use --format npz)"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8, which a Kaldi key must be (use --format npz)"
    return None


def kaldi_arrays(result: EmbedResult) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """``key -> float32 vector`` in the result's order (per-window results: one entry per window), and
    ``(key, reason)`` of each key that Kaldi cannot hold."""
    arrays: dict[str, np.ndarray] = {}
    refused: list[tuple[str, str]] = []
    for key, vectors in result.vectors.items():
        reason = bad_key(key)
        if reason is not None:
            refused.append((key, reason))
            continue
        if key in result.times:
            for vector, (start, end) in zip(vectors, result.times[key]):
                arrays[window_key(key, float(start), float(end))] = np.ascontiguousarray(vector, dtype=np.float32)
        else:
            arrays[key] = np.ascontiguousarray(vectors, dtype=np.float32)
    return arrays, refused


def save_kaldi(folder: str | os.PathLike[str], result: EmbedResult) -> tuple[Path, Path, int]:
    """Write ``folder/embeddings.ark`` and ``folder/embeddings.scp`` (see the module doc); keys Kaldi
    cannot hold are added to ``result.skipped``. Returns (ark, scp, entries written)."""
    kaldiio = kaldiio_module()
    arrays, refused = kaldi_arrays(result)
    result.skipped.extend(refused)
    if not arrays:
        what = "no usable audio in the inputs" if not refused else "no key that Kaldi can hold"
        raise NothingEmbedded(f"nothing was embedded: {what}", result.skipped)
    out = Path(folder)
    ark, scp = out / ARK_NAME, out / SCP_NAME
    final = os.path.abspath(ark)
    with output_file(scp) as tmp_scp, output_file(ark) as tmp_ark:
        index = io.StringIO()
        with open(tmp_ark, "wb") as f:
            kaldiio.save_ark(f, arrays, scp=index)
        lines = []
        for line in index.getvalue().splitlines():
            key, _, where = line.partition(" ")
            lines.append(f"{key} {final}:{where.rsplit(':', 1)[1]}\n")
        with open(tmp_scp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        scp.unlink(missing_ok=True)  # an older index must never point into the new archive
    return ark, scp, len(arrays)
