"""`eval` and `score` with --norm (S-norm, AS-norm) and --cohort, through the console entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dvector.cli.use import DEFAULT_TOP_N as CLI_TOP_N
from dvector.evaluation.score_norm import DEFAULT_TOP_N
from use_helpers import copy_run, flat, run_main


@pytest.fixture
def run(trained, tmp_path: Path) -> Path:  # noqa: ANN001
    return copy_run(trained.run, tmp_path / "run")


def test_the_cli_default_top_n_is_the_librarys() -> None:
    assert CLI_TOP_N == DEFAULT_TOP_N == 300


def test_eval_prints_raw_and_normalised_rows_and_score_uses_the_stored_threshold(  # noqa: ANN001
        trained, small_root: Path, run: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(capsys, "eval", run, small_root, "--threads", "1", "--norm", "asnorm",
                              "--cohort", trained.shards, "--cohort-top", "5")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("scores"))
    assert lines[header].split() == ["scores", "EER", "minDCF", "0.01", "minDCF", "0.05", "threshold"]
    assert lines[header + 1].split()[0] == "raw" and lines[header + 2].split()[0] == "asnorm"
    assert "cohort: 14 speakers (112 utterances)" in out and "top 5" in out
    stored = json.loads((run / "eval.json").read_text())
    assert stored["norm"]["method"] == "asnorm" and stored["norm"]["top_n"] == 5
    assert f"{100 * stored['eer']:.2f}%" in lines[header + 1]
    assert f"{100 * stored['norm']['eer']:.2f}%" in lines[header + 2]
    assert f"EER={100 * stored['eer']:.2f}%" in out  # the raw line as before

    a, b = sorted(small_root.glob("*/*"))[:2]
    code, out, err = run_main(capsys, "score", run, a, b, "--threads", "1", "--norm", "asnorm",
                              "--cohort", trained.shards, "--cohort-top", "5")
    assert code == 0, err
    assert out.startswith("asnorm score ") and f"threshold {stored['norm']['eer_threshold']:.4f}" in out

    code, out, err = run_main(capsys, "score", run, a, b, "--norm", "snorm", "--cohort", trained.shards)
    assert code == 1 and flat(err).startswith("error: no snorm threshold") and "Traceback" not in err
    code, out, err = run_main(capsys, "score", run, a, b, "--norm", "snorm", "--cohort", trained.shards,
                              "-t", "1.5", "--threads", "1")
    assert code == 0 and "threshold 1.5000 (--threshold)" in out


def test_a_cohort_smaller_than_top_n_is_used_whole_with_a_note(  # noqa: ANN001
        trained, small_root: Path, run: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(capsys, "eval", run, small_root, "--threads", "1", "--no-save", "--norm", "asnorm",
                              "--cohort", trained.shards)
    assert code == 0, err
    assert "fewer than --cohort-top 300: AS-norm uses all of them" in flat(err + out)
    assert "top 14" in out


@pytest.mark.parametrize("args, message", [
    (["--norm", "znorm", "--cohort", "x"], "error: --norm must be one of none, snorm, asnorm, got 'znorm'"),
    (["--norm", "snorm", "--cohort", "x", "--cohort-top", "1"], "error: --cohort-top must be >= 2"),
])
def test_bad_norm_options_are_one_error_line(trained, small_root: Path, run: Path, args: list[str],  # noqa: ANN001
                                             message: str, capsys: pytest.CaptureFixture) -> None:
    for command in (["eval", run, small_root], ["score", run, *sorted(small_root.glob("*/*"))[:2]]):
        code, out, err = run_main(capsys, *command, *args)
        assert code == 1 and flat(err).startswith(message) and len(err.strip().splitlines()) == 1, err
        assert not (run / "eval.json").exists()


def test_an_empty_cohort_is_an_error(small_root: Path, run: Path, tmp_path: Path,  # noqa: ANN001
                                     capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "shard-000000.tar"
    empty.write_bytes(b"not a tar" * 100)
    code, out, err = run_main(capsys, "eval", run, small_root, "--threads", "1", "--norm", "asnorm",
                              "--cohort", empty)
    assert code == 1 and "error: the cohort" in flat(err) and "holds no usable samples" in flat(err), err
    assert "Traceback" not in err and not (run / "eval.json").exists()


def test_the_default_cohort_is_the_runs_training_shards(trained, small_root: Path, run: Path,  # noqa: ANN001
                                                        capsys: pytest.CaptureFixture) -> None:
    import torch

    from dvector.inference.bundle import training_shards

    recorded = training_shards(run)
    assert recorded and all(os.path.isabs(u) for u in recorded)
    assert sorted(map(os.path.realpath, recorded)) == sorted(
        os.path.realpath(p) for p in Path(trained.shards).glob("*.tar"))
    code, out, err = run_main(capsys, "eval", run, small_root, "--threads", "1", "--norm", "snorm", "--no-save")
    assert code == 0, err
    assert "cohort: 14 speakers" in out
    given = run_main(capsys, "eval", run, small_root, "--threads", "1", "--norm", "snorm", "--no-save",
                     "--cohort", trained.shards)[1]
    assert [line for line in out.splitlines() if line.startswith("snorm")] == \
        [line for line in given.splitlines() if line.startswith("snorm")]
    for ckpt in (run / "checkpoints").glob("*.pt"):  # a checkpoint made before the record existed
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        state.pop("shards", None)
        torch.save(state, ckpt)
    code, out, err = run_main(capsys, "eval", run, small_root, "--threads", "1", "--norm", "snorm", "--no-save")
    assert code != 0 and err.count("error:") == 1 and "needs a cohort" in err
