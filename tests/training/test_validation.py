"""Validation shards are read like training shards: damage is skipped with a warning naming it.

Bad JSON, an object ``.npy``, a shard the index lists but that is missing, a 404, a sample of
another mel width or with non-finite values: each is skipped with a warning naming the shard (and
the sample), and validation goes on with what is left; only too little left is an error, one line.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dvector.config import AugmentConfig, ModelConfig, TrainConfig
from dvector.errors import DvectorError
from dvector.files import write_json_atomic
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name
from dvector.stream import resolve_shards
from dvector.stream.samples import SampleStream
from dvector.stream.sources import Consumer
from dvector.stream.validation_samples import ReadReport, good_samples
from dvector.training.checkpoint import load_checkpoint
from dvector.training.loop import train
from dvector.training.validation import collect_validation
from stream_helpers import serve
from train_helpers import session_shards

N_MELS = 40  # as the session's training shards
SPEAKERS, PER_SPEAKER, N_SHARDS = 6, 8, 4
COUNTS = hasattr(SampleStream([], Consumer(), 0), "bad_samples")  # the stream counts what it skips


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def make_valid_set(folder: Path, damage: dict[tuple[int, int], str] | None = None,
                   missing: tuple[int, ...] = ()) -> Path:
    """6 speakers x 8 utterances over 4 shards (utterance u in shard u % 4), with an index.

    ``damage`` maps (speaker, utterance) to "json" (not JSON), "object" (an object .npy),
    "width" (another mel width) or "nan" (a NaN frame); ``missing`` shards are listed, not written.
    """
    damage = damage or {}
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(N_SHARDS):
        members = []
        speakers = set()
        for s in range(SPEAKERS):
            for u in range(k, PER_SPEAKER, N_SHARDS):
                key, kind = f"v{s:02d}_{u:02d}", damage.get((s, u))
                mel = rng.standard_normal((30, N_MELS if kind != "width" else N_MELS + 1)).astype(np.float16)
                if kind == "nan":
                    mel[3, 2] = np.nan
                meta = json.dumps({"speaker": f"v/{s}", "speaker_index": s}).encode()
                mel_bytes = npy(np.array([{"x": 1}], dtype=object), allow_pickle=True) if kind == "object" else npy(mel)
                members += [(f"{key}.json", b"{not json" if kind == "json" else meta), (f"{key}.mel.npy", mel_bytes)]
                speakers.add(s)
        if k not in missing:
            write_tar(folder / shard_name(k), members)
        shards.append({"name": shard_name(k), "samples": len(members) // 2, "speakers": sorted(speakers)})
    write_json_atomic(folder / INDEX_NAME, {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": {"features": {"n_mels": N_MELS}},
        "speakers": [{"id": f"v/{s}", "index": s, "utterances": PER_SPEAKER} for s in range(SPEAKERS)],
        "shards": shards, "failures": []})
    return folder


def collect(source: str, speakers: list[int] | None = None, per_speaker: int = 8):
    """collect_validation as training calls it, and the warnings it gave."""
    found = resolve_shards(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = collect_validation(found.urls, found.index, speakers, per_speaker, 20)
    return data, [str(w.message) for w in caught]


def per_speaker_counts(data) -> dict[int, int]:
    return {int(s): int((data.speakers == s).sum()) for s in np.unique(data.speakers)}


def test_an_undamaged_set_gives_every_utterance(tmp_path):
    data, messages = collect(str(make_valid_set(tmp_path / "v")))
    assert per_speaker_counts(data) == {s: PER_SPEAKER for s in range(SPEAKERS)}
    assert data.mels.shape == (SPEAKERS * PER_SPEAKER, 20, N_MELS) and not messages


def test_bad_json_an_object_npy_and_a_missing_shard_are_skipped_and_named(tmp_path):
    folder = make_valid_set(tmp_path / "v", damage={(0, 0): "json", (1, 1): "object"}, missing=(2,))
    data, messages = collect(str(folder))
    counts = per_speaker_counts(data)
    # shard 2 (utterances 2 and 6 of every speaker) is gone, and one sample each of speakers 0 and 1
    assert counts == {0: 5, 1: 5, 2: 6, 3: 6, 4: 6, 5: 6}
    text = "\n".join(messages)
    assert "shard-000000.tar" in text and "v00_00" in text, text
    assert "shard-000001.tar" in text and "v01_01" in text and "object" in text, text
    assert "shard-000002.tar" in text, text


def test_held_out_speakers_are_read_past_damage(tmp_path):
    folder = make_valid_set(tmp_path / "v", damage={(3, 0): "json"}, missing=(1,))
    data, messages = collect(str(folder), speakers=[3, 4], per_speaker=4)
    assert per_speaker_counts(data) == {3: 4, 4: 4}, "utterances of the later shards stand in"
    assert any("shard-000001.tar" in m for m in messages) and any("v03_00" in m for m in messages)


def test_another_mel_width_or_non_finite_values_are_skipped_not_a_crash(tmp_path):
    folder = make_valid_set(tmp_path / "v", damage={(2, 0): "width", (4, 5): "nan"})
    data, messages = collect(str(folder))
    assert per_speaker_counts(data)[2] == PER_SPEAKER - 1 and per_speaker_counts(data)[4] == PER_SPEAKER - 1
    assert torch.isfinite(data.mels).all() and data.mels.shape[2] == N_MELS
    assert any("v02_00" in m for m in messages) and any("v04_05" in m for m in messages)


def test_too_little_left_is_one_clear_error(tmp_path):
    damage = {(s, u): "json" for s in range(SPEAKERS) for u in range(PER_SPEAKER) if s > 0 or u > 0}
    folder = make_valid_set(tmp_path / "v", damage=damage, missing=(3,))
    with pytest.raises(DvectorError) as caught:
        collect(str(folder))
    message = str(caught.value)
    assert message.startswith("validation needs at least 2 speakers with 2+ utterances each") and "\n" not in message
    if COUNTS:
        assert "broken, missing or unreachable shard" in message and "bad samples" in message


def test_good_samples_counts_what_it_skips(tmp_path):
    folder = make_valid_set(tmp_path / "v", damage={(0, 0): "json", (5, 1): "object"}, missing=(2,))
    urls = resolve_shards(str(folder)).urls
    report = ReadReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys = [s["__key__"] for s in good_samples(urls, report)]
    assert len(keys) == len(set(keys)) == SPEAKERS * PER_SPEAKER - SPEAKERS * 2 - 2
    if COUNTS:
        assert (report.bad_samples, report.bad_shards) == (2, 1)
        assert report.describe() == "2 bad samples and 1 broken, missing or unreachable shard skipped"


# ---- over http ------------------------------------------------------------------------------------


def log_message(self, *args) -> None:
        pass




def test_a_404_in_the_validation_shards_is_skipped_and_named(tmp_path):
    folder = make_valid_set(tmp_path / "v", damage={(1, 0): "object"}, missing=(3,))
    with serve(folder) as base:
        data, messages = collect(base + "/")
    counts = per_speaker_counts(data)
    assert counts[1] == 5 and counts[0] == 6, counts  # utterances 3 and 7 were in the missing shard
    assert any("shard-000003.tar" in m for m in messages), messages


# ---- training starts with damaged validation shards -------------------------------------------------


def test_training_starts_and_validates_with_damaged_validation_shards(tmp_path, tmp_path_factory):
    shards = session_shards(tmp_path_factory)
    folder = make_valid_set(tmp_path / "v", damage={(0, 0): "json", (1, 1): "object", (2, 2): "width"},
                            missing=(3,))
    cfg = TrainConfig(steps=2, save_every=2, valid_every=2, log_every=1, n_speakers=4, n_utterances=4,
                      seg_len=(20, 20), workers=0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(str(shards), tmp_path / "run", cfg, ModelConfig.preset("tiny"), valid=str(folder),
                           say=lambda message: None)
    finally:
        torch.set_num_threads(before)
    assert result.final_step == 2 and result.best_eer is not None
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    text = "\n".join(str(w.message) for w in caught)
    assert "shard-000003.tar" in text and "v00_00" in text and "v01_01" in text and "v02_02" in text


def test_a_whole_validation_set_missing_is_one_clear_error_at_start(tmp_path, tmp_path_factory):
    shards = session_shards(tmp_path_factory)
    folder = make_valid_set(tmp_path / "v", missing=(0, 1, 2, 3))
    cfg = replace(TrainConfig(), steps=2, n_speakers=4, n_utterances=4, seg_len=(20, 20), workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DvectorError, match="validation needs at least 2 speakers"):
            train(str(shards), tmp_path / "run", cfg, ModelConfig.preset("tiny"), valid=str(folder),
                  say=lambda message: None)


def test_damage_in_validation_shards_is_counted_once_in_the_checkpoint(shards: Path, tmp_path: Path) -> None:
    """A --valid set with two bad samples (non-finite mels): the run's counters say 2 under "validation",
    read anew (not added up) when the run is continued."""
    from dvector.shards.format import write_shard
    from dvector.shards.reader import iter_shard

    good = [s for s in iter_shard(str(sorted(shards.glob("*.tar"))[0]))]
    samples = [(s["__key__"], s["mel"], {k: s[k] for k in ("speaker", "speaker_index", "source", "n_frames")})
               for s in good]
    for n in range(2):
        bad = samples[n][1].copy()
        bad[0, 0] = np.inf
        samples.append((f"zz_bad{n}", bad, dict(samples[n][2])))
    valid = tmp_path / "valid"
    valid.mkdir()
    write_shard(valid / shard_name(0), samples)
    cfg = TrainConfig(steps=2, valid_every=1, log_every=1, n_speakers=4, n_utterances=4, seg_len=(40, 40),
                      workers=0, augment=AugmentConfig(kinds=()))
    valid = str(valid / shard_name(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(str(shards), tmp_path / "run", cfg, ModelConfig.preset("tiny"), valid=str(valid), say=lambda _: None)
        assert result.counters["validation"] == {"bad_samples": 2, "bad_shards": 0}
        train(str(shards), tmp_path / "run", replace(cfg, steps=4), ModelConfig.preset("tiny"), valid=str(valid),
              resume=tmp_path / "run", say=lambda _: None)
    assert load_checkpoint(tmp_path / "run")["counters"]["validation"] == {"bad_samples": 2, "bad_shards": 0}
