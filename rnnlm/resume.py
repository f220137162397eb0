"""Checkpoint and resume a running job, and stop it cleanly when it is preempted.

All ranks take part in a checkpoint (each hands over its carried hidden state, RNG state and
partial epoch sums); the main rank alone writes the file. On start, the main rank picks the
newest usable checkpoint and broadcasts it, so ranks need not share a filesystem. A resumed
job continues from the exact minibatch where the checkpoint was taken and computes exactly
what the uninterrupted job computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from rnnlm import checkpoint
from rnnlm.batching import rows_of_rank
from rnnlm.config import TrainConfig
from rnnlm.distributed import DistInfo, StopVote
from rnnlm.errors import FlagError
from rnnlm.records import Cursor, EpochProgress, EpochStats, History, State
from rnnlm.steps import Step
from rnnlm.vocab import Vocab

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a retryable failure for the Job controller


class Preempted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written (when enabled) and the job must exit."""


class StopFlag:
    """Set by SIGTERM/SIGINT (torchrun forwards them to every worker); read between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal is None:
            log.warning(
                "received %s: finishing this step, then stopping", signal.Signals(signum).name
            )
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    previous = {s: signal.signal(s, flag._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Resumed:
    """Where a restored job continues, and the MLflow run it continues."""

    path: Path
    epoch: int  # the epoch to continue (with --max-steps: see ``global_step``)
    progress: EpochProgress | None  # position inside it (None: at its start)
    mlflow_run_id: str | None
    cursor: Cursor  # where in the stream of minibatches
    global_step: int  # minibatches trained in all


def _state_tensors(state: State | None) -> list[torch.Tensor] | None:
    if state is None:
        return None
    return [t.detach().cpu() for t in (state if isinstance(state, tuple) else (state,))]


class Checkpointer:
    """Decides when to checkpoint, gathers every rank's share, writes on the main rank."""

    def __init__(
        self,
        config: TrainConfig,
        info: DistInfo,
        step: Step,
        vocab: Vocab,
        history: History,
        vote: StopVote,
    ) -> None:
        self.config, self.info, self.vote = config, info, vote
        self.module, self.optimizer = step.module, step.optimizer
        self.vocab, self.history = vocab, history
        self.settings = settings = config.checkpoint
        self.directory = Path(settings.checkpoint_dir) if settings.checkpoint_dir else None
        self.global_step = 0
        self.mlflow_run_id: str | None = None
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # the same across restarts
        self.job_id = settings.job_id or (run_id if run_id != "none" else uuid.uuid4().hex)

    # -- policy -------------------------------------------------------------------------------

    def after_step(self, epoch: int, cursor: Cursor, progress: EpochProgress) -> None:
        self.global_step += 1
        stopping = self.vote.decide(self.info.is_distributed)
        due = (
            self.settings.checkpoint_unit == "step"
            and self.global_step % self.settings.checkpoint_every == 0
        )
        if stopping:
            try:
                self.save(epoch, cursor, progress)
            except checkpoint.NotWritten as exc:  # still exit 143: the retry takes an older one
                log.error("%s", exc)
            raise Preempted(f"stopped by a signal at epoch {epoch}")
        if due:
            self.save(epoch, cursor, progress)

    def after_report(
        self, index: int, last: bool, resume_at: int, cursor: Cursor, carried: EpochProgress
    ) -> None:
        """After report ``index`` (an epoch, or --eval-every steps); ``carried``: the state the
        next one starts from, no sums yet."""
        due = self.settings.checkpoint_unit == "epoch" and (
            index % self.settings.checkpoint_every == 0 or last
        )
        if due:
            self.save(resume_at, cursor, carried)

    # -- writing ------------------------------------------------------------------------------

    def save(self, epoch: int, cursor: Cursor, progress: EpochProgress | None) -> None:
        """Collective: every rank must call it at the same point."""
        if self.directory is None:
            return
        if progress is not None:
            progress.check_finite(epoch)  # never replace a good checkpoint with a diverged one
        mine = {
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.info.device.type == "cuda" else None,
            "loss_sum": float(progress.loss_sum.item()) if progress else 0.0,
            "norm_sum": float(progress.norm_sum.item()) if progress else 0.0,
            "num_tokens": progress.num_tokens if progress else 0,
            "state": _state_tensors(progress.state) if progress else None,
        }
        ranks: list[Any] = [mine]
        if self.info.is_distributed:
            ranks = [None] * self.info.world_size
            dist.all_gather_object(ranks, mine)
        if not self.info.is_main:
            return
        hidden = None
        if ranks[0]["state"] is not None:  # rows of all ranks, in rank order: the global batch
            hidden = [
                torch.cat(parts, dim=1) for parts in zip(*(r["state"] for r in ranks), strict=True)
            ]
        payload = {
            "format": checkpoint.FORMAT,
            "global_step": self.global_step,
            "epoch": epoch,
            "step": progress.step if progress else 0,
            "cursor": dataclasses.asdict(cursor),
            "unit": self._unit(),
            "model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "ranks": [{k: v for k, v in r.items() if k != "state"} for r in ranks],
            "hidden": hidden,
            "history": [dataclasses.asdict(s) for s in self.history.epochs],
            "val_history": list(self.history.val_perplexity),
            "extra_metrics": list(self.history.extra_metrics),
            "samples": [list(s) for s in self.history.samples],
            "mlflow_run_id": self.mlflow_run_id,
            "job_id": self.job_id,
            "config": self.config.to_flat(),
            "model_config": self.module.config.to_dict(),
            "vocab": list(self.vocab.idx_to_token),
            "world_size": self.info.world_size,
            "saved_at": time.time(),
        }
        path = checkpoint.save(
            self.directory, payload, self.global_step, self.settings.keep_checkpoints
        )
        log.info("checkpoint %s (epoch %d, step %d)", path.name, epoch, payload["step"])

    # -- reading ------------------------------------------------------------------------------

    def find(self) -> dict[str, Any] | None:
        """The newest usable checkpoint, loaded on the main rank and sent to all (collective)."""
        if self.directory is None:
            return None
        found: list[Any] = [None]
        if self.info.is_main:
            checkpoint.remove_temporary(self.directory)
            newest = self._newest()
            if self.settings.fresh and (newest is None or newest[1].get("job_id") != self.job_id):
                removed, newest = checkpoint.clear(self.directory), None
                if removed:  # nothing to say on a first start
                    log.warning("--fresh: removed %d checkpoint(s) in %s", removed, self.directory)
            if newest is not None:
                path, payload = newest
                if payload.get("unit", "epoch") != self._unit():
                    raise FlagError("--max-steps", f"{path} counts {payload.get('unit', 'epoch')}s "
                                    f"and this job {self._unit()}s; run it as it was started "
                                    "(with or without --max-steps), or pass --fresh.")  # fmt: skip
                flat = self.config.to_flat()
                job = {k: flat[k] for k in checkpoint.SAME_ON_RESUME}
                job |= self.module.config.to_dict()
                checkpoint.check_compatible(payload, job, self.vocab.idx_to_token, path)
                payload["path"] = str(path)
                found = [payload]
        if self.info.is_distributed:
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def _unit(self) -> str:
        return "step" if self.config.training.max_steps else "epoch"

    def _newest(self) -> tuple[Path, dict[str, Any]] | None:
        try:
            return checkpoint.load_newest(self.directory) if self.directory else None
        except FlagError:  # of an earlier format: --fresh clears it
            if not self.settings.fresh:
                raise
            return None

    def restore(self, payload: dict[str, Any], data_rng: random.Random) -> Resumed:
        """Put model, optimizer, generators and this rank's rows back as they were."""
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for group in self.optimizer.param_groups:  # the flags of this run win over the file's
            group["lr"] = self.config.training.lr
        cursor = Cursor(**payload["cursor"]) if "cursor" in payload else Cursor(
            payload["epoch"], payload["step"], payload["data_rng"])  # fmt: skip
        data_rng.setstate(cursor.rng_state)
        same_layout = payload["world_size"] == self.info.world_size
        rank_part = payload["ranks"][self.info.rank if same_layout else 0]
        torch.set_rng_state(rank_part["torch_rng"])
        if rank_part["cuda_rng"] is not None and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(rank_part["cuda_rng"])
        progress = None
        if payload["step"] > 0 or payload["hidden"] is not None:
            device = self.info.device
            progress = EpochProgress.start(device)
            progress.step = payload["step"]
            # Partial sums: each rank its own; with another world size, all on the main rank.
            parts = [rank_part] if same_layout else (payload["ranks"] if self.info.is_main else [])
            progress.loss_sum += sum(p["loss_sum"] for p in parts)
            progress.norm_sum += sum(p["norm_sum"] for p in parts)
            progress.num_tokens = sum(p["num_tokens"] for p in parts)
            if payload["hidden"] is not None:
                batch_size = self.config.data.batch_size
                rows = rows_of_rank(self.info.rank, self.info.world_size, batch_size)
                mine = [t[:, rows].to(device) for t in payload["hidden"]]
                progress.state = (mine[0], mine[1]) if len(mine) == 2 else mine[0]
        self.global_step = payload["global_step"]
        self.mlflow_run_id = payload["mlflow_run_id"]
        self.history.epochs[:] = [EpochStats(**s) for s in payload["history"]]
        self.history.val_perplexity[:] = list(payload["val_history"])
        self.history.extra_metrics[:] = list(payload["extra_metrics"])
        self.history.samples[:] = [(int(e), str(p), str(t)) for e, p, t in payload["samples"]]
        if self.info.is_main:
            age = time.time() - payload["saved_at"]
            log.warning(
                "resuming from %s: epoch %d, step %d (saved %.1f s ago)",
                payload["path"], payload["epoch"], payload["step"], age,
            )  # fmt: skip
        return Resumed(
            path=Path(payload["path"]),
            epoch=payload["epoch"],
            progress=progress,
            mlflow_run_id=self.mlflow_run_id,
            cursor=cursor,
            global_step=self.global_step,
        )
