"""Where a job reports what happened: MLflow on the main rank, nothing elsewhere.

The tracker is chosen once per process (:func:`make_tracker`): the main rank gets an
:class:`MlflowTracker`, the first rank of every other node a :class:`NodeMetrics` (its node's
system metrics), every other rank a :class:`Tracker` that records nothing, so call sites stay
unconditional and no rank-0-only code ever calls a collective.

Tracking must neither slow nor kill training. Everything after the start-up check is handed to
one background thread that sends records in order and, while the server is unreachable, keeps
them and retries: a failure mid-run is a logged warning, and once the server is back the
remaining epochs and the model still arrive. At the end the job waits at most
``--tracking-timeout`` seconds for what is still queued; the model is saved locally regardless.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from rnnlm import __version__
from rnnlm.config import TrackingConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import Outage, Transient, UserError, is_refusal, redact
from rnnlm.records import EpochStats, History

log = logging.getLogger(__name__)

# While training, epoch metrics go out at most once per this many seconds, and only the newest
# epoch's: the UI follows the run live, a few seconds behind. The other epochs' rows follow when
# the run closes, all in one go. Every call costs the store CPU that training shares, and the
# chapter's epochs are short, so a call per epoch would slow training noticeably.
METRICS_EVERY_S = 5.0
MAX_METRICS_PER_CALL = 1000  # MLflow's limit for one log_batch


class Tracker:
    """What a job reports, where: this base records nothing (what non-main ranks and
    ``--no-tracking`` get); :class:`MlflowTracker` records to MLflow."""

    run_id: str | None = None

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None: ...
    def log_dataset(self, source: str, sha1: str, num_tokens: int) -> None: ...
    def log_epoch(self, stats: EpochStats, extra: dict[str, float]) -> None:
        """``extra``: metrics of the epoch beyond ``stats`` (validation)."""

    def log_sample(self, epoch: int, prefix: str, text: str) -> None: ...
    def log_artifact_text(self, text: str, path: str) -> None: ...
    def log_model(self, model_dir: Path, summary: dict[str, float]) -> None: ...
    def resume(self, history: History) -> None: ...
    def close(self, status: str) -> None: ...
    def wait_sent(self, timeout: float) -> bool:
        return True


def dataset_inputs(
    source: str, sha1: str, num_tokens: int, context: str, name: str | None = None
) -> list[Any]:
    """A run's input: the corpus (or a slice of it, ``name``) by its sha1, for ``context``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = redact(source)
    kind = "http" if source.startswith(("http://", "https://")) else "local"
    dataset = Dataset(
        name=name or Path(source).name or "corpus",
        digest=sha1[:10],
        source_type=kind,
        source=json.dumps({"url" if kind == "http" else "uri": source}),
        profile=json.dumps({"num_tokens": num_tokens, "sha1": sha1}),
    )
    return [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]


def resolve_uri(uri: str | None) -> str:
    import mlflow

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def check_server(uri: str, retry_for: float) -> None:
    """Before any training: fail if the server refuses us (a user mistake), wait up to
    ``retry_for`` seconds for one that is down, restarting or failing with 5xx (an outage).
    MLflow's own client makes the call, so every way it authenticates works here too (user and
    password, ``MLFLOW_TRACKING_TOKEN``, ``~/.mlflow/credentials``, its TLS settings)."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient

    outage, where = Outage(retry_for, log), redact(uri)
    while True:
        try:
            MlflowClient(uri).search_experiments(max_results=1)
            return
        except Exception as exc:
            error, status = exc, refusal(exc)
        if status in (401, 403):
            raise UserError(
                f"--tracking-uri: the MLflow server at {where} refused {_who()} (HTTP {status}); "
                "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) to a valid account."
            )
        if status is not None:
            raise UserError(f"--tracking-uri: {where} answered HTTP {status}; is it MLflow?")
        outage.wait(
            f"MLflow at {where} is not answering ({_first_line(error)})",
            f"--tracking-uri: cannot reach the MLflow tracking server at {where} for "
            f"{retry_for:.0f} s (--outage-timeout; {_first_line(error)}); start it, fix "
            "--tracking-uri / MLFLOW_TRACKING_URI, or pass --no-tracking.",
        )


def refusal(exc: BaseException) -> int | None:
    """The HTTP status of a refusal that the same request would get again (a 4xx other than
    408, 409 and 429: bad input, a missing permission); None for what is worth retrying (no
    connection, a timeout, a 5xx, or any other failure)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    elif isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code  # artifact uploads
    else:
        return None
    return status if is_refusal(status) else None


def _who() -> str:
    from mlflow.utils.credentials import read_mlflow_creds

    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return "the token in MLFLOW_TRACKING_TOKEN"
    user = read_mlflow_creds().username
    return f"the credentials of user {user!r}" if user else "a request without credentials"


def _first_line(exc: BaseException) -> str:
    """What went wrong, short: MLflow wraps a refused connection or an HTTP error in long
    messages (the URL, the retry policy, the whole body)."""
    text = str(exc)
    if cause := re.search(r"\[Errno -?\d+\] ([^'\")]+)", text):
        return cause[1]
    if cause := re.search(r"error code (\d{3}) != \d+\. Response body: '(.{0,100})", text):
        return f"HTTP {cause[1]}: {cause[2].rstrip(chr(39))}"
    if re.search(r"time[d ]? ?out", text, re.I):
        return "timed out"
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=cwd
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class _Sender(threading.Thread):
    """Runs tracking calls in order on one thread, retrying each until it succeeds."""

    def __init__(self) -> None:
        super().__init__(name="mlflow-sender", daemon=True)
        self.tasks: queue.Queue[tuple[str, Callable[[], object]] | None] = queue.Queue()
        self.deadline: float | None = None  # set at close: give up retrying after it
        self.failed: list[str] = []  # given up at the deadline: an outage
        self.refused: list[str] = []  # refused by the server (a 4xx): never retried

    def submit(self, what: str, task: Callable[[], object]) -> None:
        self.tasks.put((what, task))

    def run(self) -> None:
        while (item := self.tasks.get()) is not None:
            what, task = item
            self._run_with_retries(what, task)
            self.tasks.task_done()

    def wait_sent(self, timeout: float) -> bool:
        """Wait until every record submitted so far is sent (or given up), at most ``timeout``
        seconds; whether it was."""
        deadline = time.monotonic() + timeout
        with self.tasks.all_tasks_done:
            while self.tasks.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.tasks.all_tasks_done.wait(left)
        return True

    def _run_with_retries(self, what: str, task: Callable[[], object]) -> None:
        delay, warned = 1.0, False
        while True:
            try:
                task()
                if warned:
                    log.warning("MLflow reachable again; sent %s", what)
                return
            except Exception as exc:  # any failure of the server or the network
                if refusal(exc) is not None:  # the same call would be refused again
                    log.error("MLflow refused %s (%s); not retried", what, _first_line(exc))
                    self.refused.append(f"{what} ({_first_line(exc)})")
                    return
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self.failed.append(what)
                    return
                if not warned:
                    log.warning("MLflow call failed (%s); training continues, retrying %s",
                                _first_line(exc), what)  # fmt: skip
                    warned = True
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def close(self, timeout: float) -> list[str]:
        self.deadline = time.monotonic() + timeout
        self.tasks.put(None)
        self.join(timeout + 30)
        pending = []
        while not self.tasks.empty():
            item = self.tasks.get_nowait()
            if item is not None:
                pending.append(item[0])
        return self.failed + pending


class MlflowTracker(Tracker):
    """One MLflow run for the whole job, written by the main rank only."""

    def __init__(
        self,
        settings: TrackingConfig,
        run_id: str | None = None,
        retry_for: float = 0.0,
        node: str | None = None,
    ) -> None:
        """``node``: the label of this node's system metrics in a job of several nodes."""
        import mlflow
        from mlflow import MlflowClient

        # We retry in our own thread; MLflow's own retries would stall each call for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # log lines only
        self.settings = settings
        self.uri = resolve_uri(settings.tracking_uri)
        if redact(self.uri) != self.uri:  # MLflow prints a run's URL, credentials and all
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        check_server(self.uri, retry_for)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        try:
            run_id = self._open(run_id)
        except Exception as exc:
            if refusal(exc) is None:
                failed = f"--tracking-uri: MLflow failed at start ({_first_line(exc)})"
                raise Transient(failed) from None
            raise UserError(
                f"--experiment: MLflow refused to open a run in {settings.experiment!r} "
                f"({_first_line(exc)}); give the account edit rights on it, or pass another."
            ) from None
        self.run_id: str | None = run_id
        self._run_id = run_id
        self.history: list[EpochStats] = []
        self.val_history: list[tuple[int, float]] = []
        self.samples: list[tuple[int, str, str]] = []
        self.logged_epochs: set[int] = set()  # epochs a resumed job must not log again
        self.last_lr: float | None = None  # the last learning rate logged
        self.pending_metrics: list[Any] = []  # epoch metrics not yet taken by a send
        self.deferred_metrics: list[Any] = []  # older epochs' rows, sent at close (sender only)
        self.pending_lock = threading.Lock()
        self.next_metrics_send = 0.0  # time.monotonic() before which no batch goes out
        # Set once training is over: a metrics send waiting out its interval goes at once, or
        # the end of every job would wait up to METRICS_EVERY_S for it.
        self.finishing = threading.Event()
        self.sender = _Sender()
        self.sender.start()
        self.system_metrics = start_system_metrics(run_id, self.uri, node)
        log.info("tracking to %s, run %s", redact(self.uri), run_id)

    def _open(self, run_id: str | None) -> str:
        """The run of the job this one resumes, continued; else a new run."""
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception as exc:
                if refusal(exc) is None:
                    raise
                log.warning("cannot continue MLflow run %s (%s); starting a new run", run_id, exc)
        name = self.settings.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(name)
        )
        parent = self.settings.parent_run_id
        if parent:
            try:
                self.client.get_run(parent)
            except Exception as exc:
                if refusal(exc) is None:
                    raise
                raise UserError(f"--parent-run-id: no MLflow run {parent} on this server; "
                                "pass the id of the sweep's parent run.") from None  # fmt: skip
        run = self.client.create_run(
            experiment_id, run_name=self.settings.run_name, tags=self.settings.run_tags()
        )
        return str(run.info.run_id)

    # -- records, all sent by the background thread ------------------------------------------

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        params = [
            Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in config.items()
        ]
        run_tags = [RunTag(k, v) for k, v in tags.items()]
        self.sender.submit(
            "params", lambda: self.client.log_batch(self._run_id, params=params, tags=run_tags)
        )
        self.log_artifact_text(json.dumps(config, indent=2), "config.json")

    def log_dataset(self, source: str, sha1: str, num_tokens: int) -> None:
        inputs = dataset_inputs(source, sha1, num_tokens, "training")
        self.sender.submit("dataset", lambda: self.client.log_inputs(self._run_id, inputs))

    def resume(self, history: History) -> None:
        """Continue the run: what the interrupted job logged stays, what it lost is re-sent."""
        logged = self.client.get_metric_history(self._run_id, "train_perplexity")
        self.logged_epochs = {m.step for m in logged}
        for stats, extra in zip(history.epochs, history.extra_metrics, strict=True):
            self.log_epoch(stats, extra)  # skips the epochs the server already has
        for epoch, prefix, text in history.samples:
            self.log_sample(epoch, prefix, text)
        log.info("continuing MLflow run %s after epoch %d", self._run_id, len(history.epochs))

    def log_epoch(self, stats: EpochStats, extra: dict[str, float]) -> None:
        from mlflow.entities import Metric

        self.history.append(stats)
        if "val_perplexity" in extra:
            self.val_history.append((stats.epoch, extra["val_perplexity"]))
        if stats.epoch in self.logged_epochs:  # a resumed job recomputed it identically
            return
        now = int(time.time() * 1000)
        # Every row costs the store CPU, and the chapter's epochs are short. So no row says what
        # another does: the learning rate only when it changes, each rank's rate only with
        # several ranks, and epoch seconds are tokens over tokens_per_s.
        by_rank = stats.tokens_per_s_by_rank if len(stats.tokens_per_s_by_rank) > 1 else ()
        values = {
            "train_perplexity": stats.perplexity,
            "train_bpc": math.log2(stats.perplexity),  # bits per character
            "tokens_per_s": stats.tokens_per_s,
            "grad_norm": stats.grad_norm,
            **{f"rank{r}_tokens_per_s": rate for r, rate in enumerate(by_rank)},
            **extra,
        }
        if stats.lr != self.last_lr:
            values["lr"] = self.last_lr = stats.lr
        metrics = [Metric(k, float(v), now, stats.epoch) for k, v in values.items()]
        with self.pending_lock:
            send_queued = bool(self.pending_metrics)  # a queued send will take these too
            self.pending_metrics.extend(metrics)
        if not send_queued:
            self.sender.submit(f"metrics from epoch {stats.epoch}", self._metrics_send())

    def _metrics_send(self) -> Callable[[], None]:
        """A sender task: wait out the interval, take every pending metric, send the newest
        epoch's and keep the rest for :meth:`_deferred_send`. A retry sends the same metrics
        again, from the first call that did not succeed."""
        batch: list[Any] = []

        def send() -> None:
            if not batch:
                self.finishing.wait(max(0.0, self.next_metrics_send - time.monotonic()))
                with self.pending_lock:
                    taken, self.pending_metrics = self.pending_metrics, []
                if not taken:
                    return
                newest = max(m.step for m in taken)
                batch.extend(m for m in taken if m.step == newest)
                self.deferred_metrics.extend(m for m in taken if m.step != newest)
            self._send_metrics(batch)
            self.next_metrics_send = time.monotonic() + METRICS_EVERY_S

        return send

    def _deferred_send(self) -> Callable[[], None]:
        """A sender task, the last of the metrics: every row the live sends left out."""
        batch: list[Any] = []

        def send() -> None:
            if not batch:
                batch.extend(self.deferred_metrics)
                self.deferred_metrics.clear()
            self._send_metrics(batch)

        return send

    def _send_metrics(self, batch: list[Any]) -> None:
        """Send ``batch`` in MLflow's largest calls, dropping what went out from its front: a
        retry resumes from the first call that did not succeed."""
        while batch:
            self.client.log_batch(self._run_id, metrics=batch[:MAX_METRICS_PER_CALL])
            del batch[:MAX_METRICS_PER_CALL]

    def log_sample(self, epoch: int, prefix: str, text: str) -> None:
        self.samples.append((epoch, prefix, text))
        lines = [t for e, _, t in self.samples if e == epoch]
        self.log_artifact_text("\n".join(lines) + "\n", f"samples/epoch_{epoch:04d}.txt")

    def log_artifact_text(self, text: str, path: str) -> None:
        self.sender.submit(path, lambda: self.client.log_text(self._run_id, text, path))

    def log_model(self, model_dir: Path, summary: dict[str, float]) -> None:
        from rnnlm import registry

        self.finishing.set()
        rows = {
            "epoch": [e for e, _, _ in self.samples],
            "prefix": [p for _, p, _ in self.samples],
            "text": [t for _, _, t in self.samples],
        }
        self.sender.submit(
            "samples table", lambda: self.client.log_table(self._run_id, rows, "samples.json")
        )
        figure_png = self._perplexity_plot()
        self.sender.submit(
            "perplexity plot",
            lambda: self.client.log_image(self._run_id, figure_png, "perplexity.png"),
        )
        self.sender.submit(
            "registered model",
            lambda: registry.log_and_register(
                self._run_id,
                model_dir,
                self.settings.registered_model_name,
                self.settings.alias,
                summary,
            ),
        )

    def _perplexity_plot(self) -> Any:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from PIL import Image

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            [s.epoch for s in self.history], [s.perplexity for s in self.history], label="train"
        )
        if self.val_history:
            ax.plot(*zip(*self.val_history, strict=True), label="validation")
        ax.set(xlabel="epoch", ylabel="perplexity", yscale="log", title="rnnlm perplexity")
        ax.legend()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB"))

    def wait_sent(self, timeout: float) -> bool:
        return self.sender.wait_sent(timeout)

    def close(self, status: str) -> None:
        """``status``: FINISHED, FAILED, or RUNNING (preempted: a retry continues the run)."""
        self.finishing.set()
        if self.system_metrics is not None:
            last = last_system_metrics(self.system_metrics)
            send = functools.partial(self.client.log_batch, self._run_id, metrics=last)
            self.sender.submit("system metrics", send)
        self.sender.submit("the other epochs' metrics", self._deferred_send())
        if status != "RUNNING":
            self.sender.submit(
                "run status", lambda: self.client.set_terminated(self._run_id, status=status)
            )
        # A failing or preempted job must exit soon: the launcher kills it after ~30 s anyway.
        timeout = self.settings.tracking_timeout if status == "FINISHED" else 10.0
        unsent, refused = self.sender.close(timeout), self.sender.refused
        what = ", ".join(unsent[:5])
        if status != "FINISHED":  # an exception is on its way out: it says what happened
            if unsent:
                log.warning("MLflow unreachable for %.0f s at the end: %d record(s) not sent "
                            "(%s)", timeout, len(unsent), what)  # fmt: skip
        elif refused:
            raise UserError(
                f"--tracking-uri: MLflow refused {'; '.join(refused[:3])}, which no retry can "
                "change. The model is saved in --output-dir; fix the account's permissions (or "
                "the flag the refusal names) and run the same command again to record it."
            )
        elif unsent:
            raise Transient(
                f"--tracking-timeout: MLflow did not take {len(unsent)} record(s) ({what}) "
                f"within {timeout:.0f} s. The model is saved in --output-dir; the same command, "
                "run again, sends them and registers the model (launchers retry exit 203)."
            )


class NodeMetrics(Tracker):
    """The system metrics of a node other than the main rank's (CPU, memory, disk, network, and
    its GPUs where nvidia-ml-py is installed), sent by the node's first rank into the job's one
    run as ``system/<node>/...``: a multi-node job shows every node, not only rank 0's."""

    def __init__(self, settings: TrackingConfig, run_id: str, node: str | None) -> None:
        self.uri, self._run_id = resolve_uri(settings.tracking_uri), run_id
        self.monitor = start_system_metrics(run_id, self.uri, node)

    def close(self, status: str) -> None:
        if self.monitor is None:
            return
        last = last_system_metrics(self.monitor)
        try:
            from mlflow import MlflowClient

            MlflowClient(self.uri).log_batch(self._run_id, metrics=last)
        except Exception as exc:  # a node's last sample is not worth failing a job
            log.warning("this node's last system metrics were not sent: %s", _first_line(exc))


def start_system_metrics(run_id: str, uri: str, node: str | None) -> Any:
    """MLflow's system-metrics monitor for this machine, sampling into ``run_id``; None when
    it cannot start (it is optional: never let it stop training)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", 10))
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True,
                                       node_id=node, tracking_uri=uri)  # fmt: skip
        monitor.start()
        return monitor
    except Exception as exc:
        log.warning("system metrics are off: %s", exc)
        return None


def last_system_metrics(monitor: Any) -> list[Any]:
    """Stop the monitor and take one last sample: it publishes only after a full sampling
    interval, so a run shorter than that would otherwise have none. Nothing if it fails."""
    from mlflow.entities import Metric

    try:
        monitor.finish()
        for part in monitor.monitors:
            part.clear_metrics()
        monitor.collect_metrics()
    except Exception as exc:  # optional, as the monitor is
        log.warning("system metrics did not stop cleanly: %s", exc)
        return []
    now, step = int(time.time() * 1000), getattr(monitor, "_logging_step", 0)
    prefix = f"system/{monitor.node_id}/" if monitor.node_id else "system/"
    return [Metric(prefix + name, float(value), now, step)
            for name, value in monitor.aggregate_metrics().items()]  # fmt: skip


def make_tracker(
    settings: TrackingConfig, info: DistInfo, run_id: str | None = None, retry_for: float = 0.0
) -> Tracker:
    """What this rank records: the main rank, the job's MLflow run (``run_id``: the one to
    continue; ``retry_for``: seconds an unreachable server is waited for); another node's first
    rank, its node's system metrics in the main rank's run ``run_id``; other ranks, nothing."""
    if not settings.tracking:
        return Tracker()
    node = f"node{info.node}" if info.nodes > 1 else None  # labels only where there are several
    if info.is_main:
        return MlflowTracker(settings, run_id, retry_for, node)
    remote = resolve_uri(settings.tracking_uri).startswith(("http://", "https://"))
    if info.local_rank == 0 and node and remote and run_id is not None:
        return NodeMetrics(settings, run_id, node)
    return Tracker()


def standard_tags(
    world_size: int, backend: str | None, device: str, corpus: str, sha1: str
) -> dict[str, str]:
    import torch

    tags = {
        "world_size": str(world_size),
        "backend": backend or "none",
        "device": device,
        "torch_version": torch.__version__,
        "rnnlm_version": __version__,
        "corpus_source": redact(corpus),
        "corpus_sha1": sha1,
    }
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags
