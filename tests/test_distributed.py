"""Process-group set-up that needs no peers: how a node's cores are shared among its ranks."""

from __future__ import annotations

import pytest
import torch

from rnnlm import distributed
from rnnlm.distributed import DistInfo


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
