"""The job's configuration: one frozen dataclass, the single source of truth.

Every field is a command-line flag of ``jobs.train`` with the same name (``num_hiddens`` is
``--num-hiddens``); a test keeps the two one-to-one. Defaults are the chapter's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from rnnlm.errors import FlagError

D2L_TIMEMACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
D2L_TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"

Cell = Literal["rnn", "gru", "lstm"]
CELLS: tuple[str, ...] = ("rnn", "gru", "lstm")
ALLREDUCE_MODES: tuple[str, ...] = ("auto", "shm", "backend")
CPU_KERNELS: tuple[str, ...] = ("auto", "compiled", "torch")
Sampling = Literal["sequential", "random"]
Preprocess = Literal["d2l", "raw"]


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to rebuild the network: saved beside every set of weights."""

    vocab_size: int
    cell: str = "rnn"
    num_hiddens: int = 256
    num_layers: int = 1
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training job (defaults reproduce the chapter)."""

    # Corpus and vocabulary.
    corpus: str = D2L_TIMEMACHINE_URL
    corpus_sha1: str | None = None  # None: the known sha1 for the d2l URL, no check otherwise
    cache_dir: str | None = None  # None: $RNNLM_CACHE_DIR or ~/.cache/rnnlm
    preprocess: str = "d2l"
    min_freq: int = 0
    max_tokens: int = 10_000  # -1: the whole corpus
    val_tokens: int = 2_000  # held out right after the training slice (its tail if -1)
    # Minibatches: batch_size is GLOBAL, split evenly across ranks.
    batch_size: int = 32
    num_steps: int = 35
    sampling: str = "sequential"
    # Model.
    cell: str = "rnn"
    num_hiddens: int = 256
    num_layers: int = 1
    dropout: float = 0.0
    bidirectional: bool = False  # refused: kept as a flag so the refusal can explain itself
    # Optimisation.
    lr: float = 1.0
    clip: float = 1.0
    epochs: int = 500
    seed: int = 0
    # Execution and output.
    device: str = "auto"
    dist_timeout: float = 300.0  # seconds before a lost peer fails the job
    allreduce: str = "auto"  # gradients: "shm" (ranks on one host's CPU), "backend" or "auto"
    cpu_kernel: str = "auto"  # the rnn cell on CPU: "compiled" (rnnlm.native), "torch" or "auto"
    # CUDA-only speed options; the defaults are the exact fp32 computation.
    autocast: str = "off"  # "bf16": bfloat16 autocast of the forward pass
    cuda_graphs: bool = False  # capture the training step once, replay it per minibatch
    output_dir: str = "runs/rnnlm"
    # Fault tolerance: resume from the newest checkpoint in checkpoint_dir (None: none kept).
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    checkpoint_unit: str = "epoch"  # or "step" (minibatches)
    keep_checkpoints: int = 3
    fresh: bool = False  # ignore (delete) existing checkpoints instead of resuming
    sample_every: int = 10
    # Periodic samples start from the first prefix; the final samples from all of them.
    sample_prefixes: tuple[str, ...] = ("time traveller", "traveller")
    num_sample_chars: int = 50
    log_every: int = 10
    # Tracking and registry (main rank only).
    tracking: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's local default
    experiment: str = "rnnlm"
    run_name: str | None = None
    registered_model_name: str = "rnnlm-timemachine"
    alias: str = "candidate"
    tracking_timeout: float = 300.0  # seconds to wait at the end for an unreachable server

    def resolved_sha1(self) -> str | None:
        """The checksum to enforce: the flag, else the known one for the default URL."""
        if self.corpus_sha1:
            return self.corpus_sha1.lower()
        if self.corpus == D2L_TIMEMACHINE_URL:
            return D2L_TIMEMACHINE_SHA1
        return None

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size,
            cell=self.cell,
            num_hiddens=self.num_hiddens,
            num_layers=self.num_layers,
            dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int = 1) -> None:
        """Refuse values no job can train with, naming the flag and the fix."""
        _positive("--batch-size", self.batch_size)
        _positive("--num-steps", self.num_steps)
        _positive("--num-hiddens", self.num_hiddens)
        _positive("--num-layers", self.num_layers)
        _positive("--epochs", self.epochs)
        _positive("--sample-every", self.sample_every)
        _positive("--log-every", self.log_every)
        _positive("--dist-timeout", self.dist_timeout)
        _positive("--checkpoint-every", self.checkpoint_every)
        _positive("--keep-checkpoints", self.keep_checkpoints)
        if self.checkpoint_unit not in ("epoch", "step"):
            raise FlagError(
                "--checkpoint-unit", f"got {self.checkpoint_unit!r}; choose 'epoch' or 'step'."
            )
        if self.num_sample_chars < 0:
            raise FlagError("--num-sample-chars", f"got {self.num_sample_chars}; pass 0 or more.")
        if not self.lr > 0:
            raise FlagError("--lr", f"got {self.lr}; the learning rate must be > 0, e.g. --lr 1.")
        if not self.clip > 0:
            raise FlagError("--clip", f"got {self.clip}; the clipping norm must be > 0, e.g. 1.")
        if not 0 <= self.dropout < 1:
            raise FlagError("--dropout", f"got {self.dropout}; pass a probability in [0, 1).")
        if not self.sample_prefixes or not all(self.sample_prefixes):
            raise FlagError("--sample-prefix", "pass one or more non-empty prefixes.")
        if self.dropout and self.num_layers == 1:
            raise FlagError(
                "--dropout",
                "dropout applies between recurrent layers and --num-layers is 1; "
                "pass --num-layers 2 or more, or drop --dropout.",
            )
        if self.min_freq < 0:
            raise FlagError("--min-freq", f"got {self.min_freq}; pass 0 or more.")
        if self.max_tokens == 0 or self.max_tokens < -1:
            raise FlagError(
                "--max-tokens", f"got {self.max_tokens}; pass a positive count or -1 for all."
            )
        if self.val_tokens < 0:
            raise FlagError("--val-tokens", f"got {self.val_tokens}; pass 0 (none) or more.")
        if self.tracking_timeout < 0:
            raise FlagError("--tracking-timeout", f"got {self.tracking_timeout}; pass 0 or more.")
        if self.cell not in CELLS:
            raise FlagError("--cell", f"unknown cell {self.cell!r}; choose one of {CELLS}.")
        if self.sampling not in ("sequential", "random"):
            raise FlagError(
                "--sampling", f"got {self.sampling!r}; choose 'sequential' or 'random'."
            )
        if self.preprocess not in ("d2l", "raw"):
            raise FlagError("--preprocess", f"got {self.preprocess!r}; choose 'd2l' or 'raw'.")
        if self.bidirectional:
            raise FlagError(
                "--bidirectional",
                "a bidirectional layer reads the characters it must predict (the backward "
                "direction sees the future), so it cannot train a left-to-right language "
                "model; drop the flag.",
            )
        if self.batch_size % world_size:
            raise FlagError(
                "--batch-size",
                f"the global batch {self.batch_size} does not split evenly over {world_size} "
                f"processes; pass a multiple of {world_size} (e.g. "
                f"{max(world_size, self.batch_size // world_size * world_size)}).",
            )
        if self.allreduce not in ALLREDUCE_MODES:
            raise FlagError(
                "--allreduce", f"got {self.allreduce!r}; choose {', '.join(ALLREDUCE_MODES)}."
            )
        if self.cpu_kernel not in CPU_KERNELS:
            raise FlagError(
                "--cpu-kernel", f"got {self.cpu_kernel!r}; choose {', '.join(CPU_KERNELS)}."
            )
        if self.autocast not in ("off", "bf16"):
            raise FlagError("--autocast", f"got {self.autocast!r}; choose 'off' or 'bf16'.")
        if self.cuda_graphs and world_size > 1:
            raise FlagError(
                "--cuda-graphs",
                f"the captured step runs in one process, not {world_size}; drop the flag or "
                "run without torchrun.",
            )
        if self.device == "cpu":
            self.validate_device("cpu")
        if self.corpus_sha1 is not None and not _is_sha1(self.corpus_sha1):
            raise FlagError(
                "--corpus-sha1", f"{self.corpus_sha1!r} is not a 40-digit hex sha1 checksum."
            )

    def validate_device(self, device_type: str) -> None:
        """Refuse the CUDA-only options once the device is known (``--device auto`` may
        resolve to the CPU)."""
        if device_type == "cuda":
            return
        if self.autocast != "off":
            raise FlagError(
                "--autocast",
                f"bf16 autocast is a CUDA option and this job runs on {device_type}; "
                "drop the flag or use --device cuda.",
            )
        if self.cuda_graphs:
            raise FlagError(
                "--cuda-graphs",
                f"CUDA graphs need a CUDA device and this job runs on {device_type}; "
                "drop the flag or use --device cuda.",
            )


def _positive(flag: str, value: float) -> None:
    if not value > 0:
        raise FlagError(flag, f"got {value}; it must be greater than 0.")


def _is_sha1(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdefABCDEF" for c in text)
