"""The composition root: corpus -> vocab -> per-rank batches -> model -> loop -> artifacts.

``train`` runs inside a process group (see :mod:`rnnlm.distributed`) and returns what it did;
the entry points in ``jobs/`` only parse flags and call it.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rnnlm import artifacts, corpus
from rnnlm.batching import check_corpus_length, epoch_batches
from rnnlm.config import TrainConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError
from rnnlm.generate import generate
from rnnlm.loop import SGD, EagerStep, EpochStats, GraphedStep, Optimizer, Step, train_epoch
from rnnlm.model import RNNLM
from rnnlm.tracking import NullTracker, Tracker
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dataset:
    vocab: Vocab
    train_ids: Tensor  # (N,) token ids of the training slice
    path: Path
    sha1: str


@dataclass
class TrainResult:
    module: RNNLM
    vocab: Vocab
    history: list[EpochStats] = field(default_factory=list)
    samples: list[tuple[int, str, str]] = field(default_factory=list)  # (epoch, prefix, text)
    model_dir: Path | None = None

    @property
    def final_perplexity(self) -> float:
        return self.history[-1].perplexity


def load_dataset(config: TrainConfig) -> Dataset:
    """The vocabulary is built from the WHOLE corpus, then the training slice is cut (d2l)."""
    cache_dir = Path(config.cache_dir) if config.cache_dir else corpus.default_cache_dir()
    path = corpus.fetch(config.corpus, config.resolved_sha1(), cache_dir)
    tokens = corpus.load_tokens(path, config.preprocess)
    vocab = Vocab.build(tokens, min_freq=config.min_freq)
    ids = vocab.encode(tokens)
    if config.max_tokens > 0:
        ids = ids[: config.max_tokens]
    return Dataset(vocab, torch.tensor(ids, dtype=torch.long), path, corpus.sha1_of(path))


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
    if not info.is_distributed:
        return module, module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return module, DistributedDataParallel(module, device_ids=device_ids)


def make_step(
    config: TrainConfig,
    model: nn.Module,
    module: RNNLM,
    optimizer: Optimizer,
    info: DistInfo,
) -> Step:
    autocast = torch.bfloat16 if config.autocast == "bf16" else None
    eager = EagerStep(model, module, optimizer, config.clip, autocast)
    if not config.cuda_graphs:
        return eager
    return GraphedStep(eager, module, config.batch_size // info.world_size, config.num_steps)


class Progress:
    """Rank 0's view of training: a bar on a terminal, log lines otherwise."""

    def __init__(self, epochs: int, log_every: int, enabled: bool) -> None:
        self.log_every = log_every
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, unit="epoch", dynamic_ncols=True)
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


def train(config: TrainConfig, info: DistInfo, tracker: Tracker | None = None) -> TrainResult:
    """Train as ``config`` says on this rank's share of every minibatch; return the result.

    Every rank runs this; only the main rank samples, reports and writes the model.
    """
    config.validate(info.world_size)
    config.validate_device(info.device.type)
    tracker = tracker or NullTracker()
    output_dir = Path(config.output_dir)
    if info.is_main:
        check_output_dir(output_dir)
    data = load_dataset(config)
    check_corpus_length(len(data.train_ids), config.batch_size, config.num_steps, info.world_size)
    module, model = build_model(config, len(data.vocab), info)
    optimizer = SGD(module.parameters(), lr=config.lr)  # torch.optim's numbers, faster start
    step = make_step(config, model, module, optimizer, info)
    train_ids = data.train_ids.to(info.device)  # minibatches are views: no copy per step
    rng = random.Random(config.seed)  # shared: every rank draws the same offsets and shuffles
    result = TrainResult(module=module, vocab=data.vocab)
    progress = Progress(config.epochs, config.log_every, enabled=info.is_main)

    def sample(epoch: int, prefixes: tuple[str, ...]) -> None:
        texts = generate(module, data.vocab, prefixes, config.num_sample_chars, device=info.device)
        for prefix, text in zip(prefixes, texts, strict=True):
            result.samples.append((epoch, prefix, text))
            tracker.log_sample(epoch, prefix, text)
            progress.write(f"epoch {epoch}: {text}")

    try:
        for epoch in range(1, config.epochs + 1):
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
            )
            result.history.append(stats)
            tracker.log_epoch(stats)
            progress.update(stats)
            if info.is_main and epoch % config.sample_every == 0 and epoch != config.epochs:
                sample(epoch, config.sample_prefixes[:1])
    finally:
        progress.close()

    if info.is_main:
        sample(config.epochs, config.sample_prefixes)
        final = result.history[-1]
        log.info(
            "perplexity %.1f, %.1f tokens/sec on %s",
            final.perplexity,
            final.tokens_per_s,
            info.device,
        )
        summary = {"train_perplexity": final.perplexity}
        result.model_dir = artifacts.write_model_dir(
            output_dir,
            module,
            data.vocab,
            {
                "config": config.to_dict(),
                "final": summary,
                "corpus_sha1": data.sha1,
                "world_size": info.world_size,
                "perplexity_by_epoch": [s.perplexity for s in result.history],
                "seconds_by_epoch": [s.seconds for s in result.history],
                "tokens_by_epoch": [s.num_tokens for s in result.history],
                "first_step_time": result.history[0].started_at,  # time.time() seconds
            },
        )
        tracker.log_model(result.model_dir, summary)
        log.info("model written to %s", result.model_dir)
    return result
