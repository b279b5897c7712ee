"""Tests for dvector.export.torchscript: the torch twins of log-mel and the VAD against the package's numpy and
numba code, the shared windowing, the scripted module against the eager path, and the exported
bundle loaded in a Python where dvector cannot be imported.

Tolerances (measured values in parentheses, on the synthetic speech below):
- VAD: keep masks and trimmed samples identical (exact float32 arithmetic on both sides);
- log-mel: max abs difference < 1e-3 nats on speech and noise (measured <= 2.2e-4 over 40 synthetic
  utterances with noise from -70 to -25 dBFS, typically 2e-5; the two float32 FFTs round differently);
- scripted module vs eager module: cosine > 0.9999 (measured 1 - 1e-7);
- exported bundle (subprocess, no dvector) vs the package path (numpy VAD + numpy log-mel +
  windows): cosine > 0.999 and max abs difference < 1e-3 (measured about 1e-7 and 1e-7).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvector.config import VERSION as __version__
from dvector.training.checkpoint import save_checkpoint
from dvector.config import FeatureConfig, ModelConfig, TrainConfig, VadConfig
from dvector.inference.bundle import find_checkpoint, load_exported
from dvector.export.torchscript import EmbeddingModule, export_model, script_module
from dvector.signal.torch_frontend import TorchLogMel, TorchVad, dilate, keep_pauses, remove_short_runs
from dvector.signal.windows import embed_windows, window_batch, window_embeddings, window_starts
from dvector.signal.features import log_mel, min_samples
from dvector.nn.model import DVector
from dvector.signal.process import SkipUtterance, waveform_to_mel
from dvector.demo.synth import random_voice, utterance
from dvector.signal.vad import dilate as nb_dilate
from dvector.signal.vad import frame_energy_db, keep_mask, speech_frames, track_noise_floor, trim_silence
from dvector.signal.vad import remove_short_runs as nb_remove_short_runs

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]

SR = 16000
FEATURES = FeatureConfig()
VAD = VadConfig()
LOG_MEL_TOL = 1e-3


def speech_samples(seed: int, duration_s: float, noise_db: float = -45.0, sample_rate: int = SR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return utterance(random_voice(rng), duration_s, sample_rate, rng, noise_db=noise_db)


def edge_signals() -> dict[str, np.ndarray]:
    """Awkward inputs for the VAD: silence, constants, clicks, partial frames, level steps, drifting noise."""
    rng = np.random.default_rng(7)
    t = np.arange(3 * SR) / SR
    step = np.concatenate([0.001 * rng.standard_normal(SR), 0.3 * rng.standard_normal(SR // 2),
                           0.001 * rng.standard_normal(SR)]).astype(np.float32)
    click = np.zeros(SR, np.float32)
    click[8000] = 0.9
    bursts = (0.0005 * rng.standard_normal(2 * SR)).astype(np.float32)
    for start in (1000, 3000, 9000, 9600, 20000):  # 10-60 ms bursts, some shorter than min_speech
        bursts[start:start + int(rng.integers(160, 960))] += 0.2 * rng.standard_normal(1).astype(np.float32)
    return {
        "zeros": np.zeros(SR, np.float32),
        "one_sample": np.array([0.5], np.float32),
        "partial_frame": (0.1 * rng.standard_normal(250)).astype(np.float32),
        "dc": np.full(4000, 0.25, np.float32),
        "white_noise": (0.1 * rng.standard_normal(2 * SR + 37)).astype(np.float32),
        "quiet_noise": (1e-4 * rng.standard_normal(SR)).astype(np.float32),
        "rising_noise": (rng.standard_normal(t.size) * 10 ** (-3 + 2 * t / t[-1])).astype(np.float32),
        "tone": (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        "level_step": step,
        "click": click,
        "bursts": bursts,
        "speech_loud_noise": speech_samples(3, 3.0, noise_db=-20.0),
        "speech_long_pauses": np.concatenate([speech_samples(4, 1.5), np.zeros(SR, np.float32),
                                              speech_samples(5, 1.2)]),
    }


# ---- log-mel ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [FEATURES, FeatureConfig(n_fft=512), FeatureConfig(sample_rate=8000, n_mels=24),
                                 FeatureConfig(win_ms=32, hop_ms=16, f_min=0, f_max=7000, n_mels=64)],
                         ids=["default", "n_fft512", "8k", "other"])
def test_log_mel_matches_numpy(cfg: FeatureConfig) -> None:
    torch_mel = TorchLogMel(cfg)
    signals = [speech_samples(1, 2.5, sample_rate=cfg.sample_rate), speech_samples(2, 1.0, noise_db=-30,
               sample_rate=cfg.sample_rate), (0.05 * np.random.default_rng(0).standard_normal(12345)).astype(np.float32),
               np.zeros(cfg.sample_rate // 2, np.float32),
               (0.1 * np.random.default_rng(1).standard_normal(min_samples(cfg))).astype(np.float32)]
    worst = 0.0
    for wav in signals:
        ref = log_mel(wav, cfg)
        got = torch_mel(torch.from_numpy(wav)).numpy()
        assert got.dtype == np.float32 and got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst < LOG_MEL_TOL, f"log-mel differs by {worst}"


def test_log_mel_uses_the_same_filterbank_and_window() -> None:
    from dvector.signal.features import analysis_window, mel_filterbank
    m = TorchLogMel(FEATURES)
    assert np.array_equal(m.filterbank.numpy(), mel_filterbank(FEATURES))
    assert np.array_equal(m.window.numpy(), analysis_window(FEATURES))


# ---- VAD ----------------------------------------------------------------------------------------


def assert_same_vad(wav: np.ndarray, cfg: VadConfig = VAD, sample_rate: int = SR) -> None:
    tvad = TorchVad(cfg, sample_rate)
    ref_mask, frame_len = speech_frames(wav, sample_rate, cfg)
    assert tvad.frame_len == frame_len
    got_mask = tvad.keep_mask(torch.from_numpy(wav)).numpy()
    assert np.array_equal(got_mask, ref_mask), f"masks differ at frames {np.flatnonzero(got_mask != ref_mask)[:10]}"
    ref, _ = trim_silence(wav, sample_rate, cfg)
    got = tvad(torch.from_numpy(wav)).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, ref)


@pytest.mark.parametrize("seed,duration,noise_db", [(0, 1.0, -45.0), (1, 3.0, -45.0), (2, 6.0, -35.0), (3, 2.0, -60.0)])
def test_vad_matches_numba_on_speech(seed: int, duration: float, noise_db: float) -> None:
    assert_same_vad(speech_samples(seed, duration, noise_db))


@pytest.mark.parametrize("name", sorted(edge_signals()))
def test_vad_matches_numba_on_edge_cases(name: str) -> None:
    assert_same_vad(edge_signals()[name])


@pytest.mark.parametrize("cfg", [
    VadConfig(max_pause_ms=0, preroll_ms=0, hangover_ms=0, min_speech_ms=0),
    VadConfig(frame_ms=20, threshold_db=6, min_level_db=-70, floor_rise_db_per_s=30),
    VadConfig(frame_ms=7.3, max_pause_ms=1000, min_speech_ms=200),
    VadConfig(enabled=False),
], ids=["no_padding", "frame20", "odd_frame", "disabled"])
def test_vad_matches_numba_with_other_settings(cfg: VadConfig) -> None:
    for wav in (speech_samples(10, 3.0), edge_signals()["bursts"], edge_signals()["level_step"]):
        assert_same_vad(wav, cfg)


def test_vad_empty_input() -> None:
    tvad = TorchVad(VAD, SR)
    assert tvad.keep_mask(torch.zeros(0)).shape == (0,)
    assert tvad(torch.zeros(0)).shape == (0,)


@st.composite
def piecewise_audio(draw: st.DrawFn) -> np.ndarray:
    """Segments of noise at random levels: speech-like bursts, pauses and level changes."""
    seed = draw(st.integers(0, 2**32 - 1))
    levels = draw(st.lists(st.floats(-90, 0), min_size=1, max_size=12))
    lengths = draw(st.lists(st.integers(1, 4000), min_size=len(levels), max_size=len(levels)))
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal(n) * 10 ** (db / 20) for n, db in zip(lengths, levels)]
    return np.clip(np.concatenate(parts), -1, 1).astype(np.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wav=piecewise_audio())
def test_vad_matches_numba_property(wav: np.ndarray) -> None:
    assert_same_vad(wav)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-100, 20, width=32), min_size=1, max_size=300),
       rise=st.floats(0, 2, width=32))
def test_percentile_and_noise_floor_are_numpy_exact(values: list[float], rise: float) -> None:
    energy = np.asarray(values, dtype=np.float32)
    tvad = TorchVad(VadConfig(floor_rise_db_per_s=rise * 100), SR)  # 10 ms frames: rise dB per frame
    initial = np.float32(float(np.percentile(energy, 10.0)))
    got_initial = tvad.initial_floor(torch.from_numpy(energy))
    assert got_initial.dtype == torch.float32 and np.float32(got_initial.item()) == initial
    ref_floor = track_noise_floor(energy, initial, np.float32(tvad.rise_db))
    got_floor = tvad.noise_floor(torch.from_numpy(energy), got_initial).numpy()
    assert np.array_equal(got_floor, ref_floor)


@settings(max_examples=100, deadline=None)
@given(bits=st.lists(st.booleans(), max_size=200), a=st.integers(0, 12), b=st.integers(0, 12), c=st.integers(0, 12))
def test_mask_kernels_match_numba(bits: list[bool], a: int, b: int, c: int) -> None:
    mask = np.asarray(bits, dtype=np.bool_)
    t = torch.from_numpy(mask)
    assert np.array_equal(remove_short_runs(t, max(1, a)).numpy(), nb_remove_short_runs(mask, max(1, a)))
    assert np.array_equal(dilate(t, b, c).numpy(), nb_dilate(mask, b, c))
    assert np.array_equal(keep_pauses(t, a).numpy(), keep_mask(mask, a))


def test_frame_energy_matches_numba() -> None:
    rng = np.random.default_rng(3)
    tvad = TorchVad(VAD, SR)
    for n in (1, 159, 160, 161, 16000, 23457):
        wav = (rng.standard_normal(n) * 10 ** rng.uniform(-5, 0)).astype(np.float32)
        assert np.array_equal(tvad.frame_energy_db(torch.from_numpy(wav)).numpy(), frame_energy_db(wav, 160))


# ---- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,L,expected", [
    (1, 160, [0]), (100, 160, [0]), (160, 160, [0]), (161, 160, [0, 1]), (240, 160, [0, 80]),
    (241, 160, [0, 80, 81]), (320, 160, [0, 80, 160]), (400, 160, [0, 80, 160, 240]),
    (10, 4, [0, 2, 4, 6]), (9, 5, [0, 2, 4]), (10, 5, [0, 2, 4, 5]), (3, 1, [0, 1, 2]),
])
def test_window_starts(T: int, L: int, expected: list[int]) -> None:
    assert window_starts(T, L) == expected
    assert torch.jit.script(window_starts)(T, L) == expected


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 2000), L=st.integers(1, 300))
def test_window_starts_cover_the_utterance(T: int, L: int) -> None:
    starts = window_starts(T, L)
    assert starts[0] == 0
    if T <= L:
        assert starts == [0]
        return
    hop = max(1, L // 2)
    assert all(0 < b - a <= hop for a, b in zip(starts, starts[1:]))
    assert all(s + L <= T for s in starts)
    assert starts[-1] + L == T
    assert starts[:-1] == list(range(0, hop * (len(starts) - 1), hop))  # regular ones, then maybe T - L


def test_window_batch_and_embedding() -> None:
    torch.manual_seed(0)
    model = DVector(ModelConfig.preset("tiny")).eval()
    mel = torch.randn(241, 40)
    batch = window_batch(mel, 160)
    assert batch.shape == (3, 160, 40)
    assert torch.equal(batch[2], mel[81:241]) and torch.equal(batch[1], mel[80:240])
    short = torch.randn(37, 40)
    assert window_batch(short, 160).shape == (1, 37, 40)
    with torch.no_grad():
        whole = model(short[None])[0]  # an utterance shorter than a window: the whole of it, unpadded
        per_window = model(batch)
    torch.testing.assert_close(embed_windows(model, short, 160), whole)
    expected = torch.nn.functional.normalize(per_window.mean(0), dim=0)
    torch.testing.assert_close(embed_windows(model, mel, 160), expected)
    torch.testing.assert_close(embed_windows(model, mel, 160, batch_size=2), expected, atol=1e-6, rtol=1e-5)
    assert window_embeddings(model, mel, 160).shape == (3, 64)
    assert embed_windows(model, mel, 160).norm().item() == pytest.approx(1.0, abs=1e-6)


# ---- the module, eager and scripted -------------------------------------------------------------


MODEL_CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "last_proj": ModelConfig(name="small-last", hidden_size=32, proj_size=16, n_layers=2, embed_dim=16, pooling="last"),
}


@pytest.fixture(scope="module", params=sorted(MODEL_CONFIGS))
def modules(request: pytest.FixtureRequest):
    torch.manual_seed(1)
    model = DVector(MODEL_CONFIGS[request.param]).eval()
    eager = EmbeddingModule(model, FEATURES, VAD, 120)
    return model, eager, script_module(eager)


def test_scripted_matches_eager_and_package_path(modules) -> None:
    model, eager, scripted = modules
    assert isinstance(eager.model, DVector), "scripting must leave the eager module as it was"
    for seed, duration in ((11, 0.6), (12, 1.7), (13, 4.0), (14, 9.0)):
        wav = speech_samples(seed, duration)
        mel, _ = waveform_to_mel(wav, FEATURES, VAD)
        package = embed_windows(model, torch.from_numpy(mel), 120)
        with torch.no_grad():
            got_eager = eager(torch.from_numpy(wav))
        got_script = scripted(torch.from_numpy(wav))
        assert got_script.shape == (model.embed_dim,)
        assert float(got_script @ got_eager) > 0.9999
        assert float(got_script @ package) > 0.9999
        assert float((got_script - package).abs().max()) < 1e-4
        torch.testing.assert_close(scripted.features(torch.from_numpy(wav)), torch.from_numpy(mel),
                                   atol=LOG_MEL_TOL, rtol=0)


def test_no_speech_falls_back_to_untrimmed_audio(modules) -> None:
    model, _, scripted = modules
    silence = np.zeros(SR, np.float32)
    with pytest.raises(SkipUtterance):
        waveform_to_mel(silence, FEATURES, VAD)  # the package refuses it ...
    got = scripted(torch.from_numpy(silence))  # ... the exported module embeds the whole input
    expected = embed_windows(model, torch.from_numpy(log_mel(silence, FEATURES)), 120)
    assert float(got @ expected) > 0.9999


def test_rejects_bad_input(modules) -> None:
    _, _, scripted = modules
    with pytest.raises(Exception, match="shorter than one analysis window"):
        scripted(torch.zeros(min_samples(FEATURES) - 1))
    with pytest.raises(Exception, match="1-D"):
        scripted(torch.zeros(2, 16000))
    assert scripted(torch.zeros(min_samples(FEATURES))).shape[0] > 0  # exactly one window is enough
    assert scripted(torch.from_numpy(speech_samples(20, 1.0)).double()).dtype == torch.float32


def test_module_rejects_mismatched_mels() -> None:
    from dvector.errors import DvectorError
    with pytest.raises(DvectorError, match="mels"):
        EmbeddingModule(DVector(ModelConfig.preset("tiny", n_mels=24)), FEATURES, VAD, 160)


# ---- export: a checkpoint to a bundle that needs only torch -------------------------------------


def write_checkpoint(run: Path, step: int, seed: int, best: bool, vad: VadConfig = VAD) -> DVector:
    """A checkpoint with the keys ``dvector.training.loop`` writes (random weights)."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig.preset("tiny")
    model = DVector(model_cfg).eval()
    train_cfg = TrainConfig(seg_len=(100, 140), n_speakers=4, n_utterances=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state = {
        "step": step, "model": model.state_dict(), "criterion": {"w": torch.tensor(10.0), "b": torch.tensor(-5.0)},
        "optimizer": optimizer.state_dict(), "scheduler": {}, "model_config": model_cfg.to_dict(),
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in train_cfg.to_dict().items()},
        "feature_config": FEATURES.to_dict(), "vad_config": vad.to_dict(),
        "rng": {"torch": torch.get_rng_state()}, "loader": {"world": 1, "ranks": []},
        "best_eer": 0.25 if best else None, "heldout_speakers": [], "loss": 1.0,
    }
    save_checkpoint(state, run, keep=5, best=best)
    return model


SUBPROCESS_CODE = textwrap.dedent("""
    import json, sys
    sys.path.append(sys.argv[1])  # where torch and numpy live, without the site's .pth files
    try:
        import dvector
    except ImportError:
        pass
    else:
        raise SystemExit("dvector is importable: " + dvector.__file__)
    import numpy, torch
    extra = {"dvector.json": ""}
    m = torch.jit.load(sys.argv[2], _extra_files=extra)
    embeddings = {}
    for path in sys.argv[3:]:
        emb = m(torch.from_numpy(numpy.load(path)))
        embeddings[path] = {"embedding": emb.tolist(), "norm": float(emb.norm())}
    print(json.dumps({"embeddings": embeddings, "sample_rate": m.sample_rate, "seg_len": m.seg_len,
                      "meta": json.loads(extra["dvector.json"]), "dvector_importable": "dvector" in sys.modules}))
""")


def test_export_loads_without_dvector_and_matches(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, step=3, seed=5, best=True)  # best.pt and latest.pt: step 3
    latest_model = write_checkpoint(run, step=6, seed=6, best=False)  # latest.pt: step 6
    best_model = DVector(ModelConfig.preset("tiny"))
    best_model.load_state_dict(torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"])
    best_model.eval()
    assert find_checkpoint(run).name == "best.pt"

    out = tmp_path / "exported"
    path = export_model(run, out)
    assert path == out / "dvector.pt" and path.is_file()
    meta = json.loads((out / "dvector.json").read_text())
    assert meta["step"] == 3 and meta["seg_len"] == 140 and meta["sample_rate"] == SR and meta["embed_dim"] == 64
    assert meta["dvector_version"] == __version__ and meta["vad"] == VAD.to_dict()
    assert meta["source_checkpoint"].endswith("best.pt") and meta["defaulted"] == []
    assert "torch.jit.load" in (out / "README.txt").read_text()

    import torch as torch_module
    site = str(Path(torch_module.__file__).resolve().parent.parent)
    assert not (Path(site) / "dvector").exists()
    wavs = {"mid": speech_samples(30, 2.5), "long": speech_samples(31, 7.0), "short": speech_samples(32, 0.5)}
    files = {}
    for name, wav in wavs.items():
        files[name] = str(tmp_path / f"{name}.npy")
        np.save(files[name], wav)
    result = subprocess.run([sys.executable, "-I", "-S", "-c", SUBPROCESS_CODE, site, str(path), *files.values()],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["dvector_importable"] is False
    assert answer["sample_rate"] == SR and answer["seg_len"] == 140 and answer["meta"]["step"] == 3
    embedded = {}
    for name, wav in wavs.items():
        got = np.asarray(answer["embeddings"][files[name]]["embedding"], dtype=np.float32)
        embedded[name] = got
        mel, _ = waveform_to_mel(wav, FEATURES, VAD)  # the package path: numba VAD, numpy log-mel
        expected = embed_windows(best_model, torch.from_numpy(mel), 140).numpy()
        other = embed_windows(latest_model, torch.from_numpy(mel), 140).numpy()
        assert abs(answer["embeddings"][files[name]]["norm"] - 1.0) < 1e-5
        assert float(got @ expected) > 0.999, name
        assert float(np.abs(got - expected).max()) < 1e-3, name
        assert float(np.abs(got - other).max()) > 1e-2, "exported the wrong checkpoint"

    module, loaded_meta = load_exported(out)  # the same bundle, loaded in this process
    assert loaded_meta["step"] == 3 and module.embed_dim == 64
    np.testing.assert_allclose(module(torch.from_numpy(wavs["mid"])).numpy(), embedded["mid"], atol=1e-6)


def test_export_of_a_file_and_latest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_checkpoint(run, step=2, seed=8, best=False, vad=VadConfig(enabled=False))
    assert find_checkpoint(run).name == "latest.pt"
    out = export_model(run / "checkpoints" / "step-000000002.pt", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "dvector.json").read_text())
    assert meta["step"] == 2 and meta["vad"]["enabled"] is False
    module, _ = load_exported(out)
    assert module.vad_enabled is False
