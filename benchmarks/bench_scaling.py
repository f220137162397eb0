"""2 ranks against 1 rank with the machine's drift taken out: both in one torchrun job, their
epochs interleaved.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        benchmarks/bench_scaling.py --corpus ../shared/data/timemachine.txt --out scaling.json

Why: on a shared VM the speed of a core drifted 10-40% within minutes, and the job-level pairs of
``bench_cpu.py`` (one process, then torchrun, seconds apart) measure that drift as much as the
scaling. Here each round trains a few epochs on rank 0 alone (all 32 rows of the chapter's
global batch, one thread, no exchange: what ``jobs.train`` runs in one process) while rank 1
waits in a barrier, then the same number of epochs on both ranks (16 rows each, the gradients
averaged through shared memory: what ``jobs.train`` runs under torchrun), alternating which comes
first. Both use the job's own pieces (``build_model``, ``make_step``, ``train_epoch``), each on its
own model. Tokens/s are the epochs' own (``train_epoch``'s, all ranks' tokens over rank 0's
seconds); the ratio is taken per round, whose two halves lie a fraction of a second apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from benchmarks.bench_cpu import summary  # noqa: E402
from rnnlm import pipeline, shm_allreduce  # noqa: E402
from rnnlm.batching import epoch_batches  # noqa: E402
from rnnlm.config import TrainConfig  # noqa: E402
from rnnlm.distributed import DistInfo, process_group  # noqa: E402
from rnnlm.loop import SGD, Step, train_epoch  # noqa: E402
from rnnlm.model import RNNLM  # noqa: E402
from rnnlm.shm_allreduce import SharedMemoryAllReduce  # noqa: E402


@dataclasses.dataclass
class Trainer:
    """One model and its step, trained epoch after epoch on ``info``'s rows."""

    config: TrainConfig
    info: DistInfo
    module: RNNLM
    model: nn.Module  # the module, or its DDP wrapper
    optimizer: SGD
    step: Step
    exchange: SharedMemoryAllReduce | None
    epoch: int = 0
    rng: random.Random = dataclasses.field(default_factory=lambda: random.Random(0))

    @classmethod
    def build(cls, config: TrainConfig, data: pipeline.Dataset, info: DistInfo) -> Trainer:
        """As ``jobs.train`` sets up training (the shared-memory exchange across ranks)."""
        module, model = pipeline.build_model(config, len(data.vocab), info)
        optimizer = SGD(module.parameters(), config.lr)
        exchange = None
        if isinstance(model, DistributedDataParallel):
            exchange = shm_allreduce.attach(model, module, info, "auto", 120.0, lambda: False)
        step = pipeline.make_step(config, model, module, optimizer, info, exchange)
        return cls(config, info, module, model, optimizer, step, exchange)

    def epochs(self, data: pipeline.Dataset, count: int) -> tuple[int, float]:
        """Train ``count`` epochs; all ranks' tokens and rank 0's seconds."""
        tokens, seconds = 0, 0.0
        for _ in range(count):
            self.epoch += 1
            batches = epoch_batches(
                data.train_ids,
                self.config.batch_size,
                self.config.num_steps,
                self.config.sampling,
                self.rng,
                self.info.rank,
                self.info.world_size,
            )
            stats = train_epoch(
                self.model,
                self.module,
                batches,
                self.optimizer,
                self.config.clip,
                reset_state_every_batch=False,
                info=self.info,
                epoch=self.epoch,
                step=self.step,
                sum_over_ranks=self.exchange.sum_float64 if self.exchange else None,
            )
            tokens += stats.num_tokens
            seconds += stats.seconds
        return tokens, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=30, help="rounds after one of warm-up")
    parser.add_argument("--epochs-per-half", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with process_group("cpu") as info:
        if info.world_size != 2:
            raise SystemExit("run under torchrun with --nproc-per-node 2")
        config = TrainConfig(corpus=str(args.corpus))
        data = pipeline.load_dataset(config)
        two = Trainer.build(config, data, info)
        alone = Trainer.build(config, data, dataclasses.replace(info, world_size=1, backend=None))
        rates: dict[str, list[float]] = {"1_rank": [], "2_ranks": []}
        for round_ in range(args.rounds + 1):
            halves = [("1_rank", alone), ("2_ranks", two)]
            for name, who in halves if round_ % 2 == 0 else halves[::-1]:
                if name == "2_ranks" or info.rank == 0:
                    tokens, seconds = who.epochs(data, args.epochs_per_half)
                    if round_ > 0 and info.rank == 0:
                        rates[name].append(tokens / seconds)
                        print(
                            f"round {round_} {name}: {tokens / seconds:,.0f} tokens/s", flush=True
                        )
                dist.barrier()  # rank 1 sleeps here while rank 0 trains alone
        if info.rank == 0:
            ratios = [t / o for t, o in zip(rates["2_ranks"], rates["1_rank"], strict=True)]
            result = {
                "describe": __doc__.split("\n\n")[2].replace("\n", " "),
                "epochs_per_half": args.epochs_per_half,
                "tokens_per_s": {name: summary(values) for name, values in rates.items()},
                "ratio_2_ranks_vs_1_rank_per_round": summary(ratios),
            }
            text = json.dumps(result, indent=2)
            if args.out:
                args.out.write_text(text + "\n")
            print(text)


if __name__ == "__main__":
    main()
