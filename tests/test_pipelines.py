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
