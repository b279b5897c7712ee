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
from dvector.shards.streams import StallError, StreamError, TooLargeError

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
        # no index beside remote shards: fine, it is optional; but one that is there and cannot be read
        # (not JSON, cut short, endless, a server error) is an error, as a damaged local one is; and a
        # server that never answers will not answer for the shards either: say so now, not per shard
        if is_remote(candidate) and _absent(candidate, exc.__cause__):
            log.info("no %s beside %s: %s", INDEX_NAME, url, exc)
            return None
        raise


def _absent(url: str, cause: BaseException | None) -> bool:
    """Whether reading the remote index ``url`` failed because there is none: an HTTP 4xx answer (404,
    or 403 where storage hides what is missing); for other schemes, their command failing (it cannot
    say why). A stall, a server error (5xx), a broken connection or bad content is not absence."""
    if not isinstance(cause, StreamError) or isinstance(cause, (StallError, TooLargeError)):
        return False
    if urlparse(url).scheme in ("http", "https"):
        return cause.http_status is not None and 400 <= cause.http_status < 500
    return True


def _check_local(urls: Sequence[str]) -> None:
    """One line naming the path when none of the (local) shard paths given is there, a mistyped folder
    say: otherwise training would start, skip every shard as missing and stop naming none of them."""
    local = [u for u in urls if not is_remote(u)]
    if len(local) < len(urls) or any(os.path.exists(_local_path(u)) for u in local):
        return
    first = _local_path(local[0])
    gone = _missing_parent(first)
    where = f" (there is no folder {gone})" if gone else ""
    if len(local) == 1:
        raise DvectorError(f"no such shard folder or file: {first}{where}")
    raise DvectorError(f"none of the {len(local)} shard files given is there (the first: {first}){where}")


def _missing_parent(path: str) -> str:
    """The top-most folder of ``path`` that does not exist ("" when its parent folder does)."""
    top, head = "", os.path.dirname(os.path.abspath(path))
    while head and not os.path.exists(head):
        top, head = head, os.path.dirname(head)
        if head == top:
            break
    return top


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
            if is_folder and not is_remote(text) and not os.path.exists(_local_path(text)):
                _check_local([text.rstrip("/")])
            idx = read_index(index or text)
            base = _parent(text) if text.endswith(INDEX_NAME) else text.rstrip("/")
            if not idx.get("shards"):
                raise DvectorError(f"{text}: its {INDEX_NAME} lists no shards")
            return ShardSource([f"{base}/{s['name']}" for s in idx["shards"]], idx)
        urls = expand_urls(text)
    if not urls:
        raise DvectorError(f"no shards in {source!r}")
    _check_local(urls)
    found = read_index(index) if index is not None else _index_beside(urls[0])
    return ShardSource(list(urls), found)
