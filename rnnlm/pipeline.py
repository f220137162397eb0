"""The composition root: corpus -> vocab -> per-rank batches -> model -> loop -> artifacts.

``train`` runs inside a process group (see :mod:`rnnlm.distributed`) and returns what it did;
the entry points in ``jobs/`` only parse flags and call it.
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rnnlm import artifacts, checkpoint, corpus, native, shm_allreduce
from rnnlm.batching import check_corpus_length, epoch_batches
from rnnlm.config import TrainConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError
from rnnlm.evaluate import evaluate, validation_batches
from rnnlm.generate import generate
from rnnlm.loop import (
    SGD,
    CompiledStep,
    EagerStep,
    EpochStats,
    GraphedStep,
    Optimizer,
    Step,
    train_epoch,
)
from rnnlm.model import RNNLM
from rnnlm.resume import Checkpointer, History, Preempted, Resumed, StopFlag
from rnnlm.tracking import NullTracker, Tracker, background_cpu_s, standard_tags
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)
STARTUP_RECORDS_WAIT_S = 10.0  # at most this long for the tracking run's opening records


@dataclass(frozen=True)
class Dataset:
    vocab: Vocab
    train_ids: Tensor  # (N,) token ids of the training slice
    val_ids: Tensor  # held-out ids right after it (empty: no validation)
    path: Path
    sha1: str


@dataclass
class TrainResult:
    module: RNNLM
    vocab: Vocab
    history: History
    model_dir: Path | None = None


def cache_dir(config: TrainConfig) -> Path:
    """``--cache-dir``, else $RNNLM_CACHE_DIR or ~/.cache/rnnlm: downloads and kernel builds."""
    return Path(config.cache_dir) if config.cache_dir else corpus.default_cache_dir()


def load_dataset(config: TrainConfig) -> Dataset:
    """The vocabulary is built from the WHOLE corpus, then the training slice is cut (d2l)."""
    path = corpus.fetch(config.corpus, config.resolved_sha1(), cache_dir(config))
    tokens = corpus.load_tokens(path, config.preprocess)
    vocab = Vocab.build(tokens, min_freq=config.min_freq)
    ids = torch.tensor(vocab.encode(tokens), dtype=torch.long)
    train_end = config.max_tokens if config.max_tokens > 0 else len(ids) - config.val_tokens
    train_ids, val_ids = ids[:train_end], ids[train_end : train_end + config.val_tokens]
    if config.val_tokens and len(val_ids) < config.batch_size + 1:
        raise FlagError(
            "--val-tokens",
            f"only {len(val_ids)} tokens follow the training slice, too few for one validation "
            f"token per row of the batch ({config.batch_size}); pass --val-tokens 0 or use less "
            "--max-tokens.",
        )
    return Dataset(vocab, train_ids, val_ids, path, corpus.sha1_of(path))


def check_output_dir(path: Path) -> None:
    """Fail before training, not after it, when the model could not be written there."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FlagError(
            "--output-dir", f"{existing} is a file, not a directory; pass a directory path."
        )
    try:  # a real probe: permission bits say nothing for root or read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise FlagError(
            "--output-dir", f"cannot write in {existing} ({exc.strerror}); pass a writable path."
        ) from None


def build_model(config: TrainConfig, vocab_size: int, info: DistInfo) -> tuple[RNNLM, nn.Module]:
    """The module and what the loop calls: the module itself, or its DDP wrapper."""
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts)
    module = RNNLM(config.model_config(vocab_size)).to(info.device)
    module.kernel = cpu_kernel(config, info, module)
    if not info.is_distributed:
        return module, module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Gradients as views of DDP's bucket: the averaged bucket is not copied back into them
    # (2-rank CPU steps: 2.07 against 2.19 ms, medians over five alternating pairs of runs).
    ddp = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
    return module, ddp


def cpu_kernel(
    config: TrainConfig, info: DistInfo, module: RNNLM
) -> native.TanhRecurrenceKernel | None:
    """The compiled recurrence where ``--cpu-kernel`` asks for it and it can run, else None."""
    if config.cpu_kernel == "torch":
        return None
    if info.device.type != "cpu" or not module.fast_cpu:
        if config.cpu_kernel == "compiled":
            raise FlagError(
                "--cpu-kernel",
                "compiled runs the rnn cell on the CPU, with one layer or without dropout; "
                f"this job has --cell {config.cell} --num-layers {config.num_layers} "
                f"--dropout {config.dropout} on {info.device.type}. Use auto or torch.",
            )
        return None
    if config.num_steps == 1:  # every call is one time step: the model keeps the framework's ops
        if config.cpu_kernel == "compiled":
            raise FlagError(
                "--cpu-kernel",
                "compiled runs sequences of several time steps; this job has --num-steps 1, "
                "where the framework's operations are faster. Use auto or torch.",
            )
        log.info("recurrence on the framework's operations: one time step per call")
        return None
    try:
        kernel = native.load(cache_dir(config))
    except native.UnsupportedCapability as exc:
        raise FlagError(native.ISA_ENV, f"{exc}. Unset it, or name one of those.") from None
    except native.KernelUnavailable as exc:
        if config.cpu_kernel == "compiled":
            raise FlagError(
                "--cpu-kernel", f"the compiled kernel cannot run here: {exc}; use auto or torch."
            ) from None
        log.warning("recurrence on the framework's operations (--cpu-kernel torch): %s", exc)
        return None
    log.info("recurrence: compiled kernel, %s (--cpu-kernel compiled)", kernel.isa)
    return kernel


def make_step(
    config: TrainConfig,
    model: nn.Module,
    module: RNNLM,
    optimizer: Optimizer,
    info: DistInfo,
    exchange: shm_allreduce.SharedMemoryAllReduce | None = None,
) -> Step:
    """The chapter's model on the compiled kernel takes :class:`CompiledStep`; everything else
    (CUDA, GRU/LSTM, several layers, ``--cpu-kernel torch``) the framework's autograd and, across
    ranks, DDP's gradient hooks."""
    autocast = torch.bfloat16 if config.autocast == "bf16" else None
    if autocast is None and not config.cuda_graphs and CompiledStep.can_run(module, optimizer):
        assert isinstance(optimizer, SGD)
        average = None if exchange else backend_averager(info)
        return CompiledStep(module, optimizer, config.clip, average, shared=exchange)
    eager = EagerStep(model, module, optimizer, config.clip, autocast)
    if not config.cuda_graphs:
        return eager
    return GraphedStep(eager, module, config.batch_size // info.world_size, config.num_steps)


def backend_averager(info: DistInfo) -> Callable[[Tensor], object] | None:
    """What DDP's gradient hook does through the process group, for a step whose gradients
    autograd never sees: divide by the world size, then sum over the ranks, in place. None in
    one process."""
    if not info.is_distributed:
        return None

    def through_backend(grads: Tensor) -> None:
        grads.div_(info.world_size)
        dist.all_reduce(grads, op=dist.ReduceOp.SUM)

    return through_backend


class Progress:
    """Rank 0's view of training: a bar on a terminal, log lines otherwise."""

    def __init__(self, epochs: int, log_every: int, enabled: bool, done: int = 0) -> None:
        self.log_every = log_every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=done, unit="epoch", dynamic_ncols=True)
        self.enabled = enabled

    def update(self, stats: EpochStats) -> None:
        if self.bar is not None:
            self.bar.set_postfix(ppl=f"{stats.perplexity:.3f}", tok_s=f"{stats.tokens_per_s:.0f}")
            self.bar.update(1)
        elif self.enabled and (stats.epoch % self.log_every == 0 or stats.epoch == 1):
            log.info(
                "epoch %d: perplexity %.3f, %.0f tokens/s",
                stats.epoch,
                stats.perplexity,
                stats.tokens_per_s,
            )

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prepare(config: TrainConfig, info: DistInfo) -> Dataset:
    """Check every input and load the data: all a user can get wrong fails here, before any
    tracking run is created or any training step taken."""
    config.validate(info.world_size)
    config.validate_device(info.device.type)
    if info.is_main:
        check_output_dir(Path(config.output_dir))
        if config.checkpoint_dir:
            checkpoint.check_writable(Path(config.checkpoint_dir))
    data = load_dataset(config)
    check_corpus_length(len(data.train_ids), config.batch_size, config.num_steps, info.world_size)
    return data


TrackerFactory = Callable[[str | None], Tracker]  # MLflow run id to continue -> tracker


def train(
    config: TrainConfig,
    info: DistInfo,
    data: Dataset,
    make_tracker: TrackerFactory | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train as ``config`` says on this rank's share of every minibatch; return the result.

    Every rank runs this; only the main rank samples, reports and writes the model. With a
    checkpoint directory, the job continues from its newest checkpoint; ``stop`` (set by
    SIGTERM) ends it with a checkpoint at the next step boundary (raises :class:`Preempted`).
    """
    module, model = build_model(config, len(data.vocab), info)
    exchange = None
    if isinstance(model, DistributedDataParallel):
        exchange = shm_allreduce.attach(
            model, module, info, config.allreduce, config.dist_timeout, lambda: bool(stop)
        )
    optimizer = SGD(module.parameters(), lr=config.lr)  # torch.optim's numbers, faster start
    rng = random.Random(config.seed)  # shared: every rank draws the same offsets and shuffles
    history = History()
    checkpointer = Checkpointer(
        config, info, module, optimizer, data.vocab, history, stop, exchange
    )
    found = checkpointer.find()
    resumed = checkpointer.restore(found, rng) if found is not None else None
    run_id = resumed.mlflow_run_id if resumed else None
    tracker = make_tracker(run_id) if make_tracker else NullTracker()
    checkpointer.mlflow_run_id = tracker.run_id
    status = "FAILED"
    try:
        result = _train(config, info, data, module, model, optimizer, rng, history, checkpointer,
                        resumed, tracker, exchange)  # fmt: skip
        status = "FINISHED"
        return result
    except Preempted:
        status = "RUNNING"  # the retried job continues the same run
        raise
    finally:
        tracker.close(status)


def _train(
    config: TrainConfig,
    info: DistInfo,
    data: Dataset,
    module: RNNLM,
    model: nn.Module,
    optimizer: Optimizer,
    rng: random.Random,
    history: History,
    checkpointer: Checkpointer,
    resumed: Resumed | None,
    tracker: Tracker,
    exchange: shm_allreduce.SharedMemoryAllReduce | None,
) -> TrainResult:
    val_batches = (
        validation_batches(
            data.val_ids, config.batch_size, config.num_steps, info.rank, info.world_size
        )
        if len(data.val_ids)
        else []
    )
    if resumed is None:
        tracker.log_config(
            config.to_dict(),
            standard_tags(
                info.world_size, info.backend, str(info.device), config.corpus, data.sha1
            ),
        )
        tracker.log_dataset(config.corpus, data.sha1, len(data.train_ids))
        tracker.log_artifact_text(data.vocab.to_json(), "vocab.json")
    else:
        tracker.resume(history)
    # The run's opening records go out before the first step rather than during the first
    # epochs, where the sender thread took 3-20% of their speed (bounded: an unreachable server
    # must not hold training up; its records keep being retried).
    if not tracker.wait_sent(STARTUP_RECORDS_WAIT_S):
        log.warning("MLflow is slow: training starts before the run's first records are sent")
    step = make_step(config, model, module, optimizer, info, exchange)
    # The epoch's sums take the gradients' route where it is shared memory.
    sum_over_ranks = exchange.sum_float64 if exchange else None
    train_ids = data.train_ids.to(info.device)  # minibatches are views: no copy per step
    first_epoch = resumed.epoch if resumed else 1
    progress = Progress(config.epochs, config.log_every, enabled=info.is_main, done=first_epoch - 1)

    def sample(epoch: int, prefixes: tuple[str, ...]) -> None:
        texts = generate(module, data.vocab, prefixes, config.num_sample_chars, device=info.device)
        for prefix, text in zip(prefixes, texts, strict=True):
            history.samples.append((epoch, prefix, text))
            tracker.log_sample(epoch, prefix, text)
            progress.write(f"epoch {epoch}: {text}")

    cpu_after_first_epoch = 0.0  # background threads' CPU seconds (see background_cpu_s)
    try:
        for epoch in range(first_epoch, config.epochs + 1):
            epoch_rng = rng.getstate()  # what a mid-epoch checkpoint needs to redo the layout
            batches = epoch_batches(
                train_ids,
                config.batch_size,
                config.num_steps,
                config.sampling,
                rng,
                info.rank,
                info.world_size,
            )
            stats = train_epoch(
                model,
                module,
                batches,
                optimizer,
                config.clip,
                reset_state_every_batch=config.sampling == "random",
                info=info,
                epoch=epoch,
                step=step,
                progress=resumed.progress if resumed and epoch == resumed.epoch else None,
                after_step=functools.partial(checkpointer.after_step, epoch, epoch_rng),
                sum_over_ranks=sum_over_ranks,
            )
            history.epochs.append(stats)
            if epoch == first_epoch:
                cpu_after_first_epoch = background_cpu_s()
            extra: dict[str, float] = {}
            if val_batches:
                history.val_perplexity.append(evaluate(module, val_batches, info, sum_over_ranks))
                extra["val_perplexity"] = history.val_perplexity[-1]
            history.extra_metrics.append(extra)
            tracker.log_epoch(stats, extra)
            progress.update(stats)
            if info.is_main and epoch % config.sample_every == 0 and epoch != config.epochs:
                sample(epoch, config.sample_prefixes[:1])
            checkpointer.after_epoch(epoch, rng.getstate())
    finally:
        progress.close()

    ran_several = config.epochs > first_epoch  # this process ran more than one epoch
    background_cpu = background_cpu_s() - cpu_after_first_epoch if ran_several else 0.0
    result = TrainResult(module=module, vocab=data.vocab, history=history)
    if info.is_main:
        history.samples[:] = [s for s in history.samples if s[0] != config.epochs]
        sample(config.epochs, config.sample_prefixes)
        final = history.epochs[-1]
        log.info(
            "perplexity %.1f, %.1f tokens/sec on %s",
            final.perplexity,
            final.tokens_per_s,
            info.device,
        )
        summary = {"train_perplexity": final.perplexity}
        if history.val_perplexity:
            summary["val_perplexity"] = history.val_perplexity[-1]
        result.model_dir = artifacts.write_model_dir(
            Path(config.output_dir),
            module,
            data.vocab,
            {
                "config": config.to_dict(),
                "final": summary,
                "corpus_sha1": data.sha1,
                "world_size": info.world_size,
                "perplexity_by_epoch": [s.perplexity for s in history.epochs],
                "val_perplexity_by_epoch": history.val_perplexity,
                "seconds_by_epoch": [s.seconds for s in history.epochs],
                "tokens_by_epoch": [s.num_tokens for s in history.epochs],
                "first_step_time": history.epochs[0].started_at,  # time.time() seconds
                # CPU of the background (tracking) threads from the end of the first epoch to
                # the end of the last: bounds what tracking took from the later epochs
                "background_cpu_s": max(0.0, background_cpu),
                "mlflow_run_id": tracker.run_id,
            },
        )
        tracker.log_model(result.model_dir, summary)
        log.info("model written to %s", result.model_dir)
    return result
