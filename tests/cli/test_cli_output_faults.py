"""The commands that use a model, where their outputs cannot be written or their inputs are not what they
claim to be: a model with NaN weights, a full disk, a file where a folder should be, standard output
that fails, impossible options. Each is one ``error:`` line and a non-zero exit, and leaves no file half
written under its final name nor a temporary file beside it.

A full disk is ``/dev/full`` (writes fail with ENOSPC): the temporary name an output is written to
first (``dvector.files.temp_name``, unique to this process) is made a link to it. A folder that
cannot take files is a path under a regular file (chmod does not stop root).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dvector.files import stale_temps, temp_name
from use_helpers import copy_run, flat, run_main, write_wav

FULL = Path("/dev/full")
needs_full = pytest.mark.skipif(not FULL.exists(), reason="no /dev/full here to fill a disk with")


def one_error(code: int, err: str, *phrases: str) -> str:
    """Exit status 1 and one ``error:`` line holding ``phrases``; returns stderr, unwrapped."""
    text = flat(err)
    assert code == 1, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for phrase in phrases:
        assert phrase in text, err
    return text


def fill_up(path: Path) -> None:
    """Writes of ``path`` (atomic: to its temporary name first) meet a full disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_name(path).symlink_to(FULL)


def nothing_left(folder: Path, name: str) -> None:
    """No ``name`` in ``folder``, and no temporary file (nor link) of it either."""
    assert not os.path.lexists(folder / name)
    assert stale_temps(folder) == [] and not os.path.lexists(temp_name(folder / name))


@pytest.fixture(scope="module")
def nan_model(trained: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The trained checkpoint with one weight set to NaN (as a diverged run would leave it), and the tensor's name."""
    from dvector.inference.bundle import find_checkpoint

    state = torch.load(find_checkpoint(trained.run), map_location="cpu", weights_only=True)
    name = sorted(k for k, v in state["model"].items() if v.is_floating_point())[0]
    weight = state["model"][name].clone()
    weight.view(-1)[0] = float("nan")
    state["model"][name] = weight
    path = tmp_path_factory.mktemp("nan") / "nan.pt"
    torch.save(state, path)
    return SimpleNamespace(path=path, state=state, tensor=f"model.{name}")


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file, where the commands are told a folder is."""
    path = tmp_path / "blocker"
    path.write_text("a file, not a folder\n")
    return path


# ---- 5: a model with NaN weights ----------------------------------------------------------------------

def test_every_command_refuses_a_checkpoint_with_nan_weights(trained, nan_model, tmp_path: Path,  # noqa: ANN001
                                                             capsys: pytest.CaptureFixture) -> None:
    wav, other = trained.files[:2]
    commands = {
        "embed": ["embed", nan_model.path, wav, "-o", tmp_path / "e.npz"],
        "score": ["score", nan_model.path, wav, other, "-t", "0.5"],
        "export": ["export", nan_model.path, "-o", tmp_path / "ts"],
        "onnx": ["export", nan_model.path, "--format", "onnx", "-o", tmp_path / "onnx"],
        "visualize": ["visualize", nan_model.path, trained.root, "-o", tmp_path / "t.png"],
        "diarize": ["diarize", nan_model.path, wav, "-o", tmp_path / "rttm"],
    }
    for what, args in commands.items():
        code, out, err = run_main(capsys, *args, "--threads", "1") if what not in ("export", "onnx") else \
            run_main(capsys, *args)
        one_error(code, err, f"{nan_model.path}: NaN or Inf in the weights {nan_model.tensor}")
        assert not out, what
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # nothing exported, embedded, drawn, diarized


def test_an_export_with_nan_weights_is_refused_too(trained, nan_model, tmp_path: Path,  # noqa: ANN001
                                                   capsys: pytest.CaptureFixture) -> None:
    """An export made before exports checked their weights: loading it for use is refused the same way."""
    from dvector.export.torchscript import embedding_module, export_record, script_module

    module = embedding_module(nan_model.state)
    meta = json.dumps(export_record(nan_model.state, nan_model.path, module.hop))
    folder = tmp_path / "exported"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(script_module(module), str(folder / "dvector.pt"), _extra_files={"dvector.json": meta})
    (folder / "dvector.json").write_text(meta)
    code, _, err = run_main(capsys, "embed", folder, trained.files[0], "-o", tmp_path / "e.npz", "--threads", "1")
    one_error(code, err, f"{folder / 'dvector.pt'}: NaN or Inf in the weights model.")
    assert not (tmp_path / "e.npz").exists()
    root = tmp_path / "root"
    for speaker in ("a", "b"):
        (root / speaker).mkdir(parents=True)
        (root / speaker / "x.wav").write_bytes(b"RIFF not audio either")
    run = copy_run(trained.run, tmp_path / "run")
    code, out, err = run_main(capsys, "eval", run, root, "--threads", "1")
    text = one_error(code, err, "need at least 2 speakers to make trials, found 0 (2 file(s) could not be embedded)")
    assert "skipped 2 file(s):" in text and "a/x.wav: cannot decode" in text and "EER" not in out


# ---- 6: a full disk -----------------------------------------------------------------------------------

@needs_full
@pytest.mark.parametrize("fmt, name", [("torchscript", "dvector.pt"), ("onnx", "dvector.onnx")])
def test_export_onto_a_full_disk_is_one_line(fmt: str, name: str, trained, tmp_path: Path,  # noqa: ANN001
                                             capsys: pytest.CaptureFixture) -> None:
    """Before: torch's C++ writer aborted the process (SIGABRT) and left .dvector.pt.tmp-*; ONNX a traceback."""
    out = tmp_path / "exported"
    fill_up(out / name)
    code, _, err = run_main(capsys, "export", trained.run, "--format", fmt, "-o", out)
    one_error(code, err, f"error: cannot write {out / name}: No space left on device")
    nothing_left(out, name)


@needs_full
@pytest.mark.parametrize("fmt, name, record", [("torchscript", "dvector.pt", "dvector.json"),
                                               ("onnx", "dvector.onnx", "dvector.onnx.json")])
def test_a_disk_full_at_the_record_leaves_no_model_without_it(fmt: str, name: str, record: str, trained,  # noqa: ANN001
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The model is written, then its record meets a full disk: neither is left (nor an earlier export's model)."""
    out = tmp_path / "exported"
    out.mkdir()
    (out / name).write_bytes(b"an earlier export")
    fill_up(out / record)
    code, _, err = run_main(capsys, "export", trained.run, "--format", fmt, "-o", out)
    one_error(code, err, f"error: cannot write {out / record}: No space left on device")
    nothing_left(out, name)
    nothing_left(out, record)


@needs_full
def test_visualize_onto_a_full_disk_leaves_no_empty_picture(trained, tmp_path: Path,  # noqa: ANN001
                                                            capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "tsne.png"
    fill_up(png)
    code, _, err = run_main(capsys, "visualize", trained.run, trained.root, "-o", png, "--max-speakers", "3",
                            "--per-speaker", "2", "--threads", "1")
    one_error(code, err, f"error: cannot write {png}: No space left on device")
    nothing_left(tmp_path, png.name)


# ---- 10: a folder that cannot take the outputs, a picture format there is none of ------------------------

def test_outputs_under_a_file_fail_before_the_work(trained, blocker: Path, tmp_path: Path,  # noqa: ANN001
                                                   capsys: pytest.CaptureFixture, monkeypatch) -> None:  # noqa: ANN001
    """``-o`` naming a regular file where a folder is expected, or a folder under one, or a picture in a
    format there is none of: one line, before the model is scripted, loaded or the corpus synthesized."""
    from dvector.demo import run as demo_run
    from dvector.export import torchscript
    from dvector.inference import embedder

    def no_work(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(torchscript, "script_module", no_work)
    monkeypatch.setattr(embedder, "load", no_work)
    monkeypatch.setattr(demo_run, "write_corpus", no_work)
    wav = trained.files[0]
    cases = [
        (["export", trained.run, "-o", blocker], f"cannot write {blocker}: it is a file, not a folder"),
        (["export", trained.run, "-o", blocker / "sub"], f"cannot write {blocker / 'sub'}: {blocker} is a file"),
        (["export", trained.run, "--format", "onnx", "--quantize", "int8", "-o", blocker / "sub"],
         f"cannot write {blocker / 'sub'}: {blocker} is a file"),
        (["diarize", trained.run, wav, "-o", blocker], f"cannot write {blocker}: it is a file"),
        (["demo", "-o", blocker, "--small"], f"cannot write {blocker}: it is a file"),
        (["synth", blocker, "--speakers", "1", "--utterances", "1"], f"{blocker} is a file, not a folder"),
        (["visualize", trained.run, trained.root, "-o", blocker / "t.png"], f"cannot write {blocker}: it is a file"),
        (["visualize", trained.run, trained.root, "-o", tmp_path / "t.bmp"], "cannot draw a .bmp picture"),
        (["eval", trained.run, trained.root, "--no-save", "--det", tmp_path / "d.bmp"], "cannot draw a .bmp picture"),
    ]
    for args, phrase in cases:
        code, _, err = run_main(capsys, *args)
        one_error(code, err, phrase)
    assert blocker.read_text() == "a file, not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


# ---- 11: standard output that fails -------------------------------------------------------------------

@needs_full
def test_embed_stdin_into_a_full_stdout_is_one_line(trained, tmp_path: Path) -> None:  # noqa: ANN001
    import soundfile as sf

    wav, rate = sf.read(str(trained.files[0]), dtype="int16")
    assert rate == 16000
    pcm = tmp_path / "in.pcm"
    pcm.write_bytes(wav.astype("<i2").tobytes())
    with open(pcm, "rb") as stdin, open(FULL, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "dvector", "embed", str(trained.run), "-", "--per-window",
                               "--threads", "1"], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: cannot write to standard output: No space left on device"]


# ---- 8: a stream's sample rate out of bounds ----------------------------------------------------------

@pytest.mark.parametrize("rate", ["1", "999", "100000000"])
def test_stdin_rates_outside_what_a_header_may_hold_are_refused(rate: str, trained,  # noqa: ANN001
                                                                capsys: pytest.CaptureFixture) -> None:
    """Before: 1 Hz made 3 s of input 13 hours (run until killed), 100 MHz "the stream is too short".
    Refused before the model is loaded or stdin read (reading it here would fail: it is captured)."""
    code, out, err = run_main(capsys, "embed", trained.run, "-", "--per-window", "--sample-rate", rate)
    one_error(code, err, f"sample rate {rate} Hz is outside 1000-768000 Hz")
    assert not out


def test_the_stream_rate_bounds_are_the_decoders() -> None:
    from dvector.inference.streaming import check_stream_rate
    from dvector.signal.audio import MAX_RATE, MIN_RATE

    for ok in (MIN_RATE, 8000, MAX_RATE):
        check_stream_rate(ok)
    for bad in (MIN_RATE - 1, MAX_RATE + 1, 0, -16000):
        with pytest.raises(Exception, match="outside"):
            check_stream_rate(bad)


# ---- 15: a command that produced nothing fails, listing what it skipped ----------------------------------

def test_commands_that_produce_nothing_fail_with_the_skipped_list(trained, tmp_path: Path,  # noqa: ANN001
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Before: diarize exited 0 ("diarized 0 file(s)"), embed 1 without saying which files failed."""
    bad = tmp_path / "in" / "broken.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF not really audio")
    code, out, err = run_main(capsys, "diarize", trained.run, bad, "-o", tmp_path / "rttm", "--threads", "1")
    text = one_error(code, err, "error: nothing was diarized: all 1 input(s) were skipped")
    assert "skipped 1 file(s):" in text and "broken.wav: cannot decode" in text
    assert "diarized" not in out and not list((tmp_path / "rttm").iterdir())
    code, _, err = run_main(capsys, "embed", trained.run, bad.parent, "-o", tmp_path / "e.npz", "--threads", "1")
    text = one_error(code, err, "error: nothing was embedded")
    assert "skipped 1 file(s):" in text and "broken.wav: cannot decode" in text
    assert not (tmp_path / "e.npz").exists()


# ---- 16: diarize-eval on a malformed RTTM, an impossible collar --------------------------------------------

def test_diarize_eval_refuses_malformed_lines_and_negative_collars(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.mkdir()
    hyp.mkdir()
    (ref / "a.rttm").write_text("SPEAKER a 1 0.0 2.0 <NA> <NA> s1 <NA> <NA>\n")
    (hyp / "a.rttm").write_text("SPEAKER a 1 0.0 2.0 <NA> <NA> s1 <NA> <NA>\n")
    code, _, err = run_main(capsys, "diarize-eval", ref, hyp, "--collar", "-1")
    one_error(code, err, "--collar must be a number of seconds >= 0, got -1")
    pytest.importorskip("pyannote.metrics")
    (hyp / "a.rttm").write_text(";; a comment\nSPEAKER,a,1,0.0,2.0,<NA>,<NA>,s1,<NA>,<NA>\n")
    code, out, err = run_main(capsys, "diarize-eval", ref, hyp)
    one_error(code, err, f"{hyp / 'a.rttm'}:2: not an RTTM line")
    assert "DER=" not in out


# ---- 19: eval.json is strict JSON ---------------------------------------------------------------------------

def test_eval_json_holds_no_infinity(tmp_path: Path) -> None:
    from dvector.evaluation.evaluate import EvalResult
    from dvector.evaluation.results import write_eval

    result = EvalResult(eer=0.1, eer_threshold=0.42, min_dcf={"0.01": 1.0, "0.05": 0.5},
                        min_dcf_threshold={"0.01": math.inf, "0.05": 0.3}, n_trials=4, n_target=2, n_nontarget=2,
                        norm={"eer": math.nan, "min_dcf_threshold": {"0.01": -math.inf}})
    write_eval(tmp_path / "eval.json", result)

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    stored = json.loads((tmp_path / "eval.json").read_text(), parse_constant=refuse)
    assert stored["min_dcf_threshold"] == {"0.01": None, "0.05": 0.3} and stored["eer_threshold"] == 0.42
    assert stored["norm"] == {"eer": None, "min_dcf_threshold": {"0.01": None}}


# ---- 20: eval --no-save says why there is no DET curve ---------------------------------------------------------

def test_eval_no_save_gives_the_true_reason_for_no_det_curve(trained, small_root: Path, tmp_path: Path,  # noqa: ANN001
                                                             capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained.run, tmp_path / "run")
    code, out, err = run_main(capsys, "eval", run, small_root, "--no-save", "--n-nontarget", "20", "--threads", "1")
    assert code == 0, err
    text = flat(err)
    assert "no DET curve: --no-save" in text and "not a folder" not in text and "EER=" in out
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]


# ---- 23: a silent room response ----------------------------------------------------------------------------

def test_a_silent_room_response_is_skipped_with_a_note(tmp_path: Path) -> None:
    from dvector.augment.sources import load_rooms, prepare_sources
    from dvector.config import FeatureConfig
    from dvector.errors import DvectorError

    rate = 16000
    rir = np.exp(-np.arange(int(0.5 * rate)) / (0.05 * rate)) * np.random.default_rng(0).standard_normal(rate // 2)
    rir[0] = 4.0
    write_wav(tmp_path / "rooms" / "hall.wav", rir / np.abs(rir).max(), rate)
    write_wav(tmp_path / "rooms" / "silent.wav", np.zeros(rate // 2), rate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = prepare_sources("", str(tmp_path / "rooms"), FeatureConfig(), tmp_path / "cache")
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'rooms' / 'silent.wav'}: skipped: silent (every sample under 1e-06), not a room response"]
    assert load_rooms(paths).shape[0] == 1  # the hall only
    (tmp_path / "rooms" / "hall.wav").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DvectorError, match="no readable room response"):
            prepare_sources("", str(tmp_path / "rooms"), FeatureConfig(), tmp_path / "cache")
