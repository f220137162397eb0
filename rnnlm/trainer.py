"""The composition root: corpus -> vocab -> per-rank batches -> model -> loop -> artifacts.

:class:`Trainer` builds every part of a job once, from the config (and, where an extension
applies, from its :class:`~rnnlm.steps.TrainSpec`), and :meth:`Trainer.fit` trains. It runs
inside a process group (see :mod:`rnnlm.distributed`); the entry points in ``jobs/`` only parse
flags, compose the parts and call it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from rnnlm import artifacts, checkpoint
from rnnlm.batching import Minibatch, check_corpus_length, epoch_batches
from rnnlm.config import TrainConfig
from rnnlm.dataset import Dataset, load_dataset
from rnnlm.distributed import DistInfo, StopVote, from_main, wrap_model
from rnnlm.errors import FlagError, Transient, UserError
from rnnlm.evaluate import evaluate, validation_batches
from rnnlm.generate import generate
from rnnlm.loop import Epoch, train_epoch
from rnnlm.model import RNNLM
from rnnlm.progress import Progress
from rnnlm.records import Cursor, EpochProgress, EpochStats, History
from rnnlm.resume import Checkpointer, Preempted, Resumed
from rnnlm.steps import TrainSpec, make_step
from rnnlm.tracking import Tracker, standard_tags
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)
STARTUP_RECORDS_WAIT_S = 10.0  # at most this long for the tracking run's opening records

TrackerFactory = Callable[[str | None], Tracker]  # MLflow run id to continue -> tracker
CORE = TrainSpec()  # the framework's model and step


@dataclass
class TrainResult:
    module: RNNLM
    vocab: Vocab
    history: History
    model_dir: Path | None = None


def prepare(config: TrainConfig, info: DistInfo) -> Dataset:
    """Check every input and load the data: all a user can get wrong fails here, before any
    tracking run is created or any training step taken."""
    config.validate(info.world_size)
    config.runtime.check_device(info.device.type)
    if info.is_main:
        _check_output_dir(Path(config.output.output_dir))
        if config.checkpoint.checkpoint_dir:
            checkpoint.check_writable(Path(config.checkpoint.checkpoint_dir))
    data = load_dataset(config.data, config.runtime.outage_timeout)
    check_corpus_length(
        len(data.train_ids), config.data.batch_size, config.data.num_steps, info.world_size
    )
    return data


def _check_output_dir(path: Path) -> None:
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


class Trainer:
    """One job's parts, built once: the model (DDP-wrapped across ranks), the optimizer, the
    step, the data layout, the checkpointer. Every rank builds one; only the main rank samples,
    reports and writes the model, through objects that do nothing elsewhere."""

    def __init__(
        self,
        config: TrainConfig,
        info: DistInfo,
        data: Dataset,
        spec: TrainSpec = CORE,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config, self.info, self.data, self.spec = config, info, data, spec
        model_config = dataclasses.replace(config.model, vocab_size=len(data.vocab))
        torch.manual_seed(config.training.seed)  # same initial weights on every rank
        self.module = spec.model_class(model_config).to(info.device)
        self.vote = StopVote(stop)  # set by SIGTERM; agreed by all ranks at the same step
        model = wrap_model(self.module, info, self.vote)
        optimizer = torch.optim.SGD(self.module.parameters(), lr=config.training.lr)
        local_batch = (config.data.batch_size // info.world_size, config.data.num_steps)
        self.step = make_step(
            spec, model, optimizer, config.training.clip, config.runtime, local_batch
        )
        self.rng = random.Random(config.training.seed)  # shared: every rank draws the same
        self.history = History()
        self.checkpointer = Checkpointer(config, info, self.step, data.vocab, self.history,
                                         self.vote)  # fmt: skip
        # The stream of minibatches: a pass over the text after another, each laid out anew.
        self.cursor, self.batches = Cursor(), cast(Sequence[Minibatch] | None, None)
        self.carried = EpochProgress.start(info.device)  # the state one report leaves the next
        training = config.training
        self.step_mode = training.max_steps > 0
        self.last = training.max_steps if self.step_mode else training.epochs  # the last report
        self.val_batches = []
        if len(data.val_ids):
            rows = (config.data.batch_size, config.data.num_steps, info.rank, info.world_size)
            self.val_batches = validation_batches(data.val_ids, *rows)
        self.tracker = Tracker()  # records nothing unless fit() is given a factory
        self.progress = Progress(self.last, config.output.log_every, False)
        log.info("training path: %s", spec.name)

    def fit(self, make_tracker: TrackerFactory | None = None) -> TrainResult:
        """Train from the newest checkpoint (if any) to the last epoch; raises
        :class:`~rnnlm.resume.Preempted` after a checkpoint when the job was told to stop."""
        found = self.checkpointer.find()
        resumed = self.checkpointer.restore(found, self.rng) if found is not None else None
        model = Path(self.config.output.output_dir) / artifacts.WEIGHTS
        finished = resumed is not None and self._done(resumed) and model.is_file()
        # The main rank writes the model, so it decides (other nodes may not see the file).
        finished, recorded = from_main((finished, finished and artifacts.recorded(model.parent)),
                                       self.info)  # fmt: skip
        if make_tracker is not None and not recorded:
            self.tracker = self._start_tracking(make_tracker, resumed)
        if finished and (not self.info.is_main or self.tracker.run_id is None):
            self.tracker.close("FINISHED")  # another node's system metrics, if any
            log.warning("this job finished (its model is in %s): nothing to train; a larger "
                        "--epochs or --max-steps trains on, --fresh starts over",
                        model.parent)  # fmt: skip
            return TrainResult(self.module, self.data.vocab, self.history, model.parent)
        self.checkpointer.mlflow_run_id = self.tracker.run_id
        status = "FAILED"
        try:
            self._open_run(resumed)
            if finished:  # its first run could not record it all (an outage, a refusal)
                log.warning("this job finished: recording what MLflow is missing of it")
                result = TrainResult(self.module, self.data.vocab, self.history, model.parent)
                self.tracker.log_model(model.parent, self._summary())
            else:
                self._train(resumed)
                result = self._finish()
            status = "FINISHED"
        except Preempted:
            status = "RUNNING"  # the retried job continues the same run
            raise
        finally:
            self.tracker.close(status)
        if self.tracker.run_id and result.model_dir:  # recorded: a run again changes nothing
            artifacts.mark_recorded(result.model_dir, self.tracker.run_id)
        return result

    def _start_tracking(self, make_tracker: TrackerFactory, resumed: Resumed | None) -> Tracker:
        """The main rank's tracker first, then the others' (which record into its run). When
        it cannot start, every rank raises its error: none may go on training without it."""
        failure, tracker = None, Tracker()
        if self.info.is_main:
            try:
                tracker = make_tracker(resumed.mlflow_run_id if resumed else None)
            except (UserError, Transient) as exc:
                failure = (isinstance(exc, Transient), str(exc))
        failure, run_id = from_main((failure, tracker.run_id), self.info)
        if failure is not None:
            outage, message = failure
            raise Transient(message) if outage else UserError(message)
        return tracker if self.info.is_main else make_tracker(run_id)

    def run_epoch(
        self, number: int, count: int | None = None, progress: EpochProgress | None = None
    ) -> EpochStats:
        """Train one report: the rest of this pass (``count`` None), or ``count`` minibatches
        of the stream (from ``progress`` when resuming one part-way)."""
        if progress is None:
            progress = EpochProgress.start(self.info.device)
            progress.state = self.carried.state
        if self.batches is None:  # before the clock of the report's first step starts
            self._lay_out()
        epoch = Epoch(number, self._minibatches(count), progress)
        after_step = functools.partial(self.checkpointer.after_step, number, self.cursor)
        stats = train_epoch(self.step, epoch, self.info, after_step)
        self.carried.state = progress.state
        return stats

    def _minibatches(self, count: int | None) -> Iterator[tuple[bool, Minibatch]]:
        """This rank's minibatches, ``count`` of them or to the end of the pass, with whether
        each starts from a fresh state (a pass's first; every one when sampled at random)."""
        taken = 0
        while count is None or taken < count:
            if self.batches is None:
                self._lay_out()
            assert self.batches is not None
            if self.cursor.done == len(self.batches):
                self.cursor.next_pass(self.rng.getstate())
                self.batches = None
                if count is None:
                    return
                continue
            index = self.cursor.done
            self.cursor.done += 1  # before the step: a checkpoint after it resumes past it
            taken += 1
            self.data.unmap_pages()  # the previous minibatch's pages: resident memory stays flat
            yield index == 0 or self.config.data.sampling == "random", self.batches[index]

    def _lay_out(self) -> None:
        """Lay out this pass (its offset or its shuffle); the cursor keeps how, for a resume."""
        data, info = self.config.data, self.info
        self.cursor.rng_state = self.rng.getstate()
        layout = (data.batch_size, data.num_steps, data.sampling, self.rng)
        self.batches = epoch_batches(self.data.train_ids, *layout, info.rank, info.world_size)

    def _open_run(self, resumed: Resumed | None) -> None:
        """A new run gets the job's settings; a resumed job's run, what it lacks of the history."""
        if resumed is None or self.tracker.run_id != resumed.mlflow_run_id:
            info, data = self.info, self.data
            tags = standard_tags(info.world_size, info.backend, str(info.device),
                                 self.config.data.corpus, data.sha1)  # fmt: skip
            self.tracker.log_config(self.config.to_flat(), {**tags, "train_path": self.spec.name})
            self.tracker.log_dataset(self.config.data.corpus, data.sha1, len(data.train_ids))
            self.tracker.log_artifact_text(data.vocab.to_json(), "vocab.json")
        if resumed is not None:
            self.tracker.resume(self.history)
        # The run's opening records go out before the first step rather than during the first
        # epochs, where the sender thread would compete with training (bounded: an unreachable
        # server must not hold training up; its records keep being retried).
        if not self.tracker.wait_sent(STARTUP_RECORDS_WAIT_S):
            log.warning("MLflow is slow: training starts before the run's first records are sent")

    def _train(self, resumed: Resumed | None) -> None:
        """Report after report: an epoch each, or --eval-every steps each with --max-steps."""
        partial = resumed.progress if resumed else None
        if resumed is not None:
            self.cursor = resumed.cursor
        if self.step_mode:  # where the report in progress began
            done = resumed.global_step - (partial.step if partial else 0) if resumed else 0
        else:
            done = resumed.epoch - 1 if resumed else 0
        log_every = 1 if self.step_mode else self.config.output.log_every
        unit = "step" if self.step_mode else "epoch"
        self.progress = Progress(self.last, log_every, self.info.is_main, done, unit)
        try:
            while done < self.last:
                if self.step_mode:
                    end = min(done + self.config.training.eval_every, self.last)
                    count = end - done - (partial.step if partial else 0)
                    self._after_epoch(self.run_epoch(end, count, partial))
                else:
                    end = done + 1
                    self._after_epoch(self.run_epoch(end, None, partial))
                done, partial = end, None
        finally:
            self.progress.close()

    def _done(self, resumed: Resumed) -> bool:
        if self.step_mode:
            return resumed.global_step >= self.last
        return resumed.epoch > self.last

    def _report_index(self, number: int) -> int:
        """Epochs count themselves; with --max-steps, the n-th report ends at step ~n*every."""
        return -(-number // self.config.training.eval_every) if self.step_mode else number

    def _after_epoch(self, stats: EpochStats) -> None:
        self.history.epochs.append(stats)
        extra: dict[str, float] = {}
        if self.val_batches:
            self.history.val_perplexity.append(evaluate(self.module, self.val_batches, self.info))
            extra["val_perplexity"] = self.history.val_perplexity[-1]
            extra["val_bpc"] = math.log2(extra["val_perplexity"])  # bits per character
        self.history.extra_metrics.append(extra)
        self.tracker.log_epoch(stats, extra)
        self.progress.update(stats)
        output, last = self.config.output, stats.epoch == self.last
        index = self._report_index(stats.epoch)
        if self.info.is_main and index % output.sample_every == 0 and not last:
            self._sample(stats.epoch, output.sample_prefixes[:1])
        resume_at = stats.epoch if self.step_mode else stats.epoch + 1
        self.checkpointer.after_report(index, last, resume_at, self.cursor, self.carried)

    def _sample(self, epoch: int, prefixes: tuple[str, ...]) -> None:
        texts = generate(
            self.module, self.data.vocab, prefixes, self.config.output.num_sample_chars
        )
        for prefix, text in zip(prefixes, texts, strict=True):
            self.history.samples.append((epoch, prefix, text))
            self.tracker.log_sample(epoch, prefix, text)
            self.progress.write(f"{self.progress.unit} {epoch}: {text}")

    def _finish(self) -> TrainResult:
        """The final samples, the model written and registered (main rank)."""
        result = TrainResult(module=self.module, vocab=self.data.vocab, history=self.history)
        if not self.info.is_main:
            return result
        history = self.history
        history.samples[:] = [s for s in history.samples if s[0] != self.last]
        self._sample(self.last, self.config.output.sample_prefixes)
        final = history.epochs[-1]
        log.info("perplexity %.1f, %.1f tokens/sec on %s",
                 final.perplexity, final.tokens_per_s, self.info.device)  # fmt: skip
        summary = self._summary()
        result.model_dir = artifacts.write_model_dir(
            Path(self.config.output.output_dir), self.module, self.data.vocab,
            self._train_info(summary),
        )  # fmt: skip
        self.tracker.log_model(result.model_dir, summary)
        log.info("model written to %s", result.model_dir)
        return result

    def _summary(self) -> dict[str, float]:
        summary = {"train_perplexity": self.history.epochs[-1].perplexity}
        if self.history.val_perplexity:
            summary["val_perplexity"] = self.history.val_perplexity[-1]
        return summary

    def _train_info(self, summary: dict[str, float]) -> dict[str, object]:
        """``train.json``: the settings and the figures of every epoch."""
        epochs = self.history.epochs
        return {
            "config": self.config.to_flat(),
            "final": summary,
            "train_path": self.spec.name,
            "corpus_sha1": self.data.sha1,
            "world_size": self.info.world_size,
            "perplexity_by_epoch": [s.perplexity for s in epochs],
            "val_perplexity_by_epoch": self.history.val_perplexity,
            "seconds_by_epoch": [s.seconds for s in epochs],
            "tokens_by_epoch": [s.num_tokens for s in epochs],
            "first_step_time": epochs[0].started_at,  # time.time() seconds
            "mlflow_run_id": self.tracker.run_id,
        }
