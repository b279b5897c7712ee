"""dvector.training.checkpoint: numbered checkpoints with latest.pt and best.pt beside them, written
atomically, pruned to the last ``keep``, found from a run folder and loaded safely."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dvector.errors import DvectorError
from dvector.training.checkpoint import checkpoint_dir, load_checkpoint, resolve_checkpoint, save_checkpoint


def make_state(step: int) -> dict[str, Any]:
    """A small checkpoint-like state: tensors, nested dicts, lists and plain values."""
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "model": {"w": torch.randn(3, 4, generator=g), "b": torch.arange(4, dtype=torch.float32) + step},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "best_eer": 0.25,
        "seg_len": [140, 180],
        "name": f"run-{step}",
    }


def assert_state_equal(loaded: dict[str, Any], state: dict[str, Any]) -> None:
    for key, value in state.items():
        assert key in loaded, key
        if isinstance(value, dict) and key == "model":
            assert set(loaded[key]) == set(value)
            for name, tensor in value.items():
                assert torch.equal(loaded[key][name], tensor), name
        else:
            assert loaded[key] == value, key


def numbered(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step-*.pt"))


def every_file(folder: Path) -> set[str]:
    """All names in ``folder``, hidden ones (the temporary files) included."""
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------------------------------------
# save_checkpoint
# ---------------------------------------------------------------------------------------------


def test_save_writes_numbered_and_latest_that_load_back_equal(tmp_path: Path) -> None:
    state = make_state(42)
    path = save_checkpoint(state, tmp_path, keep=5)
    folder = checkpoint_dir(tmp_path)
    assert path == folder / "step-000000042.pt"
    assert every_file(folder) == {"step-000000042.pt", "latest.pt"}
    for p in (path, folder / "latest.pt"):
        assert_state_equal(load_checkpoint(p), state)


def test_save_does_not_change_the_callers_state(tmp_path: Path) -> None:
    state = make_state(1)
    keys = set(state)
    save_checkpoint(state, tmp_path, keep=5)
    assert set(state) == keys


def test_best_writes_best_pt(tmp_path: Path) -> None:
    state = make_state(7)
    save_checkpoint(state, tmp_path, keep=5, best=True)
    folder = checkpoint_dir(tmp_path)
    assert every_file(folder) == {"step-000000007.pt", "latest.pt", "best.pt"}
    assert_state_equal(load_checkpoint(folder / "best.pt"), state)


def test_latest_follows_the_newest_and_best_stays_put(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path)
    save_checkpoint(make_state(1), tmp_path, keep=2)
    save_checkpoint(make_state(2), tmp_path, keep=2, best=True)
    for step in (3, 4, 5):
        save_checkpoint(make_state(step), tmp_path, keep=2)
    assert load_checkpoint(folder / "latest.pt")["step"] == 5
    assert_state_equal(load_checkpoint(folder / "latest.pt"), make_state(5))
    # best.pt outlives its numbered file
    assert "step-000000002.pt" not in every_file(folder)
    assert_state_equal(load_checkpoint(folder / "best.pt"), make_state(2))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_only_the_last_keep_numbered_files(tmp_path: Path, keep: int) -> None:
    steps = [10, 20, 30, 40, 50]
    for step in steps:
        save_checkpoint(make_state(step), tmp_path, keep=keep)
    folder = checkpoint_dir(tmp_path)
    assert numbered(folder) == [f"step-{s:09d}.pt" for s in steps[-keep:]]
    assert every_file(folder) == set(numbered(folder)) | {"latest.pt"}


def test_keep_orders_by_step_not_by_text(tmp_path: Path) -> None:
    for step in (9, 10, 100, 1000):
        save_checkpoint(make_state(step), tmp_path, keep=2)
    assert numbered(checkpoint_dir(tmp_path)) == ["step-000000100.pt", "step-000001000.pt"]


def test_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    for step in range(1, 5):
        save_checkpoint(make_state(step), tmp_path, keep=3, best=step % 2 == 0)
    names = every_file(checkpoint_dir(tmp_path))
    assert not [n for n in names if n.startswith(".") or "tmp" in n], names
    assert names == {"step-000000002.pt", "step-000000003.pt", "step-000000004.pt", "latest.pt", "best.pt"}


def test_stale_temporary_files_are_removed_on_the_next_save(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    stale = [folder / ".step-000000003.pt.tmp-99999", folder / ".latest.pt.tmp-12345", folder / ".best.pt.tmp-1"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    save_checkpoint(make_state(4), tmp_path, keep=5)
    assert every_file(folder) == {"step-000000004.pt", "latest.pt"}


def test_save_overwrites_the_same_step(tmp_path: Path) -> None:
    save_checkpoint(make_state(5), tmp_path, keep=5)
    again = {**make_state(5), "name": "second"}
    save_checkpoint(again, tmp_path, keep=5)
    folder = checkpoint_dir(tmp_path)
    assert numbered(folder) == ["step-000000005.pt"]
    assert load_checkpoint(folder / "step-000000005.pt")["name"] == "second"
    assert load_checkpoint(folder / "latest.pt")["name"] == "second"


# ---------------------------------------------------------------------------------------------
# resolve_checkpoint
# ---------------------------------------------------------------------------------------------


def test_resolve_a_run_folder_gives_latest(tmp_path: Path) -> None:
    for step in (1, 2):
        save_checkpoint(make_state(step), tmp_path, keep=5)
    assert resolve_checkpoint(tmp_path) == checkpoint_dir(tmp_path) / "latest.pt"
    assert resolve_checkpoint(str(tmp_path)) == checkpoint_dir(tmp_path) / "latest.pt"
    assert_state_equal(load_checkpoint(tmp_path), make_state(2))


def test_resolve_the_checkpoints_folder_itself(tmp_path: Path) -> None:
    save_checkpoint(make_state(1), tmp_path, keep=5)
    folder = checkpoint_dir(tmp_path)
    assert resolve_checkpoint(folder) == folder / "latest.pt"


def test_resolve_falls_back_to_the_newest_numbered_file(tmp_path: Path) -> None:
    for step in (9, 10, 11):
        save_checkpoint(make_state(step), tmp_path, keep=5)
    folder = checkpoint_dir(tmp_path)
    (folder / "latest.pt").unlink()  # a run killed between the numbered file and latest.pt
    assert resolve_checkpoint(tmp_path) == folder / "step-000000011.pt"
    assert load_checkpoint(tmp_path)["step"] == 11


def test_resolve_a_file_gives_the_file(tmp_path: Path) -> None:
    path = save_checkpoint(make_state(3), tmp_path, keep=5)
    assert resolve_checkpoint(path) == path


def test_resolve_an_empty_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(DvectorError):
        resolve_checkpoint(tmp_path)
    checkpoint_dir(tmp_path).mkdir()
    with pytest.raises(DvectorError):
        resolve_checkpoint(tmp_path)


def test_resolve_a_folder_with_only_other_files_raises(tmp_path: Path) -> None:
    folder = checkpoint_dir(tmp_path)
    folder.mkdir()
    (folder / "step-12.pt").write_bytes(b"")  # not step-NNNNNNNNN.pt
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DvectorError):
        resolve_checkpoint(tmp_path)


def test_resolve_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DvectorError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(DvectorError):
        load_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------
# load_checkpoint
# ---------------------------------------------------------------------------------------------


class NotAllowed:
    """Unpickling this would run code: a safe load must refuse it."""


def test_load_garbage_bytes_raises(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 10)
    with pytest.raises(DvectorError):
        load_checkpoint(path)


def test_load_an_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(DvectorError):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "obj",
    [{"step": 1, "model": {"w": torch.zeros(2)}}, [1, 2, 3], torch.zeros(3), {"format": "something-else", "version": 1}],
    ids=["dict-without-format", "list", "tensor", "other-format"],
)
def test_load_a_torch_file_that_is_not_a_checkpoint_raises(tmp_path: Path, obj: Any) -> None:
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(DvectorError, match="not a dvector checkpoint"):
        load_checkpoint(path)


def test_load_refuses_pickled_objects(tmp_path: Path) -> None:
    state = load_checkpoint(save_checkpoint(make_state(1), tmp_path, keep=5))
    path = tmp_path / "code.pt"
    torch.save({**state, "extra": NotAllowed()}, path)
    with pytest.raises(DvectorError):
        load_checkpoint(path)


@pytest.mark.parametrize("change", [1, -1, None], ids=["newer", "older", "missing"])
def test_load_a_wrong_version_raises(tmp_path: Path, change: int | None) -> None:
    state = load_checkpoint(save_checkpoint(make_state(1), tmp_path, keep=5))
    if change is None:
        state.pop("version")
    else:
        state["version"] += change
    path = tmp_path / "wrong-version.pt"
    torch.save(state, path)
    with pytest.raises(DvectorError, match="version"):
        load_checkpoint(path)


def test_loaded_checkpoint_records_format_and_version(tmp_path: Path) -> None:
    state = load_checkpoint(save_checkpoint(make_state(1), tmp_path, keep=5))
    assert isinstance(state["format"], str) and state["format"]
    assert isinstance(state["version"], int)
    # a copy re-saved with torch.save (as another tool might) still loads
    path = tmp_path / "copy.pt"
    torch.save(state, path)
    assert_state_equal(load_checkpoint(path), make_state(1))
