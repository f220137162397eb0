"""A real ``mlflow server`` on loopback, on a free port, for the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.conftest import free_port


def start_server(
    root: Path, port: int | None = None, extra: list[str] | None = None, env: dict | None = None
) -> tuple[str, subprocess.Popen]:
    """Start ``mlflow server`` (sqlite backend under ``root``, artifacts served by the
    server) and wait until it answers /health."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--workers", "1",
        *(extra or []),
    ]  # fmt: skip
    log = open(root / f"server-{port}.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
        start_new_session=True, cwd=root,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, root / f"server-{port}.log")
    return url, proc


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Wait until the server at ``url`` answers /health; stop it and fail if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {log.read_text()}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"mlflow server did not become healthy within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server and all its workers (it runs in its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def mlflow_server(root: Path, **kwargs) -> Iterator[str]:
    url, proc = start_server(root, **kwargs)
    try:
        yield url
    finally:
        stop_server(proc)
