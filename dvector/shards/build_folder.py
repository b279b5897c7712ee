"""A build's folder: its state records, and what is complete.

Layout of an output folder::

    shard-000000.tar ...     complete shards (written under a temporary name, then renamed)
    .build/plan.json         the configuration and input digest every run and part must match
    .build/shard-000000.json what each shard holds and which files failed (written after the tar)
    index.json               written last, once every shard of the plan is complete (``index``)

A shard counts as done only with both its tar and its record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from dvector.config import BuildConfig
from dvector.errors import DvectorError
from dvector.files import stale_temps, write_json_atomic
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name
from dvector.shards.plan import Plan

STATE_DIR = ".build"


def state_dir(out_dir: Path) -> Path:
    return out_dir / STATE_DIR


def sidecar_path(out_dir: Path, number: int) -> Path:
    return state_dir(out_dir) / (shard_name(number)[: -len(".tar")] + ".json")


def plan_record(plan: Plan, cfg: BuildConfig, roots: dict[str, str]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "input_digest": plan.digest,
        "roots": roots,
        "speakers": plan.speakers,
        "shards": [shard_name(i) for i in range(len(plan.shards))],
    }


def prepare_folder(out_dir: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Create the folder, or check that what it holds was made with the same plan.

    ``overwrite`` deletes an earlier build in the folder, whatever its configuration.
    """
    plan_file = state_dir(out_dir) / "plan.json"
    if overwrite:
        clear_build(out_dir)
    elif plan_file.exists():
        old = json.loads(plan_file.read_text())
        if old.get("config_hash") != record["config_hash"] or old.get("input_digest") != record["input_digest"]:
            what = "configuration" if old.get("config_hash") != record["config_hash"] else "input files"
            raise DvectorError(
                f"{out_dir} holds a build made with different {what}; "
                "choose another output folder, or pass --overwrite to replace it"
            )
    elif (out_dir / INDEX_NAME).exists() or any(out_dir.glob("shard-*.tar")):
        raise DvectorError(f"{out_dir} holds shards of an unknown build; pass --overwrite to replace them")
    state_dir(out_dir).mkdir(parents=True, exist_ok=True)
    if not plan_file.exists():
        write_json_atomic(plan_file, record)


def clear_build(out_dir: Path) -> None:
    for path in out_dir.glob("shard-*.tar"):
        path.unlink()
    for path in (out_dir / INDEX_NAME,):
        if path.exists():
            path.unlink()
    shutil.rmtree(state_dir(out_dir), ignore_errors=True)


def remove_stale_temps(out_dir: Path, numbers: Sequence[int]) -> None:
    """Delete temporary files left by a killed run, for this part's shards only.

    Each folder is listed once (not once per shard: with 10k shards that was 10k listings of 20k
    entries, minutes on every resume)."""
    wanted = {shard_name(n) for n in numbers}, {sidecar_path(out_dir, n).name for n in numbers}
    for folder, names in zip((out_dir, state_dir(out_dir)), wanted):
        for tmp in stale_temps(folder):
            if tmp.name[1:].rsplit(".tmp-", 1)[0] in names:  # ".NAME.tmp-PID" -> NAME
                tmp.unlink(missing_ok=True)


def is_complete(out_dir: Path, number: int) -> bool:
    return (out_dir / shard_name(number)).exists() and sidecar_path(out_dir, number).exists()
