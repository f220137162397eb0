"""A trained model on disk, in plain types only: weights, model config and vocabulary.

Layout of a model directory::

    model.safetensors   the state_dict (no pickle at all)
    model.pt            the same state_dict for torch.load(weights_only=True)
    model.json          ModelConfig fields
    vocab.json          the vocabulary, index order
    train.json          the training config and final figures (informational)
    mlflow.json         the MLflow run that recorded it, written once it is registered

Nothing here executes code on load, and nothing needs the training data directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rnnlm.config import ModelConfig
from rnnlm.errors import FlagError, UserError
from rnnlm.model import RNNLM
from rnnlm.vocab import Vocab

WEIGHTS = "model.safetensors"
WEIGHTS_PT = "model.pt"
MODEL_CONFIG = "model.json"
VOCAB = "vocab.json"
TRAIN_INFO = "train.json"
RECORDED = "mlflow.json"  # the MLflow run that recorded and registered this model, once it has


@contextlib.contextmanager
def claimed(target: Path) -> Iterator[None]:
    """Hold ``target`` for one job while the block runs: a second job given the same directory
    is refused at its start, not after its training. The claim is a lock on a file beside the
    directory, which the system drops when the process ends, however it ends."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    with open(lock, "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FlagError(
                "--output-dir",
                f"another job is writing {target} (it holds {lock}); let it finish, or pass "
                "another --output-dir.",
            ) from None
        yield


def write_model_dir(
    target: Path, module: RNNLM, vocab: Vocab, train_info: dict[str, Any] | None = None
) -> Path:
    """Write the model directory atomically: built beside ``target``, then renamed into place,
    so a reader sees the old directory or the complete new one, never a half-written one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(staging / WEIGHTS))
        torch.save(state, staging / WEIGHTS_PT)
        (staging / MODEL_CONFIG).write_text(json.dumps(module.config.to_dict(), indent=2))
        vocab.save(staging / VOCAB)
        if train_info is not None:
            (staging / TRAIN_INFO).write_text(json.dumps(train_info, indent=2, default=str))
        if target.exists():
            retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.replace(target, retired / "old")
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def mark_recorded(model_dir: Path, run_id: str) -> None:
    staging = model_dir / f".{RECORDED}.tmp"
    staging.write_text(json.dumps({"mlflow_run_id": run_id}))
    os.replace(staging, model_dir / RECORDED)


def recorded(model_dir: Path) -> bool:
    """Whether the job that wrote ``model_dir`` recorded it in MLflow, registration and all."""
    return (model_dir / RECORDED).is_file()


def read_model_dir(path: Path, device: torch.device | str = "cpu") -> tuple[RNNLM, Vocab]:
    """Rebuild the module and vocabulary from a model directory (no pickle is read)."""
    path = Path(path)
    missing = [n for n in (WEIGHTS, MODEL_CONFIG, VOCAB) if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path} is not a model directory: missing {', '.join(missing)}.")
    config = ModelConfig.from_dict(json.loads((path / MODEL_CONFIG).read_text()))
    module = RNNLM(config)
    module.load_state_dict(load_file(str(path / WEIGHTS), device=str(device)))
    return module.to(device), Vocab.load(path / VOCAB)
