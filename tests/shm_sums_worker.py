"""Run under torchrun by tests/test_shm_allreduce.py: the epoch sums through the shared segment,
back to back and interleaved with DDP's gradient exchanges, with one rank arriving late at each
call in turn; then the same values through gloo's all-reduce, for reference.

Writes ``<out>/rank<r>.json``: the sums this rank got from each route, and its gradients.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rnnlm import shm_allreduce
from rnnlm.distributed import process_group

CALLS = 10
BACKWARD_BEFORE = {1, 2, 5, 8}  # calls preceded by a gradient exchange; the others back to back


def rank_values(rank: int, call: int, n: int) -> torch.Tensor:
    """Values whose sums are exact in float64 (so any summation order gives the same bits),
    different on every rank and every call."""
    return torch.arange(n, dtype=torch.float64) * (rank + 1) / 8 + call * 1024


def length(call: int, world: int) -> int:
    return shm_allreduce.SUM_CAPACITY + 5 if call == 4 else 3 + 2 * world  # one past capacity


def main(out: Path) -> None:
    with process_group("cpu") as info:
        torch.manual_seed(0)
        module = nn.Linear(4, 3)
        ddp = DistributedDataParallel(module)
        exchange = shm_allreduce.attach(ddp, module, info, "shm", 60.0, lambda: False)
        assert exchange is not None
        shm = []
        for call in range(CALLS):
            if call in BACKWARD_BEFORE:
                ddp(torch.full((2, 4), float(info.rank + call))).sum().backward()
            if info.rank == call % info.world_size:
                time.sleep(0.02)  # the others go ahead and wait for this one
            values = rank_values(info.rank, call, length(call, info.world_size))
            shm.append(exchange.sum_float64(values).tolist())
        gloo = []
        for call in range(CALLS):
            values = rank_values(info.rank, call, length(call, info.world_size))
            dist.all_reduce(values)
            gloo.append(values.tolist())
        grads = [p.grad.reshape(-1).tolist() for p in module.parameters() if p.grad is not None]
        result = {"shm": shm, "gloo": gloo, "grads": grads, "world": info.world_size}
        (out / f"rank{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # As jobs/train.py does: interpreter teardown after gloo was seen to abort (SIGABRT) now
    # and then; everything is written and the group is gone.
    sys.stdout.flush()
    os._exit(0)
