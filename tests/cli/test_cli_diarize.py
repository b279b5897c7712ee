"""`dvector diarize` and `dvector diarize-eval` as a user runs them: RTTMs written, bad files
skipped with their reason, DER printed with its parts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from use_helpers import flat, run_main, write_wav

pytest.importorskip("pyannote.metrics")


@pytest.fixture(scope="module")
def conversation(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A two-speaker synthetic conversation (tests/use/test_diarize.py's) and its reference RTTM."""
    from dvector.diarization.rttm import write_rttm
    from diarize_helpers import conversation as make

    base = tmp_path_factory.mktemp("diarize")
    wav, ref = make(seed=0)
    audio = write_wav(base / "audio" / "conv.wav", wav)
    (base / "ref").mkdir()
    write_rttm(base / "ref" / "conv.rttm", ref, "conv")
    return SimpleNamespace(base=base, audio=audio, ref=base / "ref")


def test_diarize_then_eval(trained: SimpleNamespace, conversation: SimpleNamespace, capsys: pytest.CaptureFixture,
                           tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really")
    out = tmp_path / "hyp"
    code, stdout, stderr = run_main(capsys, "diarize", trained.run, conversation.audio, bad, "-o", out,
                                    "--speakers", "2", "--threads", "1")
    assert code == 0, stderr
    assert "diarized 1 file(s)" in stdout and "skipped 1" in stdout
    assert "broken.wav: cannot decode" in flat(stderr)
    lines = (out / "conv.rttm").read_text().splitlines()
    assert lines and all(line.split()[:3] == ["SPEAKER", "conv", "1"] for line in lines)
    assert {line.split()[7] for line in lines} == {"SPEAKER_00", "SPEAKER_01"}
    assert not (out / "broken.rttm").exists()

    (out / "lonely.rttm").write_text("SPEAKER lonely 1 0 1 <NA> <NA> a <NA> <NA>\n")
    code, stdout, stderr = run_main(capsys, "diarize-eval", conversation.ref, out)
    assert code == 0, stderr
    assert "lonely.rttm is in" in flat(stderr) and "only: not scored" in flat(stderr)
    rows = {line.split()[0]: line for line in stdout.splitlines() if line.split()}
    assert "conv" in rows and "overall" in rows
    assert "collar 0.25 s each side" in stdout
    der = float(stdout.strip().splitlines()[-1].removeprefix("DER=").rstrip("%"))
    assert 0.0 <= der < 100.0


def test_diarize_notes_fewer_speakers_than_asked_for(trained: SimpleNamespace, conversation: SimpleNamespace,
                                                    capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, stdout, stderr = run_main(capsys, "diarize", trained.run, conversation.audio, "-o", tmp_path,
                                    "--speakers", "50", "--threads", "1")
    assert code == 0, stderr
    text = flat(stderr)
    assert f"note: {conversation.audio}: --speakers 50, but only " in text and " speaker(s) found" in text
    assert "diarized 1 file(s)" in stdout


def test_diarize_eval_perfect_hypothesis_scores_zero(conversation: SimpleNamespace,
                                                     capsys: pytest.CaptureFixture) -> None:
    code, stdout, _ = run_main(capsys, "diarize-eval", conversation.ref, conversation.ref)
    assert code == 0 and stdout.strip().endswith("DER=0.00%")


def test_diarize_eval_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, stderr = run_main(capsys, "diarize-eval", tmp_path / "nope", tmp_path)
    assert code == 1 and "not a folder of RTTM files" in stderr and "Traceback" not in stderr


def test_diarize_bad_options_are_one_line(trained: SimpleNamespace, conversation: SimpleNamespace,
                                          capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, stderr = run_main(capsys, "diarize", trained.run, conversation.audio, "-o", tmp_path,
                               "--min-speakers", "5", "--max-speakers", "3")
    assert code == 1 and "--min-speakers" in stderr and "Traceback" not in stderr


def test_cli_defaults_are_the_library_defaults() -> None:
    """The CLI module types its defaults (importing the library would load torch at start-up)."""
    import inspect

    from dvector.cli.diarize import diarize_cmd
    from dvector.diarization.clustering import ClusterConfig
    from dvector.diarization.diarize import DiarizeConfig

    cli = {name: p.default for name, p in inspect.signature(diarize_cmd).parameters.items()}
    d, c = DiarizeConfig(), ClusterConfig()
    assert (cli["window"], cli["hop"], cli["reseg_window"], cli["switch_penalty"], cli["fill_gap"]) == (
        d.window_s, d.hop_s, d.reseg_window_s, d.switch_penalty, d.fill_gap_s)
    assert (cli["min_speakers"], cli["max_speakers"], cli["method"]) == (c.min_speakers, c.max_speakers, c.method)
