"""The process group's set-up and teardown: how a node's cores are shared among its ranks, and
that nothing holds the group when it is destroyed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rnnlm import distributed
from rnnlm.distributed import DistInfo
from tests.conftest import run_job


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_every_rank_gets_its_share_of_the_cores_whatever_its_device(
    monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """4 ranks on a 16-core node: 4 threads each, on GPUs as on CPUs (a GPU pod's
    OMP_NUM_THREADS, taken from its CPU limit, would otherwise give each rank all 16)."""
    monkeypatch.setattr(distributed, "available_cores", lambda: 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(16)
        info = DistInfo(local_rank=1, local_world_size=4, world_size=8, device=torch.device(device))
        distributed.share_cores(info)
        assert torch.get_num_threads() == 4
        distributed.share_cores(DistInfo(device=torch.device(device)))  # alone: left as it is
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


@pytest.mark.integration
def test_nothing_holds_the_group_when_it_is_destroyed(corpus_path: Path, tmp_path: Path) -> None:
    """A DDP module still alive at teardown keeps the gloo group until interpreter exit, where
    its destruction now and then aborted a finished worker (SIGABRT: a passing job failed)."""
    flags = ["--corpus", str(corpus_path), "--output-dir", str(tmp_path / "model"),
             "--epochs", "1", "--no-tracking"]  # fmt: skip
    proc = run_job([str(tmp_path), *flags], nproc=2, module="tests.teardown_worker")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"ddp_modules_alive": 0}, f"rank {rank}"
