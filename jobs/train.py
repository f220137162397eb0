"""Train a character-level RNN language model (the d2l chapter's, by default).

One process::

    python -m jobs.train --corpus ../shared/data/timemachine.txt

Several processes on one node, or several nodes (same flags; the global ``--batch-size`` is
split by rows over all processes)::

    torchrun --standalone --nproc-per-node 2 -m jobs.train --corpus ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m jobs.train ...

This entry point composes the job: the core (:mod:`rnnlm`) and, for the chapter's model on an
x86-64 CPU, the optional kernel extension (:mod:`rnnlm.extensions.cpu_kernel`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from torch.distributed.elastic.multiprocessing.errors import record

from jobs.common import setup_logging, user_errors
from jobs.flags import config_from_flags, config_options
from rnnlm import artifacts
from rnnlm.config import TrainConfig
from rnnlm.dataset import cache_dir
from rnnlm.distributed import DistInfo, process_group, read_env
from rnnlm.errors import Transient, UserError
from rnnlm.resume import EXIT_PREEMPTED, Preempted, stop_on_signals
from rnnlm.steps import TrainSpec
from rnnlm.tracking import make_tracker
from rnnlm.trainer import Trainer, prepare

log = logging.getLogger("jobs.train")


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@config_options
def train(**flags: Any) -> None:
    """Train the chapter's RNN language model; under torchrun, one DDP process per rank."""
    with user_errors():
        config = config_from_flags(flags)
        config.validate(read_env(os.environ).world_size)  # before joining any group
        run(config)


@record  # torchrun reports the failing rank's traceback
def run(config: TrainConfig) -> None:
    with (
        process_group(config.runtime.device, config.runtime.dist_timeout) as info,
        stop_on_signals() as stop,
    ):
        setup_logging(info.rank, info.is_main)
        ended = fit(config, info, lambda: bool(stop))
        if ended is not None and not isinstance(ended, Preempted):
            # A mistake (exit 2) or an outage (exit 203), said in one line. Raised here, past
            # the ranks' parting barrier: a peer may still be training. fit()'s frames are gone
            # by now, so the traceback holds no DDP module while the group is torn down.
            raise ended
    if ended is not None:  # preempted: every rank stopped at the same step and left together
        log.warning("%s; exiting so the job is retried", ended)
        sys.exit(EXIT_PREEMPTED)


def fit(config: TrainConfig, info: DistInfo, stop: Callable[[], bool]) -> Exception | None:
    """Train; what ended training early, if anything did: a signal (a checkpoint is written),
    a mistake, or an outage. Returned without its traceback, so that nothing holds the model."""
    data = prepare(config, info)
    output = Path(config.output.output_dir)
    with artifacts.claimed(output) if info.is_main else contextlib.nullcontext():
        trainer = Trainer(config, info, data, train_spec(config, info), stop)
        retry_for = config.runtime.outage_timeout
        try:
            trainer.fit(lambda run_id: make_tracker(config.tracking, info, run_id, retry_for))
        except (Preempted, UserError, Transient) as exc:
            exc.__context__ = exc.__cause__ = None
            return exc.with_traceback(None)
    return None


def train_spec(config: TrainConfig, info: DistInfo) -> TrainSpec:
    """The framework's layers, or the CPU kernel extension where ``--cpu-kernel`` asks for it
    and it applies (the extension says why not, or refuses ``compiled`` where it cannot)."""
    if config.runtime.cpu_kernel == "torch":
        return TrainSpec()
    from rnnlm.extensions import cpu_kernel

    return cpu_kernel.train_spec(config, info, cache_dir(config.data))


def main() -> None:
    train()


if __name__ == "__main__":
    main()
