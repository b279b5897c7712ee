"""The demo in its reduced size, through the CLI as a user runs it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dvector.cli import app, main
from dvector.demo.synth import parse_duration, write_corpus
from dvector.config import TrainConfig
from dvector.errors import DvectorError


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_training_helps(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--small", "-o", str(out)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("EER=") and last.endswith("%"), last
    trained = float(last[len("EER="):-1]) / 100
    for name in ("tsne.png", "det.png", "run/checkpoints/latest.pt", "run/eval.json", "shards/index.json"):
        assert (out / name).exists(), name
    stored = json.loads((out / "run" / "eval.json").read_text())
    assert stored["eer"] == pytest.approx(trained, abs=5e-5)
    untrained = float(result.output.split("untrained network: EER ")[1].split("%")[0]) / 100
    assert trained < untrained


def test_demo_trains_on_one_thread_without_augmentation_unlike_the_default():
    """The demo's own settings (run.py says what each bought): no augmentation of the clean synthetic voices, and
    one torch thread (every core, the default, crawled on shared cores); the library's defaults stay as they are."""
    from dvector.demo.run import SMALL, DemoSize, demo_train_config

    assert TrainConfig().augment.kinds and TrainConfig().threads == 0, "the defaults the demo departs from"
    for size in (DemoSize(), SMALL):
        cfg = demo_train_config(size, seed=3)
        assert cfg.augment.kinds == () and cfg.threads == 1
        assert (cfg.steps, cfg.optimizer, cfg.seed, cfg.seg_len) == (size.steps, "adam", 3, (size.seg_len,) * 2)


def test_synth_writes_nested_speaker_folders(tmp_path):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "root"), "--speakers", "2", "--utterances", "3",
                                      "--layout", "nested", "--prefix", "id", "--format", "wav"])
    assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "root").as_posix() for p in (tmp_path / "root").rglob("*.wav"))
    assert len(files) == 6
    assert all(f.startswith(("id000/session", "id001/session")) for f in files), files


@pytest.mark.parametrize("args,message", [
    (["--layout", "deep"], "--layout must be flat or nested, got 'deep'"),
    (["--format", "mp3"], "--format must be flac or wav, got 'mp3'"),
    (["--duration", "4"], "--duration takes lo-hi seconds such as 1.5-4.0, got '4'"),
    (["--duration", "4-1"], "--duration needs 0 < lo <= hi, got '4-1'"),
    (["--speakers", "-3"], "--speakers and --utterances must be >= 1, got -3 and 8"),
    (["--utterances", "0"], "--speakers and --utterances must be >= 1, got 10 and 0"),
    (["--sample-rate", "1"], "--sample-rate must be 1000-768000 Hz, got 1"),
    (["--sample-rate", "800000"], "--sample-rate must be 1000-768000 Hz, got 800000"),
    (["--prefix", "../../escape"], "--prefix must be a plain name, without folders or '..': got '../../escape'"),
    (["--prefix", "a/b"], "--prefix must be a plain name, without folders or '..': got 'a/b'"),
])
def test_synth_rejects_bad_arguments(args, message, tmp_path, capsys):
    """As a user sees it: one line, exit status 1, nothing written."""
    with pytest.raises(SystemExit) as info:
        main(["synth", str(tmp_path / "root"), *args])
    assert info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "root").exists()
    assert not list(tmp_path.parent.glob("escape*")), "nothing written outside the root"


def test_parse_duration():
    assert parse_duration("1.5-4.0") == (1.5, 4.0)
    assert parse_duration("2-2") == (2.0, 2.0)
    assert parse_duration((1, 3)) == (1.0, 3.0)
    for bad in ("", "4", "1-2-3", "a-b", "-1-2", "0-1", "3-1", "1-inf", "nan-1"):
        with pytest.raises(DvectorError, match="--duration"):
            parse_duration(bad)
    with pytest.raises(DvectorError, match="0 < lo <= hi"):
        parse_duration((2.0, 1.0))


def test_write_corpus_checks_its_arguments_before_writing(tmp_path):
    root = tmp_path / "root"
    with pytest.raises(DvectorError, match="--layout"):
        write_corpus(root, 1, 1, layout="deep")
    with pytest.raises(DvectorError, match="--format"):
        write_corpus(root, 1, 1, extension="ogg")
    with pytest.raises(DvectorError, match="--duration"):
        write_corpus(root, 1, 1, duration_s="3-1")
    assert not root.exists()
    assert [p.relative_to(root).as_posix() for p in write_corpus(root, 1, 2, layout="nested", duration_s="0.5-0.6")] \
        == ["spk000/session0/spk000-000.flac", "spk000/session1/spk000-001.flac"]
