"""Gradients averaged through shared memory: the same bits as gloo's all-reduce, and the job
says which path it took."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rnnlm.shm_allreduce import SUM_CAPACITY, host_identity, why_not_shared
from tests import shm_sums_worker
from tests.conftest import read_train_info, run_job

PARAMS = list(nn.Linear(3, 2).parameters())


def test_ranks_on_one_linux_x86_host_share_memory() -> None:
    here = ("node-a", "boot-1", "linux", "x86_64", "cpu")
    assert why_not_shared([here, here], PARAMS) is None


@pytest.mark.parametrize(
    ("identities", "reason"),
    [
        (
            [
                ("node-a", "boot-1", "linux", "x86_64", "cpu"),
                ("node-b", "boot-2", "linux", "x86_64", "cpu"),
            ],
            "one host",
        ),
        (
            [
                ("pod-a", "boot-1", "linux", "x86_64", "cpu"),
                ("pod-b", "boot-1", "linux", "x86_64", "cpu"),
            ],
            "one host",
        ),
        ([("node-a", "boot-1", "linux", "x86_64", "cuda")] * 2, "CPU ranks"),
        ([("node-a", "boot-1", "linux", "aarch64", "cpu")] * 2, "x86-64"),
        ([("node-a", "boot-1", "darwin", "x86_64", "cpu")] * 2, "Linux"),
    ],
    ids=["two-nodes", "two-pods-one-node", "cuda", "arm", "macos"],
)
def test_elsewhere_the_backend_all_reduces(identities: list, reason: str) -> None:
    assert reason in (why_not_shared(identities, PARAMS) or "")


def test_non_float32_gradients_keep_the_backend() -> None:
    here = host_identity("cpu")
    half = [nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    assert "float32" in (why_not_shared([here, here], half) or "")


def test_shared_memory_and_gloo_train_the_same_bits(corpus_path: Path, tmp_path: Path) -> None:
    """Both sum the two ranks' pre-divided gradients, a/2 + b/2, so the replicas must match
    bit for bit; and the job's log names the path it took."""
    logs = {}
    for mode in ("shm", "backend"):
        proc = run_job(
            ["--corpus", str(corpus_path), "--output-dir", str(tmp_path / mode), "--epochs", "3",
             "--no-tracking", "--allreduce", mode],
            nproc=2,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[mode] = proc.stderr
    assert "gradients all-reduced through shared memory (2 ranks)" in logs["shm"]
    assert "shared memory" not in logs["backend"]
    shm, gloo = (
        load_file(tmp_path / "shm" / "model.safetensors"),
        load_file(tmp_path / "backend" / "model.safetensors"),
    )
    assert shm.keys() == gloo.keys()
    for name in shm:
        assert torch.equal(shm[name], gloo[name]), name
    # The epoch's sums (training and validation) are the same whichever route they take.
    for key in ("perplexity_by_epoch", "val_perplexity_by_epoch"):
        assert read_train_info(tmp_path / "shm")[key] == read_train_info(tmp_path / "backend")[key]


def test_epoch_sums_through_shared_memory_match_gloo(tmp_path: Path) -> None:
    """Three ranks, each arriving late in turn: float64 sums through the segment, back to back
    and between gradient exchanges, one past its capacity (the backend takes that one), equal
    gloo's all-reduce of the same values on every rank, and the gradients are still averaged."""
    proc = run_job([str(tmp_path)], nproc=3, module="tests.shm_sums_worker", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    for got in ranks:
        assert len(got["shm"]) == shm_sums_worker.CALLS
        assert got["shm"] == got["gloo"]
        assert got == ranks[0]  # every rank holds the same sums and the same gradients
    assert {len(s) for s in ranks[0]["shm"]} == {3 + 2 * 3, SUM_CAPACITY + 5}
    # d/dW of sum(W x + b) over 2 rows of x = rank + call, averaged over ranks 0-2 and
    # accumulated over the backward passes: 2 (1 + call) per pass; the bias 2 per pass.
    passes = shm_sums_worker.BACKWARD_BEFORE
    weight, bias = ranks[0]["grads"]
    assert weight == pytest.approx([sum(2 * (1 + c) for c in passes)] * 12, rel=1e-6)
    assert bias == pytest.approx([2 * len(passes)] * 3, rel=1e-6)
