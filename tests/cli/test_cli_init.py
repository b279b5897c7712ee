"""`dvector train --init RUN [--freeze-steps K]` and `dvector build-shards ... --features RUN` on the command
line: the options explained, a fine-tuning run without --model, and each refusal one `error:` line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dvector.cli import app, main
from dvector.config import FeatureConfig, VadConfig
from dvector.demo.synth import write_corpus
from dvector.shards.index import read_index
from dvector.training.checkpoint import load_checkpoint, save_checkpoint
from train_helpers import ckpt_dir, narrow_shards

runner = CliRunner()
SMALL = ["-n", "4", "-m", "4", "-l", "40", "-w", "0", "--threads", "1", "--valid-every", "1000"]


def invoke(*args: str | Path):  # noqa: ANN201
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def one_error_line(capsys: pytest.CaptureFixture, *args: str | Path) -> str:
    """Run the console entry point, expect exit 1 with one ``error:`` line; return it, whitespace joined."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return " ".join(err.split())


@pytest.fixture(scope="module")
def init_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 2 steps, trained through the command line."""
    run = tmp_path_factory.mktemp("cli_init") / "run"
    result = invoke("train", shards, run, "-i", "2", "-s", "2", "--model", "tiny", *SMALL)
    assert result.exit_code == 0, result.output
    return run


def test_help_explains_init_freeze_steps_and_features() -> None:
    text = " ".join(invoke("train", "--help").output.split())
    for words in ("--init", "RUN_OR_CHECKPOINT", "another run's encoder", "--freeze-steps", "first K steps"):
        assert words in text, words
    text = " ".join(invoke("build-shards", "--help").output.split())
    assert "--features" in text and "feature and VAD settings" in text


def test_fine_tuning_on_the_command_line(shards: Path, init_run: Path, tmp_path: Path) -> None:
    """No --model: the init run's network; --loss aamsoftmax --freeze-steps 1: a new classifier warms up."""
    run = tmp_path / "tuned"
    result = invoke("train", shards, run, "-i", "2", "-s", "1", "--init", init_run, "--loss", "aamsoftmax",
                    "--freeze-steps", "1", *SMALL)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "starting from the encoder of" in said and "first 1 steps" in said and "model tiny" in said
    first, init = load_checkpoint(ckpt_dir(run) / "step-000000001.pt"), load_checkpoint(init_run)
    assert all(torch.equal(first["model"][k], v) for k, v in init["model"].items())  # frozen for step 1
    state = load_checkpoint(run)
    assert state["step"] == 2 and state["model_config"] == init["model_config"]
    assert state["init"]["step"] == 2 and state["train_config"]["freeze_steps"] == 1


def test_init_refusals_are_one_line(shards: Path, init_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    err = one_error_line(capsys, "train", shards, tmp_path / "a", "--init", init_run, "--model", "ecapa", *SMALL)
    assert "--model ecapa differs from the 'tiny' network of --init" in err
    err = one_error_line(capsys, "train", narrow_shards(tmp_path_factory), tmp_path / "b", "--init", init_run, *SMALL)
    assert "24 mel bands" in err and f"dvector build-shards ROOT... -o OUT --features {init_run}" in err
    err = one_error_line(capsys, "train", shards, tmp_path / "c", "--freeze-steps", "3", "--model", "tiny", *SMALL)
    assert "--freeze-steps 3 needs --init" in err
    assert not any((tmp_path / d).exists() for d in "abc")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("features_corpus") / "corpus"
    write_corpus(root, 3, 2, seed=5, duration_s=(1.0, 1.2))
    return root


def test_build_shards_with_a_runs_features(small_corpus: Path, init_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """--features RUN: the index records the run's feature and VAD settings; feature flags that agree are
    fine, ones that conflict are one error line."""
    run = tmp_path / "other"  # a run of other features than the defaults, as its checkpoint records them
    features, vad = FeatureConfig(n_mels=24, f_min=80.0, hop_ms=12.5), VadConfig(max_pause_ms=200.0)
    save_checkpoint({"step": 1, "model": {"x": torch.zeros(1)}, "feature_config": features.to_dict(),
                     "vad_config": vad.to_dict()}, run, keep=1)
    for source, out, flags in ((run, tmp_path / "s1", ["--n-mels", "24"]), (init_run, tmp_path / "s2", [])):
        result = invoke("build-shards", small_corpus, "-o", out, "--min-shards", "1", "-j", "1", "--features", source,
                        *flags)
        assert result.exit_code == 0, result.output
        config = read_index(out)["config"]
        recorded = load_checkpoint(source)
        assert FeatureConfig.from_dict(config["features"]) == FeatureConfig.from_dict(recorded["feature_config"])
        assert VadConfig.from_dict(config["vad"]) == VadConfig.from_dict(recorded["vad_config"])
    assert read_index(tmp_path / "s1")["config"]["features"]["hop_ms"] == 12.5
    err = one_error_line(capsys, "build-shards", small_corpus, "-o", tmp_path / "s3", "--features", run,
                         "--n-mels", "40")
    assert f"--n-mels 40 conflicts with --features {run}" in err and "--n-mels 24" in err
    err = one_error_line(capsys, "build-shards", small_corpus, "-o", tmp_path / "s4", "--features", run, "--no-vad")
    assert "--no-vad conflicts" in err
    assert not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()
