"""Faults met when embedding: non-UTF-8 file names as .npz keys, an .npz that cannot be written,
audio that gives non-finite features, and audio of an absurd rate."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from dvector.demo.synth import random_voice, utterance
from dvector.errors import DvectorError
from dvector.inference.embed_inputs import (MODEL_KEY, EmbedResult, embed_paths, key_of, load_embeddings, member_name,
                                            save_embeddings)
from dvector.inference.embedder import EmbedError
from use_helpers import write_wav

RATE = 16000


# ---- .npz keys: stored losslessly ------------------------------------------------------------------

@pytest.mark.parametrize("key", ["spk/a.wav", os.fsdecode(b"spk/\xff\xfe.wav"), "__model__", "__times__/x",
                                 "__fs__/41", "[/b].wav", "caf\u00e9/\u00e9t\u00e9.flac"])
def test_member_names_round_trip(key: str) -> None:
    member = member_name(key)
    member.encode("utf-8")  # a zip member name must be valid UTF-8
    assert key_of(member) == key
    assert member == key or member.startswith("__fs__/")


def test_non_utf8_file_names_are_stored_and_read_back(trained, embedder, tmp_path: Path) -> None:  # noqa: ANN001
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"\xff\xfe.flac")
    shutil.copy(trained.files[0], odd)
    shutil.copy(trained.files[1], folder / "plain.flac")
    shutil.copy(trained.files[2], folder / "__model__.flac")
    result = embed_paths(embedder, [str(folder)], ["flac"])
    expected = {os.path.join(str(folder), name) for name in (os.fsdecode(b"\xff\xfe.flac"), "plain.flac",
                                                              "__model__.flac")}
    assert set(result.vectors) == expected
    out = save_embeddings(tmp_path / "emb.npz", result, embedder)
    vectors, info, times = load_embeddings(out)
    assert set(vectors) == expected and not times and info["step"] == 5
    for key in expected:
        np.testing.assert_array_equal(vectors[key], result.vectors[key].astype(np.float32))
    with np.load(out) as z:
        assert MODEL_KEY in z.files and all(name.isprintable() for name in z.files)

    windows = embed_paths(embedder, [os.fsdecode(odd)], per_window=True)
    vectors, _, times = load_embeddings(save_embeddings(tmp_path / "win.npz", windows, embedder))
    assert set(vectors) == set(times) == {os.path.normpath(os.fsdecode(odd))}


def test_an_unwritable_npz_is_one_clear_error(embedder, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    def refuse(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(np, "savez", refuse)
    result = EmbedResult(vectors={"a": np.ones(embedder.dim, dtype=np.float32)})
    with pytest.raises(DvectorError, match="cannot write .*out.npz: Read-only file system"):
        save_embeddings(tmp_path / "out.npz", result, embedder)
    assert list(tmp_path.iterdir()) == []


# ---- non-finite features ---------------------------------------------------------------------------

def test_huge_amplitude_audio_is_an_embed_error_not_a_nan_vector(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    rng = np.random.default_rng(6)
    wav = utterance(random_voice(rng), 1.5, RATE, rng)
    huge = tmp_path / "folder" / "huge.wav"
    huge.parent.mkdir()
    sf.write(huge, (wav * 1e20).astype(np.float32), RATE, subtype="FLOAT")
    write_wav(tmp_path / "folder" / "fine.wav", wav)
    for embed in (embedder.embed, embedder.per_window):
        with pytest.raises(EmbedError, match="non-finite features"):
            embed(huge)
    result = embed_paths(embedder, [str(huge.parent)])
    assert list(result.vectors) == [str(tmp_path / "folder" / "fine.wav")]
    assert [(Path(k).name, r.split(":")[0]) for k, r in result.skipped] == [("huge.wav", "non-finite features")]
    assert all(np.all(np.isfinite(v)) for v in result.vectors.values())


# ---- resource bounds -------------------------------------------------------------------------------

def test_embedding_audio_of_an_absurd_rate_is_refused(embedder, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(EmbedError, match="the waveform: sample rate 1 Hz is outside"):
        embedder.embed((np.zeros(4000, np.float32), 1))
    one_hz = tmp_path / "folder" / "one_hz.wav"
    one_hz.parent.mkdir()
    sf.write(one_hz, np.zeros(4000, np.int16), 1, subtype="PCM_16")  # 8 KB claiming 4000 s
    with pytest.raises(EmbedError, match="sample rate 1 Hz"):
        embedder.embed(one_hz)
    result = embed_paths(embedder, [str(one_hz.parent)])
    assert not result.vectors and [r.split(" is ")[0] for _, r in result.skipped] == ["sample rate 1 Hz"]
