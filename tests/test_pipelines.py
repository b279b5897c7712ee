"""The recipes in pipelines/ run end to end in their smoke mode, so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["librispeech_vctk.sh", "voxceleb.sh"])
def test_recipe_smoke_mode(recipe, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVECTOR_PROGRESS": "0"}
    done = subprocess.run(["bash", str(PIPELINES / recipe), "--smoke", str(tmp_path / "work")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = tmp_path / "work"
    assert (work / "shards" / "index.json").exists()
    assert (work / "run" / "eval.json").exists()
    assert (work / "exported" / "dvector.pt").exists()
    assert "EER=" in done.stdout


@pytest.mark.slow
def test_demo_script_matches_the_demo_command(tmp_path):
    """pipelines/demo.sh runs the demo's stages with the CLI and reaches the same EER as `dvector demo`."""
    from typer.testing import CliRunner

    from dvector.cli import app

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", str(PIPELINES / "demo.sh"), "--small", str(tmp_path / "script")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    script_eer = [line for line in done.stdout.splitlines() if line.startswith("EER=")][-1]
    command = CliRunner().invoke(app, ["demo", "--small", "-o", str(tmp_path / "command")])
    assert command.exit_code == 0, command.output
    assert command.output.strip().splitlines()[-1] == script_eer
    assert (tmp_path / "script" / "tsne.png").exists() and (tmp_path / "script" / "det.png").exists()
