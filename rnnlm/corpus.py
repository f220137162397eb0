"""Where the text comes from: a URL (downloaded once into a verified cache) or a local file.

A download is streamed into a temporary file beside its final name and renamed only after its
sha1 matches, so the cache never holds a partial or wrong file; a cached file is verified again
on every use (by its identity, see :func:`sha1_remembered`). Tokenising is
:mod:`rnnlm.prepared`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import requests

from rnnlm.errors import FlagError, Outage, is_refusal, redact

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
TIMEOUT_S = 30.0  # to connect, and between two reads of a download


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rnnlm"


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha1_remembered(path: Path, cache_dir: Path) -> str:
    """``sha1_of(path)``, remembered in the cache by the file's identity (device, inode, size,
    modification time, as git's index does), so that a job's start does not read a large corpus
    again; a file changed in place gets a new modification time and is hashed anew."""
    stat = path.stat()
    identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns]
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:20]
    memo = cache_dir / "sha1" / f"{name}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        known = json.loads(memo.read_text())
        if known["identity"] == identity:
            return str(known["sha1"])
    digest = sha1_of(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the hashing
        memo.parent.mkdir(parents=True, exist_ok=True)
        part = memo.with_name(f".{memo.name}.{os.getpid()}")
        part.write_text(json.dumps({"identity": identity, "sha1": digest}))
        os.replace(part, memo)
    return digest


def fetch(
    source: str,
    sha1: str | None,
    cache_dir: Path,
    max_bytes: int = 4 << 30,
    retry_for: float = 0.0,
) -> Path:
    """Return a local, verified path for ``source`` (a URL or a file path). A download that
    fails for want of the server (no connection, a timeout, HTTP 408/409/429/5xx) is retried with
    backoff for ``retry_for`` seconds, then raises :class:`~rnnlm.errors.Transient`."""
    if not is_url(source):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FlagError("--corpus", f"no such file: {path}; pass a text file or a URL.")
        if sha1 and (actual := sha1_remembered(path, cache_dir)) != sha1:
            raise FlagError(
                "--corpus-sha1",
                f"{path} has sha1 {actual}, expected {sha1}; pass the right file or checksum.",
            )
        return path

    name = Path(urlparse(source).path).name or "corpus.txt"
    key = sha1[:10] if sha1 else hashlib.sha256(source.encode()).hexdigest()[:16]  # whole URL
    target = cache_dir / f"{key}-{name}"
    cached = target.is_file() and (sha1 is None or sha1_remembered(target, cache_dir) == sha1)
    if cached and sha1:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Over https where the host offers it (one quick try: an http-only host costs no retries).
    # Unpinned, a cached file is revalidated (ETag, Last-Modified) and fetched only if changed.
    if source.startswith("http://"):
        with contextlib.suppress(requests.RequestException):
            _fetch_verified("https://" + source.removeprefix("http://"), sha1, target, max_bytes)
            return target
    outage = Outage(retry_for, log)
    while True:
        try:
            _fetch_verified(source, sha1, target, max_bytes)
            return target
        except requests.RequestException as exc:
            error = exc
        status = error.response.status_code if error.response is not None else None
        if status is not None and is_refusal(status):
            raise FlagError("--corpus", f"{redact(source)} answered HTTP {status}; check the URL.")
        if cached:
            log.warning("cannot revalidate %s (%s); using the cached copy", redact(source), error)
            return target
        outage.wait(
            f"cannot download {redact(source)} ({_reason(error)})",
            f"--corpus: cannot download {redact(source)} ({_reason(error)}) for "
            f"{retry_for:.0f} s (--outage-timeout). On a machine without internet, pass a "
            "local copy: --corpus /path/to/timemachine.txt",
        )


def _reason(error: requests.RequestException) -> str:
    if error.response is not None:
        return f"HTTP {error.response.status_code}"
    return type(error).__name__


def _fetch_verified(url: str, sha1: str | None, target: Path, max_bytes: int) -> None:
    """Stream into a temporary file beside ``target``; rename only if complete, within
    ``max_bytes`` and of the right sha1. A file in the cache is kept if the server says 304."""
    validators = target.with_name(f".{target.name}.validators")
    known = sha1 is None and target.is_file() and validators.is_file()  # unpinned, cached
    headers = json.loads(validators.read_text()) if known else {}
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp, digest, size = Path(tmp_name), hashlib.sha1(), 0
    try:
        with (
            os.fdopen(fd, "wb") as out,
            requests.get(url, stream=True, timeout=TIMEOUT_S, headers=headers) as r,
        ):
            r.raise_for_status()
            if r.status_code == 304:
                return
            if urlparse(r.url).hostname != urlparse(url).hostname:
                log.warning("%s redirected to another host: %s", redact(url), redact(r.url))
            for chunk in r.iter_content(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    too_big = f"{redact(url)} is larger than {max_bytes >> 20} MiB; raise it"
                    raise FlagError("--max-corpus-mb", too_big + " for a larger corpus.")
                digest.update(chunk)
                out.write(chunk)
            names = {"ETag": "If-None-Match", "Last-Modified": "If-Modified-Since"}
            headers = {ask: r.headers[got] for got, ask in names.items() if got in r.headers}
        if sha1 and digest.hexdigest() != sha1:
            raise FlagError(
                "--corpus-sha1",
                f"{redact(url)} downloaded with sha1 {digest.hexdigest()}, expected {sha1}; "
                "nothing was cached. Check the URL, or pass the checksum you trust.",
            )
        os.replace(tmp, target)
        if sha1 is None:  # to revalidate it next time
            validators.write_text(json.dumps(headers))
    finally:
        tmp.unlink(missing_ok=True)
