"""The index beside the shards (``index.json``): read and checked, or assembled from a build's records.

Readers use the index instead of listing storage: the speaker table, every shard's name, size,
sha256 and speakers, the feature and VAD settings, and the files the build skipped.
"""

from __future__ import annotations

import json
from urllib.parse import urlparse
from urllib.request import url2pathname
import os
from pathlib import Path
from typing import Any

from dvector.errors import DvectorError
from dvector.files import write_json_atomic
from dvector.shards.build_folder import STATE_DIR, sidecar_path, state_dir
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, is_remote
from dvector.shards.reader import SampleChecks
from dvector.shards.streams import read_url


MAX_INDEX_BYTES = 256 << 20  # an index.json larger than this is not one (or never ends): refused, not read on


def read_index(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The index of a shard folder (a local path, or a URL of the folder or of index.json itself).

    A remote index is read with the stall timeout of :mod:`dvector.shards.streams` on every read:
    a server that never answers gives a :class:`DvectorError` (caused by a ``StallError``) after it.
    Local or remote, at most :data:`MAX_INDEX_BYTES` are read, and one that is not JSON, is cut
    short, never ends or is nested too deeply is a :class:`DvectorError` naming it.
    """
    loc = str(location)
    target = loc if loc.endswith(".json") else loc.rstrip("/") + "/" + INDEX_NAME
    try:
        if is_remote(target):
            data = json.loads(read_url(target, MAX_INDEX_BYTES))
        else:
            path = Path(url2pathname(urlparse(target).path) if target.startswith("file:") else target)  # %20...
            with open(path, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)
            if len(raw) > MAX_INDEX_BYTES:
                raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes, more than it may hold")
            data = json.loads(raw)
    except FileNotFoundError as exc:
        raise DvectorError(f"no {INDEX_NAME} at {target}: build shards with `dvector build-shards`, or rebuild it with `dvector index DIR`") from exc
    except RecursionError:
        raise DvectorError(f"cannot read {target}: nested too deeply to be an index") from None
    except (OSError, ValueError) as exc:
        raise DvectorError(f"cannot read {target}: {exc}") from exc
    check_index(data, target)
    return data


def check_index(data: Any, where: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DvectorError(f"{where} is not a dvector shard index")
    if data.get("version") != FORMAT_VERSION:
        raise DvectorError(f"{where} has shard format version {data.get('version')}; this dvector reads version {FORMAT_VERSION}")


def collect_index(out_dir: Path) -> dict[str, Any]:
    """The index of a complete build, from its plan and per-shard records (no timing, no paths)."""
    state = state_dir(out_dir)
    plan_file = state / "plan.json"
    if not plan_file.exists():
        raise DvectorError(f"{out_dir} has no {STATE_DIR}/plan.json: it was not made by `dvector build-shards`")
    record = json.loads(plan_file.read_text())
    shards, failures = [], []
    speaker_totals = {i: [0, 0] for i in range(len(record["speakers"]))}
    missing = []
    for number, name in enumerate(record["shards"]):
        sidecar = sidecar_path(out_dir, number)
        if not (out_dir / name).exists() or not sidecar.exists():
            missing.append(name)
            continue
        data = json.loads(sidecar.read_text())
        shards.append(data["shard"])
        failures.extend(data["failures"])
        for spk, (utts, frames) in data["speakers"].items():
            speaker_totals[int(spk)][0] += utts
            speaker_totals[int(spk)][1] += frames
    if missing:
        raise DvectorError(f"{len(missing)} of {len(record['shards'])} shards are not built yet "
                           f"(first: {missing[0]}); run the remaining parts, then `dvector index {out_dir}`")
    speakers = [{"id": spk, "index": i, "utterances": speaker_totals[i][0], "frames": speaker_totals[i][1]}
                for i, spk in enumerate(record["speakers"])]
    failures.sort(key=lambda f: (f["root"], f["source"]))
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": record["config"],
        "config_hash": record["config_hash"],
        "input_digest": record["input_digest"],
        "roots": record["roots"],
        "totals": {"shards": len(shards), "utterances": sum(s["samples"] for s in shards),
                   "frames": sum(s["frames"] for s in shards), "speakers": len(speakers), "failures": len(failures)},
        "speakers": speakers,
        "shards": shards,
        "failures": failures,
    }


def write_index(out_dir: Path) -> dict[str, Any]:
    """Write ``index.json`` (atomically) from what is on disk; used at the end of a build and by `dvector index`.

    An index that already holds exactly this is left alone: rerunning a finished build (or `dvector
    index`) on read-only storage writes nothing."""
    index = collect_index(Path(out_dir))
    target = Path(out_dir) / INDEX_NAME
    try:
        with open(target, encoding="utf-8") as f:
            if json.load(f) == index:
                return index
    except (OSError, ValueError):
        pass  # missing or damaged: write it
    write_json_atomic(target, index)
    return index


def index_checks(index: dict[str, Any] | None) -> SampleChecks:
    """The sample checks an index implies, where it says: its mel bands and its largest speaker_index."""
    if not isinstance(index, dict):
        return SampleChecks()
    try:
        n_mels = int(index["config"]["features"]["n_mels"])
    except (KeyError, TypeError, ValueError):
        n_mels = None
    try:
        top = max((int(s["index"]) for s in index["speakers"]), default=None)
    except (KeyError, TypeError, ValueError):
        top = None
    return SampleChecks(n_mels, top)
