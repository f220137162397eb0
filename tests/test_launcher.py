"""rnnlm-torchrun: torchrun whose exit code still tells bad input (2) from a crash, and a
signal (128 + n) from both, so Kubernetes failure policies can act on it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, job_env

pytestmark = pytest.mark.integration  # every test runs the launcher and its workers

BIN = Path(sys.executable).parent


def launch(launcher: list[str], corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        *launcher,
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "jobs.train",
        "--corpus",
        str(corpus),
        "--output-dir",
        str(out),
        *extra,
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=job_env(), cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_bad_input_exits_2_where_torchrun_exits_1(corpus_path: Path, tmp_path: Path) -> None:
    plain = run(
        launch([sys.executable, "-m", "torch.distributed.run"], corpus_path, tmp_path, "--lr", "0")
    )
    # The finding that makes the launcher necessary: the workers' exit 2 is lost.
    assert plain.returncode == 1, plain.stderr[-2000:]
    assert "exitcode  : 2" in plain.stderr
    ours = run(launch([str(BIN / "rnnlm-torchrun")], corpus_path, tmp_path, "--lr", "0"))
    assert ours.returncode == 2, ours.stderr[-2000:]
    errors = [line for line in ours.stderr.splitlines() if line.startswith("Error")]
    assert errors == ["Error: --lr: got 0.0; the learning rate must be > 0, e.g. --lr 1."]
    assert "Root Cause" in ours.stderr and "Traceback" not in ours.stderr
    assert not tmp_path.joinpath("train.json").exists()


def test_a_crash_still_exits_1(tmp_path: Path) -> None:
    """Not every worker failure is bad input: a missing module is a broken image, exit 1."""
    proc = run(
        [
            str(BIN / "rnnlm-torchrun"),
            "--standalone",
            "--nproc-per-node=1",
            "-m",
            "jobs.no_such_job",
        ]
    )
    assert proc.returncode == 1, proc.stderr[-2000:]


def test_sigterm_exits_143(corpus_path: Path, tmp_path: Path) -> None:
    """Pod deletion or preemption: SIGTERM to the launcher ends the job with 128 + 15."""
    proc = subprocess.Popen(
        launch([str(BIN / "rnnlm-torchrun")], corpus_path, tmp_path, "--epochs", "100000"),
        env=job_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 240
        for line in proc.stderr:  # training has started once rank 0 reports an epoch
            if "epoch" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_the_launcher_stopped_is_not_the_root_cause(tmp_path: Path) -> None:
    """As CI once saw it: rank 1 waited for the launcher's stop after writing its error file,
    so its (SIGTERM) failure is timestamped before rank 0's exit 203. The code is rank 0's."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from jobs.torchrun import exit_code

    stopped = ProcessFailure(1, 11, -15, str(tmp_path / "no-error-file-1"))
    failed = ProcessFailure(0, 10, 203, str(tmp_path / "no-error-file-0"))
    stopped.timestamp, failed.timestamp = 100, 101
    assert exit_code(ChildFailedError("jobs.train", {0: failed, 1: stopped})) == 203
    crashed = ProcessFailure(0, 10, 1, str(tmp_path / "no-error-file-2"))
    crashed.timestamp = 101
    assert exit_code(ChildFailedError("jobs.train", {0: crashed, 1: stopped})) == 1
