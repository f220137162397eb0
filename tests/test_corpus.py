"""Corpus: the verified download cache, and clear errors."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnlm import corpus
from rnnlm.errors import FlagError, Transient, UserError
from tests.conftest import CORPUS_SHA1, free_port


def test_local_file_and_its_checksum(corpus_path: Path, tmp_path: Path) -> None:
    assert corpus.fetch(str(corpus_path), CORPUS_SHA1, tmp_path) == corpus_path
    with pytest.raises(UserError, match=r"--corpus-sha1: .* expected 0{40}"):
        corpus.fetch(str(corpus_path), "0" * 40, tmp_path)
    with pytest.raises(UserError, match=r"--corpus: no such file"):
        corpus.fetch(str(tmp_path / "missing.txt"), None, tmp_path)


@pytest.fixture
def http_server(corpus_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on loopback serving the corpus; records the paths it served."""
    served: list[str] = []
    body = corpus_path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/timemachine.txt", served
    server.shutdown()
    server.server_close()


def test_download_is_cached_and_reverified(http_server, tmp_path: Path) -> None:
    url, served = http_server  # http only: the https attempt fails and http is used
    path = corpus.fetch(url, CORPUS_SHA1, tmp_path)
    assert corpus.sha1_of(path) == CORPUS_SHA1
    assert corpus.fetch(url, CORPUS_SHA1, tmp_path) == path
    assert len(served) == 1  # the second call used the cache
    path.write_text("tampered")  # a cached file that fails its check is downloaded again
    assert corpus.sha1_of(corpus.fetch(url, CORPUS_SHA1, tmp_path)) == CORPUS_SHA1
    assert len(served) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "sha1"]  # nothing partial


def test_checksum_mismatch_caches_nothing(http_server, tmp_path: Path) -> None:
    url, _ = http_server
    wrong = hashlib.sha1(b"something else").hexdigest()
    with pytest.raises(UserError, match=r"--corpus-sha1: .* nothing was cached"):
        corpus.fetch(url, wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_is_an_outage_that_says_how_to_pass_a_local_file(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/timemachine.txt"  # nothing listens there
    with pytest.raises(Transient, match=r"cannot download .* --corpus /path/to/timemachine.txt"):
        corpus.fetch(url, None, tmp_path, retry_for=2)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def web() -> Iterator[tuple[str, dict[str, bytes], list[tuple[str, int]]]]:
    """A real HTTP server on loopback: ``files`` (path -> body, changeable while it runs), with
    ETags and 304s, ``/moved/...`` redirecting to the same path on ``localhost`` (another host
    name), 404 for a path it does not have, and for a path ``files`` maps to ``b"503 N"`` N
    answers 503 before the 503 body is served; records (path, status) of every answer."""
    files: dict[str, bytes] = {}
    answered: list[tuple[str, int]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = self.server.server_address[1]
            busy = files.get(self.path, b"").split()
            if busy[:1] == [b"503"] and int(busy[1]) > sum(p == self.path for p, _ in answered):
                status, location = 503, None
            elif self.path not in files and not self.path.startswith("/moved/"):
                status, location = 404, None
            elif self.path.startswith("/moved/"):
                status, location = (
                    302,
                    f"http://localhost:{port}/{self.path.removeprefix('/moved/')}",
                )
            else:
                status, location = 200, None
            body = files.get(self.path, b"")
            etag = '"' + hashlib.sha1(body).hexdigest() + '"'
            if status == 200 and self.headers.get("If-None-Match") == etag:
                status = 304
            answered.append((self.path, status))
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, answered
    server.shutdown()
    server.server_close()


def test_cache_is_keyed_by_the_whole_url_and_revalidated(web, tmp_path: Path) -> None:
    """Two URLs ending in one file name used to share a cache entry, and a file changed
    upstream was never fetched again."""
    base, files, answered = web
    files["/a/corpus.txt"], files["/b/corpus.txt"] = b"the first text", b"another text"
    first = corpus.fetch(f"{base}/a/corpus.txt", None, tmp_path)
    second = corpus.fetch(f"{base}/b/corpus.txt", None, tmp_path)
    assert first != second
    assert (first.read_bytes(), second.read_bytes()) == (b"the first text", b"another text")
    assert corpus.fetch(f"{base}/a/corpus.txt", None, tmp_path).read_bytes() == b"the first text"
    assert answered[-1] == ("/a/corpus.txt", 304)  # asked, and told it had not changed
    files["/a/corpus.txt"] = b"the first text, revised"
    assert corpus.fetch(f"{base}/a/corpus.txt", None, tmp_path) == first
    assert first.read_bytes() == b"the first text, revised"


def test_a_corpus_larger_than_the_limit_is_refused(web, tmp_path: Path) -> None:
    base, files, _ = web
    files["/big.txt"] = b"x" * (3 << 20)
    with pytest.raises(UserError, match=r"--max-corpus-mb: .*/big.txt is larger than 2 MiB"):
        corpus.fetch(f"{base}/big.txt", None, tmp_path, max_bytes=2 << 20)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_redirect_to_another_host_is_logged(web, tmp_path: Path, caplog) -> None:
    base, files, _ = web
    files["/corpus.txt"] = b"some text"
    with caplog.at_level("WARNING", logger="rnnlm.corpus"):
        path = corpus.fetch(f"{base}/moved/corpus.txt", None, tmp_path)
    assert path.read_bytes() == b"some text"
    (warning,) = [r.getMessage() for r in caplog.records if "redirected" in r.getMessage()]
    assert "redirected to another host: http://localhost:" in warning


def test_a_busy_host_is_retried_a_missing_file_is_not(web, tmp_path: Path) -> None:
    """HTTP 503 is an outage, retried with backoff within ``retry_for``; past it, Transient
    (exit 203). A 404 is a mistake in the URL: one request, a FlagError (exit 2)."""
    base, files, answered = web
    files["/busy.txt"] = b"503 2"  # two 503s, then the file
    path = corpus.fetch(f"{base}/busy.txt", None, tmp_path / "a", retry_for=30)
    assert path.read_bytes() == b"503 2"
    assert [s for p, s in answered if p == "/busy.txt"] == [503, 503, 200]
    files["/down.txt"] = b"503 1000"
    with pytest.raises(Transient, match=r"cannot download .*down.txt \(HTTP 503\) for 3 s"):
        corpus.fetch(f"{base}/down.txt", None, tmp_path / "b", retry_for=3)
    assert 2 <= sum(p == "/down.txt" for p, _ in answered) <= 3  # after 1 s and 2 s, no more
    with pytest.raises(FlagError, match=r"--corpus: .*/missing.txt answered HTTP 404"):
        corpus.fetch(f"{base}/missing.txt", None, tmp_path / "c", retry_for=30)
    assert [s for p, s in answered if p == "/missing.txt"] == [404]
    assert not list((tmp_path / "c").iterdir())
