"""The job's configuration: one frozen tree of typed sections, the single source of truth.

Each section belongs to one component (data, model, training, runtime, checkpoints, output,
tracking). Every field is declared once, with its default and its help text, through
:func:`setting`; the command line of ``jobs.train`` is generated from these declarations
(``num_hiddens`` is ``--num-hiddens``), so no flag restates a default. Defaults are the
chapter's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from rnnlm.errors import FlagError, redact

D2L_TIMEMACHINE_URL = "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt"
D2L_TIMEMACHINE_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"

CELLS = ("rnn", "gru", "lstm")
MAX_SAMPLE_CHARS = 10_000  # a training job's samples are a glance at the model, not output
CPU_KERNELS = ("auto", "compiled", "torch")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    envvar: str | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field and everything its command-line flag needs: the default, the help text,
    the allowed values, an environment variable, a flag name other than the field's."""
    metadata = {"help": help, "choices": choices, "envvar": envvar, "flag": flag, "cli": cli}
    if isinstance(default, tuple):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Section:
    """A group of settings that one component reads."""

    def check(self, world_size: int) -> None:
        """Refuse values no job can run with, naming the flag and the fix."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise FlagError(flag_name(f), f"got {value!r}; choose one of {', '.join(choices)}.")


def flag_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclass(frozen=True)
class DataConfig(Section):
    corpus: str = setting(D2L_TIMEMACHINE_URL, "URL or local path of the training text.",
                          envvar="RNNLM_CORPUS")  # fmt: skip
    corpus_sha1: str | None = setting(
        None, "Expected sha1 of the corpus file [default: the chapter's, for its URL]."
    )
    max_corpus_mb: int = setting(4096, "Largest corpus download, in MiB.")
    cache_dir: str | None = setting(
        None, "Where downloads are cached [default: ~/.cache/rnnlm].", envvar="RNNLM_CACHE_DIR"
    )
    preprocess: str = setting(
        "d2l",
        "d2l: letters only, lowercased (the chapter); raw: keep every character.",
        choices=("d2l", "raw"),
    )
    min_freq: int = setting(0, "Drop characters seen fewer times from the vocabulary.")
    max_tokens: int = setting(10_000, "Train on the first N tokens; -1 for the whole corpus.")
    val_tokens: int = setting(
        2_000,
        "Held-out tokens right after the training slice (its tail with --max-tokens -1) for "
        "validation perplexity; 0: none.",
    )
    batch_size: int = setting(32, "GLOBAL minibatch rows, split evenly over all processes.")
    num_steps: int = setting(35, "Time steps per minibatch.")
    sampling: str = setting(
        "sequential",
        "Minibatch layout: sequential partitioning (state carried) or random.",
        choices=("sequential", "random"),
    )

    def resolved_sha1(self) -> str | None:
        """The checksum to enforce: the flag, else the known one for the default URL."""
        if self.corpus_sha1:
            return self.corpus_sha1.lower()
        return D2L_TIMEMACHINE_SHA1 if self.corpus == D2L_TIMEMACHINE_URL else None

    def check(self, world_size: int) -> None:
        super().check(world_size)
        _positive("--batch-size", self.batch_size)
        _positive("--num-steps", self.num_steps)
        if self.min_freq < 0:
            raise FlagError("--min-freq", f"got {self.min_freq}; pass 0 or more.")
        if self.max_tokens == 0 or self.max_tokens < -1:
            raise FlagError(
                "--max-tokens", f"got {self.max_tokens}; pass a positive count or -1 for all."
            )
        if self.val_tokens < 0:
            raise FlagError("--val-tokens", f"got {self.val_tokens}; pass 0 (none) or more.")
        _positive("--max-corpus-mb", self.max_corpus_mb)
        if self.corpus_sha1 is not None and not _is_sha1(self.corpus_sha1):
            raise FlagError(
                "--corpus-sha1", f"{self.corpus_sha1!r} is not a 40-digit hex sha1 checksum."
            )
        if self.batch_size % world_size:
            raise FlagError(
                "--batch-size",
                f"the global batch {self.batch_size} does not split evenly over {world_size} "
                f"processes; pass a multiple of {world_size} (e.g. "
                f"{max(world_size, self.batch_size // world_size * world_size)}).",
            )


@dataclass(frozen=True)
class ModelConfig(Section):
    """What it takes to rebuild the network; saved beside every set of weights."""

    vocab_size: int = setting(0, "Set from the corpus.", cli=False)
    cell: str = setting("rnn", "Recurrent cell.", choices=CELLS)
    num_hiddens: int = setting(256, "Hidden units per layer.")
    num_layers: int = setting(1, "Stacked recurrent layers.")
    dropout: float = setting(0.0, "Dropout between layers.")
    bidirectional: bool = setting(
        False, "Refused: a language model must not see the characters it predicts."
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def check(self, world_size: int) -> None:
        super().check(world_size)
        _positive("--num-hiddens", self.num_hiddens)
        _positive("--num-layers", self.num_layers)
        if not 0 <= self.dropout < 1:
            raise FlagError("--dropout", f"got {self.dropout}; pass a probability in [0, 1).")
        if self.dropout and self.num_layers == 1:
            raise FlagError(
                "--dropout",
                "dropout applies between recurrent layers and --num-layers is 1; "
                "pass --num-layers 2 or more, or drop --dropout.",
            )
        if self.bidirectional:
            raise FlagError(
                "--bidirectional",
                "a bidirectional layer reads the characters it must predict (the backward "
                "direction sees the future), so it cannot train a left-to-right language "
                "model; drop the flag.",
            )


@dataclass(frozen=True)
class TrainingConfig(Section):
    lr: float = setting(1.0, "SGD learning rate.")
    clip: float = setting(1.0, "Gradient clipping: max global L2 norm.")
    epochs: int = setting(500, "Passes over the training text.")
    max_steps: int = setting(
        0,
        "Train this many minibatches in all, over as many passes as that takes, instead of "
        "--epochs (0: --epochs decides); for corpora where one pass takes hours. Reports come "
        "every --eval-every steps then.",
    )
    eval_every: int = setting(
        500,
        "With --max-steps: steps between reports (training and validation figures, then "
        "--sample-every and --checkpoint-every count reports).",
    )
    seed: int = setting(0, "Seeds the weights and the (shared) minibatch layout.")

    def check(self, world_size: int) -> None:
        super().check(world_size)
        _positive("--epochs", self.epochs)
        _positive("--eval-every", self.eval_every)
        if self.max_steps < 0:
            raise FlagError(
                "--max-steps", f"got {self.max_steps}; pass 0 (train --epochs) or more."
            )
        if not self.lr > 0:
            raise FlagError("--lr", f"got {self.lr}; the learning rate must be > 0, e.g. --lr 1.")
        if not self.clip > 0:
            raise FlagError("--clip", f"got {self.clip}; the clipping norm must be > 0, e.g. 1.")


@dataclass(frozen=True)
class RuntimeConfig(Section):
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    dist_timeout: float = setting(
        300.0, "Seconds a collective waits for a lost peer before the job fails."
    )
    outage_timeout: float = setting(
        120.0,
        "Seconds an unreachable (or 5xx-answering) MLflow server or corpus host is retried at "
        "start before the job exits 203, the code its launcher retries.",
    )
    cpu_kernel: str = setting(
        "auto",
        "The chapter's model on an x86-64 CPU: compiled (the optional kernel extension, built "
        "on first use), torch (the framework's layers) or auto (compiled where it applies and "
        "builds).",
        choices=CPU_KERNELS,
    )
    autocast: str = setting(
        "off", "CUDA only: bf16 autocast of the forward pass (off: exact fp32).",
        choices=("off", "bf16"),
    )  # fmt: skip
    cuda_graphs: bool = setting(
        False, "CUDA only, one process: replay the training step as one captured CUDA graph."
    )

    def check(self, world_size: int) -> None:
        super().check(world_size)
        _positive_seconds("--dist-timeout", self.dist_timeout)
        if not (self.outage_timeout >= 0 and math.isfinite(self.outage_timeout)):
            raise FlagError("--outage-timeout", f"got {self.outage_timeout}; pass 0 or more.")
        if self.cuda_graphs and world_size > 1:
            raise FlagError(
                "--cuda-graphs",
                f"the captured step runs in one process, not {world_size}; drop the flag or "
                "run without torchrun.",
            )
        if self.device == "cpu":
            self.check_device("cpu")

    def check_device(self, device_type: str) -> None:
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


@dataclass(frozen=True)
class CheckpointConfig(Section):
    checkpoint_dir: str | None = setting(
        None,
        "Keep checkpoints here and resume from the newest on start (a shared volume under "
        "Kubernetes) [default: no checkpoints].",
        envvar="RNNLM_CHECKPOINT_DIR",
    )
    checkpoint_every: int = setting(
        1,
        "Checkpoint every N epochs (with --max-steps: reports; or steps, see "
        "--checkpoint-unit); SIGTERM always does.",
    )
    checkpoint_unit: str = setting(
        "epoch", "What --checkpoint-every counts.", choices=("epoch", "step")
    )
    keep_checkpoints: int = setting(3, "How many of the newest checkpoints to keep.")
    fresh: bool = setting(False, "Start over: delete an earlier job's checkpoints (--job-id).")
    job_id: str | None = setting(
        None, "Restarts and retries of one job share it: --fresh resumes their checkpoints "
        "[default: torchrun's --rdzv-id, else each run is new].", envvar="RNNLM_JOB_ID",
    )  # fmt: skip

    def check(self, world_size: int) -> None:
        super().check(world_size)
        _positive("--checkpoint-every", self.checkpoint_every)
        _positive("--keep-checkpoints", self.keep_checkpoints)


@dataclass(frozen=True)
class OutputConfig(Section):
    output_dir: str = setting(
        "runs/rnnlm",
        "Where the final model (weights, config, vocabulary) is written.",
        envvar="RNNLM_OUTPUT_DIR",
    )
    sample_every: int = setting(
        10, "Print a greedy sample every N epochs (with --max-steps: every N reports)."
    )
    # Periodic samples start from the first prefix; the final samples from all of them.
    sample_prefixes: tuple[str, ...] = setting(
        ("time traveller", "traveller"),
        "Prefix(es) to sample from; periodic samples use the first.",
        flag="--sample-prefix",
    )
    num_sample_chars: int = setting(50, "Characters generated per sample.")
    log_every: int = setting(
        10, "Log a line every N epochs or reports (when no progress bar is shown)."
    )

    def check(self, world_size: int) -> None:
        super().check(world_size)
        _positive("--sample-every", self.sample_every)
        _positive("--log-every", self.log_every)
        if not 0 <= self.num_sample_chars <= MAX_SAMPLE_CHARS:
            raise FlagError(
                "--num-sample-chars",
                f"got {self.num_sample_chars}; pass 0 to {MAX_SAMPLE_CHARS} (longer texts: "
                "python -m jobs.sample).",
            )
        if not self.sample_prefixes or not all(self.sample_prefixes):
            raise FlagError("--sample-prefix", "pass one or more non-empty prefixes.")


@dataclass(frozen=True)
class TrackingConfig(Section):
    tracking: bool = setting(True, "Record the run in MLflow and register the final model.")
    tracking_uri: str | None = setting(
        None,
        "MLflow server URL or store URI [default: MLflow's local sqlite store].",
        envvar="MLFLOW_TRACKING_URI",
    )
    experiment: str = setting("rnnlm", "MLflow experiment name.", envvar="MLFLOW_EXPERIMENT_NAME")
    run_name: str | None = setting(None, "MLflow run name [default: generated].")
    registered_model_name: str = setting(
        "rnnlm-timemachine", "Model Registry name for the final model."
    )
    alias: str = setting("candidate", "Registry alias set on the new version.")
    parent_run_id: str | None = setting(
        None, "Record the run as a child of this MLflow run (a sweep's trial)."
    )
    tags: tuple[str, ...] = setting((), "KEY=VALUE: a tag on the run (repeatable).", flag="--tag")
    tracking_timeout: float = setting(
        300.0, "Seconds to wait at the end for an unreachable tracking server."
    )

    def check(self, world_size: int) -> None:
        super().check(world_size)
        if not (self.tracking_timeout >= 0 and math.isfinite(self.tracking_timeout)):
            raise FlagError("--tracking-timeout", f"got {self.tracking_timeout}; pass 0 or more.")
        for tag in self.tags:
            if not tag.partition("=")[0].strip() or "=" not in tag:
                raise FlagError("--tag", f"got {tag!r}; pass KEY=VALUE, e.g. --tag trial=3.")

    def run_tags(self) -> dict[str, str]:
        """The run's own tags: ``--tag`` pairs, and its parent's id (MLflow's nesting tag)."""
        tags = dict(tag.split("=", 1) for tag in self.tags)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags


@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training job, one section per component."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from flag-named values (``num_hiddens=64``); missing ones keep defaults."""
        unknown = set(values) - set(flat_fields())
        if unknown:
            raise KeyError(f"unknown settings {sorted(unknown)}")
        parts: dict[str, Any] = {}
        for name, section in _section_types().items():
            mine = {f.name: values[f.name] for f in dataclasses.fields(section) if f.name in values}
            parts[name] = section(**mine)
        return cls(**parts)

    def to_flat(self) -> dict[str, Any]:
        """Every setting by its flat name: what MLflow's params and the artifacts record."""
        flat: dict[str, Any] = {}
        for name in _section_types():
            flat.update(dataclasses.asdict(getattr(self, name)))
        flat.pop("vocab_size")
        return {k: redact(v) if isinstance(v, str) else v for k, v in flat.items()}

    def validate(self, world_size: int = 1) -> None:
        for name in _section_types():
            getattr(self, name).check(world_size)


def _section_types() -> dict[str, type[Section]]:
    return {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


def flat_fields() -> dict[str, dataclasses.Field[Any]]:
    """Every command-line setting by its flat name, in declaration order."""
    return {
        f.name: f
        for section in _section_types().values()
        for f in dataclasses.fields(section)
        if f.metadata.get("cli", True)
    }


def _positive(flag: str, value: float) -> None:
    if not value > 0:
        raise FlagError(flag, f"got {value}; it must be greater than 0.")


def _positive_seconds(flag: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise FlagError(flag, f"got {value}; pass a finite number of seconds, e.g. 300.")


def _is_sha1(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdefABCDEF" for c in text)
