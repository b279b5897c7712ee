"""Embedding: loading models, windows, very short and very long audio, per-window times, many
inputs embedded once each, the .npz with the model's identity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dvector
from dvector.inference.embedder import Embedder, load, window_starts
from dvector.inference.runner import ShapeBuckets
from dvector.inference.embed_inputs import MODEL_KEY, TIMES_PREFIX, embed_paths, load_embeddings, save_embeddings
from dvector.errors import DvectorError
from dvector.signal.features import log_mel
from dvector.demo.synth import random_voice, utterance
from use_helpers import write_wav

RATE = 16000


@pytest.fixture(scope="module")
def voice_audio(tmp_path_factory):  # noqa: ANN001, ANN201
    """A 60 s utterance, a 0.5 s one (fewer frames than a window) and a 100-sample one."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(11)
    voice = random_voice(rng)
    long = write_wav(folder / "long.wav", utterance(voice, 60.0, RATE, rng))
    short = write_wav(folder / "short.wav", utterance(voice, 0.5, RATE, rng, edge_silence_s=(0.02, 0.05)))
    tiny = write_wav(folder / "tiny.wav", utterance(voice, 0.5, RATE, rng)[:100])
    return folder, long, short, tiny


def unit(v: np.ndarray) -> bool:
    return bool(np.isclose(np.linalg.norm(v), 1.0, atol=1e-5))


def reference_embedding(embedder: Embedder, mel: np.ndarray) -> np.ndarray:
    """The definition, written out: windows of L, hop L//2 (+ one ending at T), model, mean, normalise."""
    L, T = embedder.seg_len, mel.shape[0]
    x = torch.from_numpy(mel)
    with torch.no_grad():
        if T <= L:
            vectors = embedder.model(x[None])
        else:
            starts = list(range(0, T - L + 1, L // 2))
            if starts[-1] + L < T:
                starts.append(T - L)
            vectors = torch.cat([embedder.model(x[s:s + L][None]) for s in starts])
    return F.normalize(vectors.mean(0), dim=0).numpy()


# ---- windows ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("T, L, expected", [
    (1, 100, [0]), (99, 100, [0]), (100, 100, [0]), (101, 100, [0, 1]), (150, 100, [0, 50]),
    (151, 100, [0, 50, 51]), (200, 100, [0, 50, 100]), (7, 3, [0, 1, 2, 3, 4]), (8, 3, [0, 1, 2, 3, 4, 5]),
])
def test_window_starts(T: int, L: int, expected: list[int]) -> None:
    assert window_starts(T, L) == expected


def test_window_starts_cover_everything() -> None:
    for L in (1, 2, 5, 40, 160):
        for T in range(1, 3 * L + 7):
            starts = window_starts(T, L)
            covered = np.zeros(T, bool)
            for s in starts:
                covered[s:s + L] = True
                assert s + min(T, L) <= T
            assert covered.all() and starts == sorted(set(starts))
            assert T <= L or starts[-1] + L == T


def test_window_code_is_the_exports() -> None:
    import dvector.inference.embedder as embed_module
    import dvector.export.torchscript as export_module
    import dvector.signal.windows as windows

    assert embed_module.window_starts is windows.window_starts
    assert embed_module.embed_windows is windows.embed_windows is export_module.embed_windows


def test_shape_buckets_change_nothing(embedder: Embedder) -> None:
    torch.manual_seed(0)
    buckets = ShapeBuckets(embedder.model, embedder.seg_len)
    with torch.no_grad():
        for B, T in ((1, 37), (3, 100), (5, 100), (1, 100)):
            x = torch.randn(B, T, 40)
            torch.testing.assert_close(buckets(x), embedder.model(x), atol=1e-6, rtol=1e-5)


# ---- loading ---------------------------------------------------------------------------------------

def test_load_forms(trained, embedder: Embedder) -> None:  # noqa: ANN001
    assert dvector.load is load
    best = trained.run / "checkpoints" / "best.pt"
    assert embedder.info["path"] == str(best) and embedder.info["step"] == 5
    assert embedder.info["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert embedder.seg_len == 100 and embedder.dim == 64 and embedder.sample_rate == RATE
    latest = load(trained.run / "checkpoints" / "latest.pt")
    assert latest.info["path"].endswith("latest.pt")
    v = trained.files[0]
    np.testing.assert_allclose(latest.embed(v), embedder.embed(v), atol=1e-6)
    with pytest.raises(DvectorError, match="does not exist"):
        load(trained.run / "nothing")


def test_load_exported_bundle(trained, embedder: Embedder, tmp_path: Path) -> None:  # noqa: ANN001
    export = pytest.importorskip("dvector.export.torchscript")
    out = tmp_path / "exported"
    export.export_model(trained.run, out)
    bundle = load(out, threads=1)
    assert bundle.info["kind"] == "export" and bundle.info["step"] == 5 and bundle.scripted is not None
    assert load(out / "dvector.pt").info["kind"] == "export"
    for path in trained.files[:3]:
        a, b = bundle.embed(path), embedder.embed(path)
        assert unit(a) and float(a @ b) > 0.999
    np.testing.assert_allclose(bundle.per_window(trained.files[0]).vectors,
                               embedder.per_window(trained.files[0]).vectors, atol=1e-4)


# ---- one utterance ---------------------------------------------------------------------------------

def test_embed_file_and_waveform_agree(trained, embedder: Embedder) -> None:  # noqa: ANN001
    import soundfile as sf

    path = trained.files[3]
    v = embedder.embed(path)
    assert v.shape == (64,) and v.dtype == np.float32 and unit(v)
    wav, rate = sf.read(str(path), dtype="float32")
    np.testing.assert_allclose(embedder.embed((wav, rate)), v, atol=1e-6)
    np.testing.assert_allclose(embedder((torch.from_numpy(wav), rate)), v, atol=1e-6)
    # stereo, either layout, averages to the same mono
    stereo = np.stack([wav, wav], axis=1)
    np.testing.assert_allclose(embedder.embed((stereo, rate)), v, atol=1e-6)
    np.testing.assert_allclose(embedder.embed((stereo.T, rate)), v, atol=1e-6)
    # another sample rate is resampled back: close, not equal
    import soxr

    v44 = embedder.embed((soxr.resample(wav, rate, 44100), 44100))
    assert unit(v44) and float(v44 @ v) > 0.99
    # the definition, written out
    np.testing.assert_allclose(v, reference_embedding(embedder, embedder.mel(path)), atol=1e-5)


def test_very_long_file_uses_many_windows(embedder: Embedder, voice_audio) -> None:  # noqa: ANN001
    _, long, _, _ = voice_audio
    mel = embedder.mel(long)
    T, L = mel.shape[0], embedder.seg_len
    assert len(window_starts(T, L)) >= 60  # tens of seconds of speech at 0.5 s hop
    calls = []
    original = embedder.runner.forward

    def counting(mels, lengths=None):  # noqa: ANN001, ANN202
        calls.append(mels.shape[0])
        return original(mels, lengths)

    embedder.runner.forward = counting
    try:
        v = embedder.embed(long)
    finally:
        del embedder.runner.forward
    assert sum(calls) == len(window_starts(T, L)) and len(calls) <= 2  # batched, not one call per window
    assert unit(v)
    np.testing.assert_allclose(v, reference_embedding(embedder, mel), atol=1e-5)


def test_shorter_than_a_window_is_one_window(embedder: Embedder, voice_audio) -> None:  # noqa: ANN001
    _, _, short, _ = voice_audio
    mel = embedder.mel(short)
    assert 1 <= mel.shape[0] < embedder.seg_len
    v = embedder.embed(short)
    assert unit(v)
    with torch.no_grad():
        whole = embedder.model(torch.from_numpy(mel)[None])[0].numpy()
    np.testing.assert_allclose(v, whole, atol=1e-5)


def test_shorter_than_one_frame_is_an_error(embedder: Embedder, voice_audio) -> None:  # noqa: ANN001
    _, _, _, tiny = voice_audio
    for call in (embedder.embed, embedder.per_window):
        with pytest.raises(DvectorError, match="too short") as err:
            call(tiny)
        assert "tiny.wav" in str(err.value)
    with pytest.raises(DvectorError, match="too short"):
        embedder.embed((np.zeros(50, np.float32), RATE))


def test_silence_embeds_the_whole_audio(embedder: Embedder) -> None:
    rng = np.random.default_rng(0)
    noise = (1e-4 * rng.standard_normal(RATE)).astype(np.float32)
    v = embedder.embed((noise, RATE))  # the VAD finds no speech: like the export, embed it all
    assert unit(v)
    np.testing.assert_allclose(v, reference_embedding(embedder, log_mel(noise, embedder.features)), atol=1e-5)


def test_bad_inputs(embedder: Embedder, tmp_path: Path) -> None:
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt garbage")
    with pytest.raises(DvectorError, match="broken.wav"):
        embedder.embed(broken)
    with pytest.raises(DvectorError, match="no such file"):
        embedder.embed(tmp_path / "missing.wav")
    with pytest.raises(DvectorError, match="NaN"):
        embedder.embed((np.full(RATE, np.nan, np.float32), RATE))
    with pytest.raises(DvectorError, match="mel must be"):
        embedder.embed_mel(np.zeros((10, 7), np.float32))


def test_per_window_times(embedder: Embedder, voice_audio) -> None:  # noqa: ANN001
    _, long, short, _ = voice_audio
    import soundfile as sf

    duration = sf.info(str(long)).frames / RATE
    vectors, starts, ends = embedder.per_window(long)  # unpacks
    L, hop_s = embedder.seg_len, embedder.features.hop_length / RATE
    T = 1 + sf.info(str(long)).frames // embedder.features.hop_length  # no VAD: every frame
    assert len(vectors) == len(starts) == len(ends) == len(window_starts(T, L))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert starts[0] == 0.0 and np.allclose(np.diff(starts[:-1]), (L // 2) * hop_s)
    assert np.allclose((ends - starts)[:-1], L * hop_s) and ends[-1] == pytest.approx(duration, abs=hop_s)
    assert np.all(ends <= duration + 1e-9)
    # window k is the network on frames [s, s + L) of the untrimmed audio
    mel = torch.from_numpy(log_mel(embedder.waveform(long), embedder.features))
    k = 7
    s = int(round(starts[k] / hop_s))
    with torch.no_grad():
        np.testing.assert_allclose(vectors[k], embedder.model(mel[s:s + L][None])[0].numpy(), atol=1e-5)
    # shorter than a window: one window over all of it
    w = embedder.per_window(short)
    assert len(w.vectors) == 1 and w.starts_s[0] == 0 and w.ends_s[0] == pytest.approx(sf.info(str(short)).duration)


# ---- many inputs -----------------------------------------------------------------------------------

def test_embed_paths_each_file_once_and_skips_in_folders(trained, embedder: Embedder, tmp_path: Path,  # noqa: ANN001
                                                        monkeypatch) -> None:  # noqa: ANN001
    folder = trained.root / "spk000"
    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "broken.wav").write_bytes(b"not audio at all")
    (extra / "notes.txt").write_text("ignored: not an audio extension")
    calls = []
    original = Embedder.embed

    def counting(self, source):  # noqa: ANN001, ANN202
        calls.append(str(source))
        return original(self, source)

    monkeypatch.setattr(Embedder, "embed", counting)
    direct = trained.files[0]  # also inside the folder
    result = embed_paths(embedder, [str(direct), str(folder), str(extra)])
    assert len(calls) == len(set(calls)) == 8 + 1  # 8 files once each, and the broken one tried once
    assert len(result.vectors) == 8 and result.duplicates == 1
    assert str(direct) in result.vectors
    assert result.skipped and result.skipped[0][0].endswith("broken.wav")
    # a broken file named directly is an error naming it
    with pytest.raises(DvectorError, match="broken.wav"):
        embed_paths(embedder, [str(extra / "broken.wav")])
    with pytest.raises(DvectorError, match="no such file"):
        embed_paths(embedder, [str(tmp_path / "nope")])


def test_npz_records_the_model(trained, embedder: Embedder, tmp_path: Path) -> None:  # noqa: ANN001
    folder = trained.root / "spk001"
    result = embed_paths(embedder, [str(folder)])
    out = save_embeddings(tmp_path / "emb", result, embedder)
    assert out.name == "emb.npz"
    vectors, info, times = load_embeddings(out)
    assert set(vectors) == {str(folder / f"utt{u:03d}.flac") for u in range(8)} and not times
    for key, v in vectors.items():
        np.testing.assert_allclose(v, embedder.embed(key), atol=1e-6)
    best = trained.run / "checkpoints" / "best.pt"
    assert info["path"] == str(best) and info["step"] == 5 and info["kind"] == "checkpoint"
    assert info["sha256"] == hashlib.sha256(best.read_bytes()).hexdigest() and info["per_window"] is False
    with np.load(out, allow_pickle=False) as z:
        assert json.loads(str(z[MODEL_KEY]))["sha256"] == info["sha256"]
    # per window: vectors (K, D) and times (K, 2)
    windows = embed_paths(embedder, [str(folder)], per_window=True)
    vectors, info, times = load_embeddings(save_embeddings(tmp_path / "win.npz", windows, embedder))
    assert info["per_window"] is True and set(times) == set(vectors)
    key = next(iter(vectors))
    assert vectors[key].ndim == 2 and times[key].shape == (len(vectors[key]), 2)
    with np.load(tmp_path / "win.npz") as z:
        assert TIMES_PREFIX + key in z.files
    with pytest.raises(DvectorError, match="nothing was embedded"):
        save_embeddings(tmp_path / "none.npz", type(result)(), embedder)


def test_embed_shards(trained, embedder: Embedder) -> None:  # noqa: ANN001
    result = embed_paths(embedder, [str(trained.shards)])
    assert len(result.vectors) == len(trained.files) and not result.skipped
    key = f"corpus/{Path(trained.files[0]).relative_to(trained.root)}"
    assert key in result.vectors and unit(result.vectors[key])
    # stored float16 mels after the same VAD: close to embedding the file
    assert float(result.vectors[key] @ embedder.embed(trained.files[0])) > 0.999
    with pytest.raises(DvectorError, match="per-window"):
        embed_paths(embedder, [str(trained.shards)], per_window=True)
