"""Checkpoints: everything needed to continue a job as if nothing had happened.

A checkpoint is a dict of plain types and tensors (``torch.load(weights_only=True)`` reads it;
nothing in it can execute code): model and optimizer state, the position inside the epoch,
the shared data generator's state at the epoch's start, every rank's torch RNG state, the
carried hidden state of ALL rows of the global batch, the partial epoch sums, the per-epoch
history, the MLflow run id, and the config, model config and vocabulary it was made with.

Files are ``ckpt-<global step>.pt``, written atomically (temporary file, fsync, rename, fsync
of the directory); the newest ``keep`` are kept. A truncated or corrupt newest file is skipped
with a warning in favour of the one before it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rnnlm.errors import FlagError

log = logging.getLogger(__name__)

FORMAT = 2  # 2: torch.optim.SGD state; the config recorded by its flat names
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")
TMP_PREFIX = ".ckpt-"


def path_for(directory: Path, global_step: int) -> Path:
    return directory / f"ckpt-{global_step:010d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest (highest global step) first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def check_writable(directory: Path) -> None:
    """Fail before training if checkpoints could not be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise FlagError(
            "--checkpoint-dir",
            f"cannot write checkpoints in {directory} ({exc.strerror or exc}); "
            "pass a writable directory (a shared volume under Kubernetes).",
        ) from None


class NotWritten(FlagError):
    """A checkpoint that could not be written (a full volume): nothing of it is left behind."""


def save(directory: Path, payload: dict[str, Any], global_step: int, keep: int) -> Path:
    """Write atomically, then drop all but the newest ``keep`` of this job's checkpoints."""
    target = path_for(directory, global_step)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) else "the write failed"
        free_mb = shutil.disk_usage(directory).free / 2**20
        raise NotWritten(
            "--checkpoint-dir", f"cannot write {target.name} in {directory} ({reason}; "
            f"{free_mb:.1f} MiB free); free space there, lower --keep-checkpoints, or pass "
            "another --checkpoint-dir.",
        ) from None  # fmt: skip
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    # A file numbered above the one just written is none of this job's (resuming skipped it as
    # unusable): it neither counts towards ``keep`` nor is deleted.
    ours = [p for p in list_checkpoints(directory) if p.name <= target.name]
    for old in ours[keep:]:
        old.unlink(missing_ok=True)
    return target


def remove_temporary(directory: Path) -> None:
    """Temporary files of a writer that was killed mid-write (no one else writes here)."""
    for path in directory.glob(f"{TMP_PREFIX}*.tmp") if directory.is_dir() else []:
        path.unlink(missing_ok=True)


class EarlierFormat(ValueError):
    """A checkpoint an earlier version of rnnlm wrote, which this one cannot resume."""


def load(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), int):
        raise ValueError("not an rnnlm checkpoint")
    if payload["format"] != FORMAT:
        raise EarlierFormat(f"format {payload['format']}, this version reads {FORMAT}")
    return payload


def load_newest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; broken ones are skipped with a warning. One of an
    earlier format stops the job: resuming past it would start over, and keeping the newest
    files by step could then delete every new checkpoint as soon as it is written."""
    for path in list_checkpoints(directory):
        try:
            return path, load(path)
        except EarlierFormat as exc:
            raise FlagError(
                "--checkpoint-dir",
                f"{path} was written by an earlier rnnlm ({exc}); pass --fresh to start over, "
                "or use another --checkpoint-dir.",
            ) from None
        except Exception as exc:  # truncated zip, planted pickle, foreign file...
            log.warning("skipping unusable checkpoint %s: %s", path, str(exc).splitlines()[0])
    return None


# Settings that decide what data each step sees: resuming under others would mix two jobs.
# The model's settings are compared through its config; the rest (the learning rate, clipping,
# the number of epochs, devices, tracking, checkpointing, output) may change on resume.
SAME_ON_RESUME = ("corpus", "preprocess", "min_freq", "max_tokens", "val_tokens", "batch_size",
                  "num_steps", "sampling", "seed")  # fmt: skip


def check_compatible(
    payload: dict[str, Any], job: dict[str, Any], vocab: list[str], path: Path
) -> None:
    """Refuse to resume another job: another model, another vocabulary, other data. ``job``:
    this job's settings (flat) and its model config."""
    saved = {**payload["config"], **payload["model_config"]}
    diffs = [f"{k} {saved.get(k)!r} vs {v!r}" for k, v in job.items() if saved.get(k) != v]
    if diffs:
        raise FlagError(
            "--checkpoint-dir",
            f"{path} is another job's ({'; '.join(diffs)}, checkpoint vs this job); "
            "pass --fresh to start over, or use another --checkpoint-dir.",
        )
    if payload["vocab"] != vocab:
        raise FlagError(
            "--checkpoint-dir",
            f"{path} was trained with a different vocabulary ({len(payload['vocab'])} vs "
            f"{len(vocab)} tokens); pass --fresh to start over, or use another --checkpoint-dir.",
        )


def clear(directory: Path) -> int:
    """Remove this job's checkpoints (``--fresh``); returns how many."""
    files = list_checkpoints(directory)
    for path in files:
        path.unlink(missing_ok=True)
    return len(files)
