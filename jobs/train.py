"""Train a character-level RNN language model (the d2l chapter's, by default).

One process::

    python -m jobs.train --corpus ../shared/data/timemachine.txt

Several processes on one node, or several nodes (same flags; the global ``--batch-size`` is
split by rows over all processes)::

    torchrun --standalone --nproc-per-node 2 -m jobs.train --corpus ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m jobs.train ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
from torch.distributed.elastic.multiprocessing.errors import record

from jobs.common import setup_logging, user_errors
from rnnlm import pipeline
from rnnlm.allocator import keep_freed_memory
from rnnlm.config import ALLREDUCE_MODES, CELLS, CPU_KERNELS, TrainConfig
from rnnlm.distributed import process_group, read_env
from rnnlm.resume import EXIT_PREEMPTED, Preempted, stop_on_signals
from rnnlm.tracking import TrackingSettings, make_tracker

D = TrainConfig()  # the defaults shown in --help


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--config FILE``: a JSON object of field names; flags given on the line still win."""
    if not value:
        return
    try:
        data = json.loads(Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - fields)
    if not isinstance(data, dict) or unknown:
        raise click.BadParameter(f"unknown settings {unknown}; use the flags' names with '_'.")
    ctx.default_map = {**(ctx.default_map or {}), **data}


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    is_eager=True,
    expose_value=False,
    callback=_load_config_file,
    help="JSON file of settings (flag names with '_'); flags on the line win.",
)
@click.option(
    "--corpus",
    default=D.corpus,
    envvar="RNNLM_CORPUS",
    help="URL or local path of the training text.",
)
@click.option(
    "--corpus-sha1",
    default=None,
    help="Expected sha1 of the corpus file [default: the chapter's, for its URL].",
)
@click.option(
    "--cache-dir",
    default=None,
    envvar="RNNLM_CACHE_DIR",
    help="Where downloads are cached [default: ~/.cache/rnnlm].",
)
@click.option(
    "--preprocess",
    type=click.Choice(["d2l", "raw"]),
    default=D.preprocess,
    help="d2l: letters only, lowercased (the chapter); raw: keep every character.",
)
@click.option(
    "--min-freq",
    type=int,
    default=D.min_freq,
    help="Drop characters seen fewer times from the vocabulary.",
)
@click.option(
    "--max-tokens",
    type=int,
    default=D.max_tokens,
    help="Train on the first N tokens; -1 for the whole corpus.",
)
@click.option(
    "--val-tokens",
    type=int,
    default=D.val_tokens,
    help="Held-out tokens right after the training slice (its tail with --max-tokens -1) "
    "for validation perplexity; 0: none.",
)
@click.option(
    "--batch-size",
    type=int,
    default=D.batch_size,
    help="GLOBAL minibatch rows, split evenly over all processes.",
)
@click.option("--num-steps", type=int, default=D.num_steps, help="Time steps per minibatch.")
@click.option(
    "--sampling",
    type=click.Choice(["sequential", "random"]),
    default=D.sampling,
    help="Minibatch layout: sequential partitioning (state carried) or random.",
)
@click.option("--cell", type=click.Choice(CELLS), default=D.cell, help="Recurrent cell.")
@click.option("--num-hiddens", type=int, default=D.num_hiddens, help="Hidden units per layer.")
@click.option("--num-layers", type=int, default=D.num_layers, help="Stacked recurrent layers.")
@click.option("--dropout", type=float, default=D.dropout, help="Dropout between layers.")
@click.option(
    "--bidirectional",
    is_flag=True,
    default=D.bidirectional,
    help="Refused: a language model must not see the characters it predicts.",
)
@click.option("--lr", type=float, default=D.lr, help="SGD learning rate.")
@click.option("--clip", type=float, default=D.clip, help="Gradient clipping: max global L2 norm.")
@click.option("--epochs", type=int, default=D.epochs, help="Passes over the training text.")
@click.option(
    "--seed", type=int, default=D.seed, help="Seeds the weights and the (shared) minibatch layout."
)
@click.option("--device", default=D.device, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dist-timeout",
    type=float,
    default=D.dist_timeout,
    help="Seconds a collective waits for a lost peer before the job fails.",
)
@click.option(
    "--allreduce",
    type=click.Choice(ALLREDUCE_MODES),
    default=D.allreduce,
    help="How ranks average gradients: shm (shared memory, CPU ranks on one host), backend "
    "(the process group's all-reduce) or auto (shm where it applies).",
)
@click.option(
    "--cpu-kernel",
    type=click.Choice(CPU_KERNELS),
    default=D.cpu_kernel,
    help="The rnn cell's recurrence on CPU: compiled (one C call per sequence, built on first "
    "use with the system's cc), torch (the framework's operations, bit-identical to nn.RNN) "
    "or auto (compiled where it builds).",
)
@click.option(
    "--autocast",
    type=click.Choice(["off", "bf16"]),
    default=D.autocast,
    help="CUDA only: bf16 autocast of the forward pass (off: exact fp32).",
)
@click.option(
    "--cuda-graphs",
    is_flag=True,
    default=D.cuda_graphs,
    help="CUDA only, one process: replay the training step as one captured CUDA graph.",
)
@click.option(
    "--output-dir",
    default=D.output_dir,
    envvar="RNNLM_OUTPUT_DIR",
    help="Where the final model (weights, config, vocabulary) is written.",
)
@click.option(
    "--checkpoint-dir",
    default=None,
    envvar="RNNLM_CHECKPOINT_DIR",
    help="Keep checkpoints here and resume from the newest on start (a shared volume "
    "under Kubernetes) [default: no checkpoints].",
)
@click.option(
    "--checkpoint-every", type=int, default=D.checkpoint_every,
    help="Checkpoint every N epochs (or steps, see --checkpoint-unit); SIGTERM always does.",
)  # fmt: skip
@click.option(
    "--checkpoint-unit", type=click.Choice(["epoch", "step"]), default=D.checkpoint_unit,
    help="What --checkpoint-every counts.",
)  # fmt: skip
@click.option("--keep-checkpoints", type=int, default=D.keep_checkpoints,
              help="How many of the newest checkpoints to keep.")  # fmt: skip
@click.option("--fresh", is_flag=True, default=D.fresh,
              help="Delete existing checkpoints and start over instead of resuming.")  # fmt: skip
@click.option(
    "--sample-every", type=int, default=D.sample_every, help="Print a greedy sample every N epochs."
)
@click.option(
    "--sample-prefix",
    "sample_prefixes",
    multiple=True,
    default=D.sample_prefixes,
    help="Prefix(es) to sample from; periodic samples use the first.",
)
@click.option(
    "--num-sample-chars",
    type=int,
    default=D.num_sample_chars,
    help="Characters generated per sample.",
)
@click.option(
    "--log-every",
    type=int,
    default=D.log_every,
    help="Log a line every N epochs (when no progress bar is shown).",
)
@click.option(
    "--tracking/--no-tracking",
    default=D.tracking,
    help="Record the run in MLflow and register the final model.",
)
@click.option(
    "--tracking-uri",
    default=None,
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow server URL or store URI [default: MLflow's local sqlite store].",
)
@click.option(
    "--experiment",
    default=D.experiment,
    envvar="MLFLOW_EXPERIMENT_NAME",
    help="MLflow experiment name.",
)
@click.option("--run-name", default=None, help="MLflow run name [default: generated].")
@click.option(
    "--registered-model-name",
    default=D.registered_model_name,
    help="Model Registry name for the final model.",
)
@click.option("--alias", default=D.alias, help="Registry alias set on the new version.")
@click.option(
    "--tracking-timeout",
    type=float,
    default=D.tracking_timeout,
    help="Seconds to wait at the end for an unreachable tracking server.",
)
def train(**flags: Any) -> None:
    """Train the chapter's RNN language model; under torchrun, one DDP process per rank."""
    flags["sample_prefixes"] = tuple(flags["sample_prefixes"])
    config = TrainConfig(**flags)
    with user_errors():
        config.validate(read_env(os.environ).world_size)  # before joining any group
        run(config)


@record  # torchrun reports the failing rank's traceback
def run(config: TrainConfig) -> None:
    with process_group(config.device, config.dist_timeout) as info, stop_on_signals() as stop:
        setup_logging(info.rank, info.is_main)
        keep_freed_memory()  # no page faults for the tensors every step reallocates
        data = pipeline.prepare(config, info)
        settings = tracking_settings(config)
        try:
            pipeline.train(
                config,
                info,
                data,
                lambda run_id: make_tracker(config.tracking, info.is_main, settings, run_id),
                stop,
            )
        except Preempted as exc:
            logging.getLogger("jobs.train").warning("%s; exiting so the job is retried", exc)
            sys.exit(EXIT_PREEMPTED)
    # Everything is written and closed, and the group is gone: skip interpreter teardown. It
    # took ~0.35 s (torch's modules; 3% of the chapter's 500-epoch run), and after gloo it was
    # seen to abort (SIGABRT) now and then, turning a finished job into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def tracking_settings(config: TrainConfig) -> TrackingSettings:
    return TrackingSettings(
        uri=config.tracking_uri,
        experiment=config.experiment,
        run_name=config.run_name,
        registered_model_name=config.registered_model_name,
        alias=config.alias,
        flush_timeout=config.tracking_timeout,
    )


def main() -> None:
    train()


if __name__ == "__main__":
    main()
