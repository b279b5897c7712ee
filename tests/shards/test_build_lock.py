"""One shard build writes into an output folder at a time; the parts of a job array (--part i/n) each
hold a lock of their own, so they still build side by side."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dvector.config import BuildConfig
from dvector.errors import DvectorError
from dvector.files import LOCK_NAME, one_writer
from dvector.shards.build import build_shards
from build_helpers import Corpus

CFG = BuildConfig(min_shards=2, block_size=3)


def test_a_second_build_into_a_busy_folder_is_refused_before_reading(synth_roots: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with one_writer(out, "shard build"):  # as a running build holds it
        with pytest.raises(DvectorError) as error:
            build_shards(["/nonexistent/root"], out, CFG, workers=1)
    message = str(error.value)
    assert "in use by another shard build" in message and f"pid {os.getpid()}" in message
    assert "/nonexistent" not in message  # refused before the roots were looked at
    report = build_shards(synth_roots.roots, out, CFG, workers=1)  # free again
    assert report.index_written and not (out / LOCK_NAME).exists()


def test_parts_of_a_job_array_build_side_by_side(synth_roots: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    with one_writer(out, "build of part 1/2", name=".dvector-part1of2.lock"):  # part 1 is running
        build_shards(synth_roots.roots, out, CFG, workers=1, part=(2, 2))
        with pytest.raises(DvectorError, match="in use by another build of part 1/2"):
            build_shards(synth_roots.roots, out, CFG, workers=1, part=(1, 2))
    assert build_shards(synth_roots.roots, out, CFG, workers=1, part=(1, 2)).index_written
