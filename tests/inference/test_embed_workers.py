"""embed and eval on workers (``-j``) and on a Dask cluster (``--dask``): the same vectors, skipped
files, scores and first error as one process."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dvector.errors import DvectorError
from dvector.inference.embed_inputs import Workers, embed_paths, load_embeddings
from dvector.inference.embedder import Embedder, untrained_twin
from dvector.evaluation.evaluate import evaluate


@pytest.fixture(scope="module")
def inputs(trained: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 speakers x 4 files of the trained corpus, and one unusable file among them."""
    root = tmp_path_factory.mktemp("workers") / "root"
    for speaker in sorted(p for p in trained.root.iterdir() if p.is_dir())[:4]:
        (root / speaker.name).mkdir(parents=True)
        for f in sorted(speaker.iterdir())[:4]:
            shutil.copy(f, root / speaker.name / f.name)
    (root / speaker.name / "broken.wav").write_text("not audio")
    return root


def same_vectors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_embed_on_local_workers_equals_one_process(embedder: Embedder, inputs: Path) -> None:
    one = embed_paths(embedder, [str(inputs)])
    many = embed_paths(embedder, [str(inputs)], workers=Workers(2))
    assert len(one.vectors) == 16 and same_vectors(one.vectors, many.vectors)
    assert many.skipped == one.skipped and [k for k, _ in one.skipped] == [str(inputs / "spk003" / "broken.wav")]
    windows_one = embed_paths(embedder, [str(inputs / "spk000")], per_window=True)
    windows_many = embed_paths(embedder, [str(inputs / "spk000")], per_window=True, workers=Workers(2))
    assert same_vectors(windows_one.vectors, windows_many.vectors)
    assert same_vectors(windows_one.times, windows_many.times)


def test_a_named_file_that_fails_is_the_same_error(embedder: Embedder, inputs: Path) -> None:
    files = [str(p) for p in sorted((inputs / "spk003").iterdir())]
    with pytest.raises(DvectorError) as one:
        embed_paths(embedder, files)
    with pytest.raises(DvectorError) as many:
        embed_paths(embedder, files, workers=Workers(2))
    assert str(many.value) == str(one.value) and "broken.wav" in str(one.value)


def test_a_model_only_in_memory_is_embedded_here(embedder: Embedder, inputs: Path) -> None:
    twin = untrained_twin(embedder)
    one = embed_paths(twin, [str(inputs / "spk000")])
    many = embed_paths(twin, [str(inputs / "spk000")], workers=Workers(2))
    assert same_vectors(one.vectors, many.vectors)


def test_embed_and_eval_on_dask_equal_one_process(embedder: Embedder, inputs: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster:
        on_dask = Workers(dask=cluster.scheduler_address)
        many = embed_paths(embedder, [str(inputs)], workers=on_dask)
        evaluated = evaluate(embedder, inputs, seed=3, workers=on_dask)
    one = embed_paths(embedder, [str(inputs)])
    assert same_vectors(one.vectors, many.vectors) and many.skipped == one.skipped
    alone = evaluate(embedder, inputs, seed=3)
    assert np.array_equal(evaluated.scores, alone.scores) and evaluated.result.to_dict() == alone.result.to_dict()
    assert evaluated.result.skipped == alone.result.skipped != []


def test_cli_embed_and_eval_with_workers(trained: SimpleNamespace, inputs: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from use_helpers import copy_run, run_main

    run = copy_run(trained.run, tmp_path / "run")
    outs = {}
    for name, extra in (("one", []), ("two", ["-j", "2"])):
        code, out, err = run_main(capsys, "embed", run, inputs, "-o", tmp_path / f"{name}.npz", "--threads", "1",
                                  *extra)
        assert code == 0, err
        assert "broken.wav" in " ".join((out + err).split())  # the bad file: one line naming it
        outs[name] = load_embeddings(tmp_path / f"{name}.npz")[0]
    assert same_vectors(outs["one"], outs["two"])
    lines = {}
    for name, extra in (("one", []), ("two", ["-j", "2"])):
        code, out, err = run_main(capsys, "eval", run, inputs, "--no-save", "--threads", "1", *extra)
        assert code == 0, err
        lines[name] = [line for line in out.splitlines() if line.startswith(("EER=", "minDCF", "threshold", "trials"))]
    assert lines["one"] == lines["two"] and len(lines["one"]) == 4
