"""Shared fixtures: the real corpus, and launching the real job (one process or torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The project's test corpus lies beside the checkout; RNNLM_TEST_CORPUS points elsewhere.
CORPUS = Path(
    os.environ.get("RNNLM_TEST_CORPUS") or ROOT.parent / "shared" / "data" / "timemachine.txt"
).resolve()
CORPUS_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
# One private cache for the whole run (the CPU kernel extension is built there once): jobs
# neither read nor fill the user's ~/.cache/rnnlm.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="rnnlm-tests-cache-"))


def pytest_sessionfinish(session: pytest.Session) -> None:
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if not CORPUS.is_file():
        pytest.fail(f"the test corpus is missing: {CORPUS} (see shared/data/README.md)")
    return CORPUS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RNNLM_"))}
    # Two ranks on two cores: one thread each, or small matmuls crawl.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RNNLM_CACHE_DIR=str(TEST_CACHE), **extra)
    # As in an activated virtual environment: its tools (torchrun, uvicorn) are on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_job(
    args: list[str],
    nproc: int = 1,
    module: str = "jobs.train",
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run an entry point as users do: ``python -m`` or ``torchrun --standalone``."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            module,
            *args,
        ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or job_env(),
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
    )


def read_train_info(model_dir: Path) -> dict:
    return json.loads((model_dir / "train.json").read_text())


@pytest.fixture(scope="session")
def kernel_cache() -> Path:
    """The run's private cache, with the CPU kernel extension built in it (once), and its
    operators loaded into this process."""
    from rnnlm.extensions.cpu_kernel import build, ops

    why = build.why_unavailable()
    if why is not None:  # an ARM or pre-AVX2 host: the extension does not exist there
        pytest.skip(f"the CPU kernel extension cannot run here: {why}")
    build.load(TEST_CACHE)
    ops.register()
    return TEST_CACHE


@pytest.fixture(scope="session")
def kernel_spec(kernel_cache: Path):  # -> rnnlm.steps.TrainSpec
    """The extension's parts, as its ``train_spec`` returns them where it applies."""
    from rnnlm.extensions.cpu_kernel import KernelRNNLM, KernelStep
    from rnnlm.steps import TrainSpec

    return TrainSpec("cpu-kernel", KernelRNNLM, KernelStep)
