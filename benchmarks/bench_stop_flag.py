"""What agreeing on a SIGTERM stop costs a training step across ranks.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_stop_flag.py \\
        --out benchmarks/results/stop-flag.json

Every rank must stop at the same minibatch, so each step the ranks agree on whether any of them
was told to stop. Three ways, each on its own DDP model in one job, timed block by block in
turn (the order reversed every other block) so that the machine's drift weighs on all alike:

- ``none``: DDP's own gradient all-reduce, no agreement (what a job that cannot be preempted
  cleanly would cost);
- ``hook``: the job's way, the flag carried as one more element of the gradient all-reduce
  (:func:`rnnlm.distributed.wrap_model`);
- ``all_reduce``: a one-element all-reduce of the flag of its own after every step.

The chapter's model and global batch (32 rows over the ranks, 35 steps), the core's step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from benchmarks.bench_cpu import machine  # noqa: E402
from rnnlm.config import ModelConfig  # noqa: E402
from rnnlm.distributed import DistInfo, StopVote, process_group, wrap_model  # noqa: E402
from rnnlm.model import RNNLM  # noqa: E402
from rnnlm.steps import EagerStep  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--per-block", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    with process_group("cpu") as info:
        ms = measure(info, args.blocks, args.per_block)  # its DDP models end with the call
        if info.is_main:
            report(ms, info.world_size, args.out)


def measure(info: DistInfo, blocks: int, per_block: int) -> dict[str, list[float]]:
    rows = 32 // info.world_size
    gen = torch.Generator().manual_seed(info.rank)
    x, y = (torch.randint(0, 28, (rows, 35), generator=gen) for _ in range(2))
    steps = {}
    for name in ("none", "hook", "all_reduce"):
        torch.manual_seed(0)
        module = RNNLM(ModelConfig(28))
        if name == "hook":
            model = wrap_model(module, info, StopVote(lambda: False))
        else:
            model = DistributedDataParallel(module, gradient_as_bucket_view=True)
        steps[name] = EagerStep(model, torch.optim.SGD(module.parameters(), lr=0.01), 1.0)
    flag = torch.zeros(1)
    ms: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(-2, blocks):  # two warm-up blocks
        for name in steps if block % 2 == 0 else list(steps)[::-1]:
            state = steps[name].module.begin_state(rows)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(per_block):
                steps[name](x, y, state)
                if name == "all_reduce":
                    dist.all_reduce(flag)
            if block >= 0:
                ms[name].append((time.perf_counter() - start) / per_block * 1e3)
    return ms


def report(ms: dict[str, list[float]], world_size: int, out: Path | None) -> None:
    def extra(name: str) -> list[float]:
        return [t - n for t, n in zip(ms[name], ms["none"], strict=True)]

    result = {
        "benchmark": "stop_flag",
        "machine": machine(),
        "world_size": world_size,
        "torch": torch.__version__,
        "threads_per_rank": torch.get_num_threads(),
        "ms_per_step_median": {name: statistics.median(v) for name, v in ms.items()},
        "extra_ms_per_step_paired_median": {n: statistics.median(extra(n)) for n in ms},
    }
    print(json.dumps(result, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
