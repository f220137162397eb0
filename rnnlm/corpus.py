"""Where the text comes from: a URL (downloaded once into a verified cache) or a local file.

A download is streamed into a temporary file beside its final name and renamed only after its
sha1 matches, so the cache never holds a partial or wrong file; a cached file is verified again
on every use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from rnnlm.errors import FlagError, UserError

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_NON_LETTERS = re.compile(r"[^A-Za-z]+")


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


def fetch(
    source: str,
    sha1: str | None,
    cache_dir: Path,
    timeout: float = 30.0,
    retries: int = 3,
) -> Path:
    """Return a local, verified path for ``source`` (a URL or a file path)."""
    if not is_url(source):
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise FlagError("--corpus", f"no such file: {path}; pass a text file or a URL.")
        if sha1 and sha1_of(path) != sha1:
            raise FlagError(
                "--corpus-sha1",
                f"{path} has sha1 {sha1_of(path)}, expected {sha1}; "
                "pass the right file or checksum.",
            )
        return path

    name = Path(urlparse(source).path).name or "corpus.txt"
    target = cache_dir / (f"{sha1[:10]}-{name}" if sha1 else name)
    if target.is_file():
        if sha1 is None or sha1_of(target) == sha1:
            return target
        log.warning("cached %s fails its sha1 check; downloading it again", target)
        target.unlink()
    _download(source, sha1, target, timeout, retries)
    return target


def _download(url: str, sha1: str | None, target: Path, timeout: float, retries: int) -> None:
    """Download ``url`` into ``target``, over https where the host offers it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("http://"):
        secure = "https://" + url.removeprefix("http://")
        try:  # one quick try: an http-only host should not cost the retries
            _fetch_verified(secure, sha1, target, min(timeout, 10.0), retries=0)
            return
        except requests.RequestException as exc:
            log.info("https not available for %s (%s); using http", url, type(exc).__name__)
    try:
        _fetch_verified(url, sha1, target, timeout, retries)
    except requests.RequestException as exc:
        raise UserError(
            f"--corpus: cannot download {url} ({type(exc).__name__}). On a machine without "
            "internet, pass a local copy: --corpus /path/to/timemachine.txt"
        ) from exc


def _fetch_verified(url: str, sha1: str | None, target: Path, timeout: float, retries: int) -> None:
    """Stream into a temporary file beside ``target``; rename only if the sha1 matches."""
    retry = Retry(total=retries, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504))
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha1()
    try:
        with requests.Session() as session:
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            with os.fdopen(fd, "wb") as out, session.get(url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                for chunk in r.iter_content(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        if sha1 and digest.hexdigest() != sha1:
            raise FlagError(
                "--corpus-sha1",
                f"{url} downloaded with sha1 {digest.hexdigest()}, expected {sha1}; nothing was "
                "cached. Check the URL, or pass the checksum you trust.",
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def tokenize(text: str, preprocess: str) -> list[str]:
    """Character tokens of ``text``.

    ``d2l``: per line, every run of non-letters becomes one space, then strip and lowercase;
    lines are joined with no separator (exactly as the chapter, whose ``readlines`` splits at
    newlines only). ``raw``: every character.
    """
    if preprocess == "raw":
        return list(text)
    lines = (_NON_LETTERS.sub(" ", line).strip().lower() for line in text.split("\n"))
    return [ch for line in lines for ch in line]


def load_tokens(path: Path, preprocess: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FlagError("--corpus", f"{path} is not UTF-8 text ({exc.reason}).") from exc
    tokens = tokenize(text, preprocess)
    if not tokens:
        hint = " (letters only); try --preprocess raw" if preprocess == "d2l" else ""
        raise FlagError(
            "--corpus", f"{path} holds no tokens after {preprocess} preprocessing{hint}."
        )
    return tokens
