"""What each piece of the CPU kernel extension buys, measured side by side in one process.

    python benchmarks/bench_cpu_kernel.py --out benchmarks/results/cpu-kernel.json

The chapter's model and minibatch (RNN, 256 hidden, 32 x 35, 28 characters), one training step
at a time, three ways on three copies of the same seeded model, interleaved block by block:

- ``core``: :class:`rnnlm.model.RNNLM` + :class:`rnnlm.steps.EagerStep` (``nn.RNN``, autograd,
  ``clip_grad_norm_``, ``torch.optim.SGD``);
- ``loss_op``: the extension's model (the training loss forward and backward in one operator,
  ``rnnlm_cpu::rnn_train_loss``) with the core's clipping and optimizer;
- ``loss_op+clip_sgd``: also clipping and the update in one operator (``rnnlm_cpu::clip_sgd_``),
  still through autograd, as the extension's step runs under DDP;
- ``direct``: the extension's step in one process, the gradients taken straight from the loss
  operator without an autograd graph.

Where the CPU has AVX-512 the AVX2 build is measured too, in processes of its own (two builds
of one operator library cannot share a process), alternating with the AVX-512 build's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.bench_cpu import machine  # noqa: E402
from rnnlm.config import ModelConfig  # noqa: E402
from rnnlm.extensions.cpu_kernel import KernelRNNLM, KernelStep, build, ops  # noqa: E402
from rnnlm.model import RNNLM  # noqa: E402
from rnnlm.steps import EagerStep  # noqa: E402

VOCAB, HIDDEN, BATCH, STEPS = 28, 256, 32, 35


def variants() -> dict[str, Callable[[], None]]:
    """One training step of each variant on fixed random minibatches (the speed of a step does
    not depend on the text)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, STEPS), generator=gen)
    y = torch.randint(0, VOCAB, (BATCH, STEPS), generator=gen)
    steps = {}
    for name, model_class, step_class in [
        ("core", RNNLM, EagerStep),
        ("loss_op", KernelRNNLM, EagerStep),
        ("loss_op+clip_sgd", KernelRNNLM, KernelStep),
        ("direct", KernelRNNLM, KernelStep),
    ]:
        torch.manual_seed(0)
        module = model_class(ModelConfig(VOCAB, num_hiddens=HIDDEN))
        optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
        step = step_class(module, optimizer, 1.0)
        if name == "loss_op+clip_sgd":  # through autograd, as under DDP
            step.run = EagerStep.__call__.__get__(step)
        state = module.begin_state(BATCH)
        steps[name] = lambda step=step, state=state: step(x, y, state) and None
    return steps


def time_steps(names: list[str], blocks: int, per_block: int) -> dict[str, list[float]]:
    """Milliseconds per step of each variant: ``blocks`` rounds, in each ``per_block`` steps of
    every variant in turn (the order reversed every other round)."""
    steps = variants()
    for name in names:  # warm-up: allocator, caches, the first-call set-up
        for _ in range(10):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for block in range(blocks):
        for name in names if block % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(per_block):
                steps[name]()
            times[name].append((time.perf_counter() - start) / per_block * 1e3)
    return times


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def paired(top: list[float], bottom: list[float]) -> dict[str, float]:
    """Speed-up of ``top`` over ``bottom`` (ms ratios bottom/top), per block."""
    return summary([b / t for t, b in zip(top, bottom, strict=True)])


def isa_comparison(cache: Path, rounds: int) -> dict[str, Any] | None:
    """The whole extension step under each build, processes alternating; None without AVX-512."""
    if build.supported_isas() != ["avx512", "avx2"]:
        return None
    medians: dict[str, list[float]] = {"avx512": [], "avx2": []}
    for _ in range(rounds):
        for isa in medians:
            out = subprocess.run(
                [sys.executable, __file__, "--only-full-step", "--cache-dir", str(cache)],
                env={**os.environ, build.ISA_ENV: isa}, capture_output=True, text=True,
                check=True,
            )  # fmt: skip
            medians[isa].append(json.loads(out.stdout)["median"])
    return {
        "ms_per_step": {isa: summary(values) for isa, values in medians.items()},
        "avx512_speedup_paired": paired(medians["avx512"], medians["avx2"]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--per-block", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--only-full-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp)
        isa = build.load(cache)
        ops.register()
        if args.only_full_step:
            times = time_steps(["direct"], args.blocks, args.per_block)
            print(json.dumps(summary(times["direct"])))
            return
        names = ["core", "loss_op", "loss_op+clip_sgd", "direct"]
        times = time_steps(names, args.blocks, args.per_block)
        result = {
            "benchmark": "cpu_kernel",
            "machine": machine(),
            "isa": isa,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "ms_per_step": {name: summary(times[name]) for name in names},
            "speedup_paired": {
                "loss_op_vs_core": paired(times["loss_op"], times["core"]),
                "clip_sgd_op_vs_torch": paired(times["loss_op+clip_sgd"], times["loss_op"]),
                "direct_vs_autograd": paired(times["direct"], times["loss_op+clip_sgd"]),
                "extension_vs_core": paired(times["direct"], times["core"]),
            },
            "isa_builds": isa_comparison(cache, rounds=3),
        }
    for name, ratio in result["speedup_paired"].items():
        print(f"{name:<24} {ratio['median']:.3f}x [{ratio['min']:.3f}-{ratio['max']:.3f}]")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
