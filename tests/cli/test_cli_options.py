"""The CLI's options: the same names and short flags for every command, defaults read from the config
dataclasses, shared options spelled alike, a help text everywhere; errors and user paths printed
once and literally (rich markup escaped); the training summary printed by the main process only."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import typer.main
from typer.testing import CliRunner

from dvector.cli import app, main
from dvector.cli.options import EXTENSIONS, default, range_text
from dvector.config import (DEFAULT_EXTENSIONS, BuildConfig, FeatureConfig, TrainConfig, VadConfig, parse_augment,
                            parse_range)

COMMANDS = typer.main.get_command(app).commands


def params(command: str) -> dict:
    return {p.name: p for p in COMMANDS[command].params}


def is_option(param) -> bool:  # noqa: ANN001
    return type(param).__name__ == "TyperOption"


def spelled(param) -> str:  # noqa: ANN001
    return "/".join(param.opts + param.secondary_opts) if is_option(param) else param.name.upper()


# What users type: the commands, in `--help` order, and each one's arguments and options in order.
SURFACE = {
    "build-shards": ["ROOTS", "-o/--out/-s/--save_dir/--save-dir", "--kaldi", "--kaldi-root", "--allow-commands",
                     "--manifest", "--lhotse", "-e/--extensions", "-j/--workers", "--dask",
                     "--shard-size",
                     "--min-shards", "--block-size", "--seed", "--sample-rate", "--n-mels", "--vad/--no-vad", "--features",
                     "--merge-speakers", "--speed-perturb", "--split-seconds", "--part", "--overwrite", "--strict",
                     "--fail-fast"],
    "index": ["FOLDER"],
    "check": ["FOLDER", "-j/--workers"],
    "train": ["SHARDS", "MODEL_DIR", "-i/--steps", "-s/--save-every", "-d/--decay-every", "-n/--n-speakers",
              "-m/--n-utterances", "-l/--seg-len", "-c/--continue", "--init", "--freeze-steps", "--valid", "--valid-every", "--model", "--loss",
              "--reduction", "--optimizer", "--lr", "--margin", "--scale", "--margin-warmup", "--subcentres",
              "--gather/--no-gather", "--weight-decay", "-w/--workers", "--seed", "--device", "--amp/--no-amp",
              "--compile", "--keep", "--log-every", "--short-policy", "--threads", "--max-minutes",
              "--stall-timeout", "--augment", "--augment-prob", "--noise-snr", "--babble-snr", "--reverb-rt60",
              "--noise-dir", "--rir-dir"],
    "import": ["SOURCE", "-o/--out", "--weights", "--overwrite"],
    "embed": ["MODEL", "INPUTS", "-o/--out", "--format", "--per-window", "--kaldi", "--kaldi-root", "--allow-commands",
              "-e/--extensions", "--threads", "-j/--workers", "--dask", "--sample-rate"],
    "score": ["MODEL", "A", "B", "--trials", "--kaldi", "--kaldi-root", "--allow-commands", "-o/--out",
              "-t/--threshold", "--threads", "--norm", "--cohort", "--cohort-top"],
    "eval": ["MODEL", "ROOT", "--trials", "--kaldi", "--kaldi-root", "--allow-commands", "--det", "--n-nontarget",
             "--seed", "-e/--extensions", "--save/--no-save", "--threads", "--untrained", "--norm", "--cohort",
             "--cohort-top", "-j/--workers", "--dask"],
    "export": ["MODEL", "-o/--out", "--format", "--quantize"],
    "visualize": ["MODEL", "ROOT", "-o/--out", "--max-speakers", "--per-speaker", "--seed", "-e/--extensions",
                  "--threads"],
    "diarize": ["MODEL", "AUDIO", "-o/--out", "--speakers", "--min-speakers", "--max-speakers", "--method",
                "--threshold", "--window", "--hop", "--reseg-window", "--switch-penalty", "--fill-gap", "--threads"],
    "diarize-eval": ["REFERENCE", "HYPOTHESIS", "--collar", "--skip-overlap"],
    "demo": ["-o/--out", "--small", "-j/--workers", "--seed"],
    "synth": ["ROOT", "--speakers", "--utterances", "--sample-rate", "--format", "--layout", "--prefix", "--duration",
              "--seed"],
}


def test_the_commands_and_their_options_are_what_users_type() -> None:
    assert list(COMMANDS) == list(SURFACE)
    for name, expected in SURFACE.items():
        assert [spelled(p) for p in COMMANDS[name].params] == expected, name


def test_train_defaults_are_train_config_defaults() -> None:
    p = params("train")
    renamed = {"keep": "keep_checkpoints"}
    fields = {"steps", "save_every", "decay_every", "n_speakers", "n_utterances", "valid_every", "loss", "reduction",
              "optimizer", "lr", "workers", "seed", "amp", "compile", "keep", "log_every", "short_policy", "threads",
              "max_minutes", "margin", "scale", "margin_warmup", "subcentres", "gather", "weight_decay", "freeze_steps"}
    for name in fields:
        assert p[name].default == getattr(TrainConfig(), renamed.get(name, name)), name
    assert p["seg_len"].default == range_text(TrainConfig().seg_len) == "160"
    for name in ("resume", "init", "valid", "model", "device", "stall_timeout"):  # chosen by the library when not given
        assert p[name].default is None, name
    # augmentation: "default" is TrainConfig's kinds; the ranges as typed are AugmentConfig's
    augment = TrainConfig().augment
    assert parse_augment(p["augment"].default) == augment.kinds and p["augment_prob"].default == ""
    for name in ("noise_snr", "babble_snr", "reverb_rt60"):
        assert parse_range(p[name].default, name) == getattr(augment, name), name
    assert p["noise_dir"].default is None and p["rir_dir"].default is None
    aug = {"augment", "augment_prob", "noise_snr", "babble_snr", "reverb_rt60", "noise_dir", "rir_dir"}
    # every option the command has left: the arguments
    assert (set(p) - fields - aug - {"seg_len", "resume", "init", "valid", "model", "device", "stall_timeout"}
            == {"shards", "model_dir"})


def test_build_defaults_are_the_build_config_defaults() -> None:
    p = params("build-shards")
    cfg = BuildConfig()
    for name in ("shard_size", "min_shards", "block_size", "seed", "merge_speakers"):
        assert p[name].default == getattr(cfg, name), name
    assert p["sample_rate"].default == cfg.features.sample_rate == FeatureConfig().sample_rate
    assert p["n_mels"].default == cfg.features.n_mels
    assert p["vad"].default is cfg.vad.enabled is VadConfig().enabled
    assert p["extensions"].default == EXTENSIONS == ",".join(DEFAULT_EXTENSIONS)
    assert BuildConfig(extensions=p["extensions"].default).extensions == cfg.extensions
    assert params("synth")["sample_rate"].default == FeatureConfig().sample_rate


def test_default_reads_the_dataclass() -> None:
    assert default(TrainConfig, "steps") == TrainConfig().steps
    assert default(BuildConfig, "features") == FeatureConfig()  # a default_factory
    with pytest.raises(LookupError, match="no setting 'stepz'"):
        default(TrainConfig, "stepz")
    assert range_text((160, 160)) == "160" and range_text((140, 180)) == "140-180"


@pytest.mark.parametrize("option", ["--threads", "--extensions", "--seed", "--workers", "--out"])
def test_shared_options_are_spelled_and_typed_alike(option: str) -> None:
    """One declaration each: the same flags and type wherever they appear (train's -w/--workers, the
    loader's, is another option; build-shards' --out has its -s/--save_dir aliases besides)."""
    found = {}
    for command in COMMANDS.values():
        for p in command.params:
            if not is_option(p) or option not in p.opts or (command.name, option) == ("train", "--workers"):
                continue
            flags = tuple(o for o in p.opts if o in ("-o", "--out") or not (o == "-s" or o.startswith("--save")))
            same_default = p.default if option in ("--threads", "--extensions") else None
            found[command.name] = (flags, p.type_descriptor.annotation, same_default)
    assert len(found) >= 2 and len(set(found.values())) == 1, found


def test_the_model_argument_is_one() -> None:
    helps = {name: params(name)["model"].help for name in ("embed", "score", "eval", "visualize")}
    assert set(helps.values()) == {"Run folder, checkpoint file, or exported folder."}


def test_every_argument_and_option_is_explained() -> None:
    for name, command in COMMANDS.items():
        assert (command.help or "").strip(), name
        for p in command.params:
            assert (p.help or "").strip(), f"{name} {spelled(p)} has no help"


def test_help_shows_brackets_literally() -> None:
    result = CliRunner().invoke(app, ["build-shards", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "dvector[m4a]" in result.output


# ---- what is printed -----------------------------------------------------------------------------

def test_an_error_is_printed_once_and_literally(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "no[bold]run"
    with pytest.raises(SystemExit) as info:
        main(["score", str(model), "a.wav", "b.wav"])
    assert info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and "no[bold]run" in err and "Traceback" not in err


def test_skipped_files_are_printed_literally(capsys: pytest.CaptureFixture) -> None:
    from dvector.cli.console import MAX_LISTED, print_skipped

    skipped = [(f"spk[{i}]/a[red].wav", "cannot decode [b]") for i in range(MAX_LISTED + 2)]
    print_skipped(skipped)
    err = capsys.readouterr().err
    assert f"skipped {MAX_LISTED + 2} file(s):" in err
    assert "spk[0]/a[red].wav: cannot decode [b]" in err and f"spk[{MAX_LISTED}]" not in err
    assert "... and 2 more" in err


@pytest.mark.parametrize("is_main", [True, False])
def test_the_training_summary_comes_from_the_main_process_only(is_main: bool, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    import dvector.cli.summary as summary
    import dvector.training.loop as loop

    calls = []

    def fake_train(shards, model_dir, cfg, model_cfg, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(cfg)
        kwargs["say"]("training [tiny] model")  # library messages print literally
        return SimpleNamespace(is_main=is_main)

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(summary, "print_train_summary", lambda result, console: console.print("SUMMARY"))
    result = CliRunner().invoke(app, ["train", "shards", str(tmp_path / "run"), "-i", "7", "-l", "140-180"])
    assert result.exit_code == 0, result.output
    assert calls[0].steps == 7 and calls[0].seg_len == (140, 180)
    assert "training [tiny] model" in result.output
    assert ("SUMMARY" in result.output) is is_main
