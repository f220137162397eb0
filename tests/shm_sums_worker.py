"""Run under torchrun by tests/test_shm_allreduce.py: the epoch sums through the shared segment,
interleaved with DDP's gradient exchanges, against gloo's all-reduce of the same values.

Writes ``<out>/rank<r>.json``: the sums this rank got from each route.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rnnlm import shm_allreduce
from rnnlm.distributed import process_group


def rank_values(rank: int, call: int, n: int) -> torch.Tensor:
    """Values whose sums are exact in float64 (so any summation order gives the same bits),
    different on every rank and every call."""
    return torch.arange(n, dtype=torch.float64) * (rank + 1) / 8 + call * 1024


def main(out: Path) -> None:
    with process_group("cpu") as info:
        torch.manual_seed(0)
        module = nn.Linear(4, 3)
        ddp = DistributedDataParallel(module)
        exchange = shm_allreduce.attach(ddp, module, info, "shm", 60.0, lambda: False)
        assert exchange is not None
        got: dict[str, list[list[float]]] = {"shm": [], "gloo": []}
        for call in range(6):
            # A gradient exchange between the sums: the calls share one sequence.
            ddp(torch.full((2, 4), float(info.rank + call))).sum().backward()
            n = 3 + info.world_size if call % 3 else shm_allreduce.SUM_CAPACITY + 5
            shm = exchange.sum_float64(rank_values(info.rank, call, n))
            gloo = rank_values(info.rank, call, n)
            dist.all_reduce(gloo)
            got["shm"].append(shm.tolist())
            got["gloo"].append(gloo.tolist())
        got["grad"] = [module.weight.grad.reshape(-1).tolist()]  # type: ignore[union-attr]
        (out / f"rank{info.rank}.json").write_text(json.dumps(got))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
