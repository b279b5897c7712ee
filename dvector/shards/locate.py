"""Where the shards are: a folder with index.json, a brace pattern, a list of URLs, or one URL.

Local paths, ``file://``, ``http(s)://`` and ``pipe:`` URLs, through webdataset's URL expansion;
the index beside them is read where there is one (remote: with the stall timeout of
:mod:`dvector.shards.streams`; an index that stalls stops the job at the start with a clear error).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.shardlists import expand_urls

from dvector.errors import DvectorError
from dvector.shards.format import INDEX_NAME, is_remote
from dvector.shards.index import read_index
from dvector.shards.streams import StallError

log = logging.getLogger(__name__)


@dataclass
class ShardSource:
    urls: list[str]
    index: dict[str, Any] | None  # the build's index.json, where one was found


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else url


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _index_beside(url: str) -> dict[str, Any] | None:
    """The index.json in the folder of a shard URL, where there is one (a pipe: command has no folder)."""
    if url.startswith("pipe:"):
        return None
    candidate = _parent(url) + "/" + INDEX_NAME
    if not is_remote(candidate) and not os.path.exists(_local_path(candidate)):
        return None
    try:
        return read_index(candidate)
    except DvectorError as exc:
        # no index beside remote shards: fine, it is optional; but a server that accepts and never
        # answers will not answer for the shards either: say so now, not after a stall per shard
        if is_remote(candidate) and not isinstance(exc.__cause__, StallError):
            log.info("no usable %s beside %s: %s", INDEX_NAME, url, exc)
            return None
        raise


def resolve_shards(source: str | os.PathLike[str] | Sequence[str], index: str | None = None) -> ShardSource:
    """Shard URLs from a folder (with index.json), a brace pattern, a URL list, or one URL.

    A folder is a local directory, or a URL ending in ``/`` (``http://host/shards/``,
    ``file:///data/shards/``) whose index.json lists the shards; an index.json path or URL works
    too. ``index`` names an index.json explicitly; otherwise it is looked for beside the shards
    (local or remote; not for ``pipe:`` URLs, which have no folder).
    """
    if isinstance(source, (list, tuple)):
        urls = [u for s in source for u in expand_urls(os.fspath(s))]
    else:
        text = os.fspath(source)
        is_folder = not text.startswith("pipe:") and (
            text.endswith("/") or (not is_remote(text) and os.path.isdir(_local_path(text))))
        if is_folder or (text.endswith("/" + INDEX_NAME) or text == INDEX_NAME) and not text.startswith("pipe:"):
            idx = read_index(index or text)
            base = _parent(text) if text.endswith(INDEX_NAME) else text.rstrip("/")
            if not idx.get("shards"):
                raise DvectorError(f"{text}: its {INDEX_NAME} lists no shards")
            return ShardSource([f"{base}/{s['name']}" for s in idx["shards"]], idx)
        urls = expand_urls(text)
    if not urls:
        raise DvectorError(f"no shards in {source!r}")
    found = read_index(index) if index is not None else _index_beside(urls[0])
    return ShardSource(list(urls), found)
