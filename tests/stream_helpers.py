"""Helpers shared by the stream and validation tests: synthetic shards whose mels say what they hold,
and a local HTTP server for shard folders."""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from dvector.files import write_json_atomic
from dvector.shards.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, shard_name, write_shard

N_MELS = 4  # channel 0: utterance id, 1: frame number, 2: speaker index, 3: noise (ids exact in float16)


def make_shards(folder: Path, n_speakers: int = 16, per_speaker: int = 12, n_shards: int = 4, block: int = 6,
                frames: tuple[int, int] = (30, 60), seed: int = 0, index: bool = True, prefix: str = "s") -> Path:
    """Speaker blocks shuffled over shards, as build-shards lays them out; returns the folder."""
    rng = np.random.default_rng(seed)
    blocks = [(s, u0) for s in range(n_speakers) for u0 in range(0, per_speaker, block)]
    order = rng.permutation(len(blocks))
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    uid = 0
    for k in range(n_shards):
        samples = []
        for b in order[k::n_shards]:
            s, u0 = blocks[b]
            for u in range(u0, min(u0 + block, per_speaker)):
                T = int(rng.integers(frames[0], frames[1] + 1))
                mel = np.empty((T, N_MELS), np.float16)
                mel[:, 0], mel[:, 1], mel[:, 2] = uid, np.arange(T), s
                mel[:, 3] = rng.standard_normal(T)
                samples.append((f"{prefix}{s:03d}_u{u:03d}", mel, {"speaker": f"t/s{s:03d}", "speaker_index": s,
                                                            "source": f"s{s:03d}/{u}.wav", "n_frames": T}))
                uid += 1
        assert uid < 2048  # ids exact in float16
        infos.append(write_shard(folder / shard_name(k), samples).to_dict())
    if index:
        write_json_atomic(folder / INDEX_NAME, {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": {"features": {"n_mels": N_MELS}},
            "speakers": [{"id": f"t/s{s:03d}", "index": s, "utterances": per_speaker} for s in range(n_speakers)],
            "shards": infos, "failures": []})
    return folder


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without logging every request."""

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@contextlib.contextmanager
def serve(folder: Path, handler: type = QuietHandler) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (a free port) serving ``folder`` from a thread until the block
    ends; yields its base URL. Skips where curl (webdataset's http reader) is missing."""
    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) through curl")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
