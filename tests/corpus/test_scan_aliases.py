"""Scanning roots with symlinks and repeated roots: every audio file is read once (by real path) and
belongs to the speaker folder that holds it by real path; aliases are reported, not read again."""

from __future__ import annotations

import os
from pathlib import Path

from dvector.corpus import scan_roots


def corpus_of_12(base: Path) -> Path:
    """``base/c1``: speakers a, b, c with 4 files each."""
    root = base / "c1"
    for spk in "abc":
        for i in range(4):
            path = root / spk / f"{spk}{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    return root


def by_real_path(scan) -> dict[str, str]:
    """real path -> speaker, asserting each real path appears once."""
    reals = [os.path.realpath(u.path) for u in scan.utterances]
    assert len(reals) == len(set(reals)), "a file was read twice"
    return {r: u.speaker for r, u in zip(reals, scan.utterances)}


def expected(root: Path) -> dict[str, str]:
    real = os.path.realpath(root)
    return {os.path.join(real, spk, f"{spk}{i}.wav"): f"c1/{spk}" for spk in "abc" for i in range(4)}


def test_symlink_to_parent_inside_a_speaker_folder(tmp_path: Path) -> None:
    root = corpus_of_12(tmp_path)
    os.symlink("..", root / "a" / "up")  # a/up -> c1: every other speaker's files again, under "a"
    scan = scan_roots([str(root)], ["wav"])
    assert len(scan.utterances) == 12
    assert by_real_path(scan) == expected(root)
    aliases = [p for p, reason in scan.problems if "alias" in reason]
    assert aliases == [str(root / "a" / "up")]  # reported once, not once per file


def test_symlink_in_a_root_to_the_root_itself(tmp_path: Path) -> None:
    root = corpus_of_12(tmp_path)
    os.symlink(".", root / "self")  # c1/self -> c1: a "speaker" holding every speaker
    os.symlink(root, root / "zz_self")
    scan = scan_roots([str(root)], ["wav"])
    assert len(scan.utterances) == 12 and scan.speakers == ["c1/a", "c1/b", "c1/c"]
    assert by_real_path(scan) == expected(root)
    assert sorted(p for p, reason in scan.problems if "alias" in reason) == [str(root / "self"), str(root / "zz_self")]


def test_the_same_root_given_twice_is_read_once(tmp_path: Path) -> None:
    root = corpus_of_12(tmp_path)
    link = tmp_path / "link_to_c1"
    os.symlink(root, link)
    for given in ([str(root), str(root) + "/"], [str(root), str(link)]):
        scan = scan_roots(given, ["wav"])
        assert len(scan.utterances) == 12
        assert by_real_path(scan) == expected(root)
        assert scan.empty_roots == []
        assert [(p, r) for p, r in scan.problems] == [(given[1], f"the same folder as a root given before it ({given[0]}): read once")]


def test_all_three_at_once_give_12_utterances(tmp_path: Path) -> None:
    """The issue's case: 12 files became 36 utterances under the wrong speakers."""
    root = corpus_of_12(tmp_path)
    os.symlink("..", root / "b" / "up")
    os.symlink(".", root / "self")
    scan = scan_roots([str(root), str(root) + "/"], ["wav"])
    assert len(scan.utterances) == 12
    assert by_real_path(scan) == expected(root)


def test_links_between_speakers_keep_files_with_their_owner(tmp_path: Path) -> None:
    root = corpus_of_12(tmp_path)
    os.symlink(root / "c", root / "a" / "other")  # a/other -> c (a folder of another speaker)
    (root / "c" / "deep").mkdir()
    (root / "c" / "deep" / "d.wav").write_bytes(b"x")
    os.symlink(root / "c" / "deep", root / "a" / "deep_link")  # a subfolder of another speaker
    os.symlink(root / "b" / "b0.wav", root / "a" / "b0_link.wav")  # a file of another speaker
    scan = scan_roots([str(root)], ["wav"])
    owners = by_real_path(scan)
    want = expected(root)
    want[os.path.join(os.path.realpath(root), "c", "deep", "d.wav")] = "c1/c"
    assert owners == want
    assert sorted(Path(p).name for p, r in scan.problems if "alias" in r) == ["b0_link.wav", "deep_link", "other"]


def test_symlinked_roots_speakers_and_files_are_still_followed(tmp_path: Path) -> None:
    store = corpus_of_12(tmp_path / "store")
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "x.wav").write_bytes(b"x")
    root = tmp_path / "recipe"
    root.mkdir()
    os.symlink(store / "a", root / "spk_a")  # a symlinked speaker folder
    os.symlink(store / "b", root / "spk_b")
    (root / "spk_p").mkdir()
    os.symlink(pool / "x.wav", root / "spk_p" / "1.wav")  # a file linked from a pool
    os.symlink(pool / "x.wav", root / "spk_p" / "2.wav")  # the same file twice: read once
    linked_root = tmp_path / "linked_root"
    os.symlink(root, linked_root)
    scan = scan_roots([str(linked_root)], ["wav"])
    assert scan.speakers == ["linked_root/spk_a", "linked_root/spk_b", "linked_root/spk_p"]
    assert len(scan.utterances) == 9
    assert sorted(u.source for u in scan.utterances if u.speaker.endswith("spk_p")) == ["spk_p/1.wav"]
    assert [Path(p).name for p, r in scan.problems if "alias" in r] == ["2.wav"]
