"""A sweep: training jobs over a grid or a seeded random sample of training flags, recorded as
one MLflow parent run with a child run per trial.

    python -m jobs.sweep --spec sweep.yaml          # every trial here, one after another
    python -m jobs.sweep --spec sweep.yaml --sweep-id ID --trial 3   # one trial (a pod of an
                                                    # Indexed Job: --trial $JOB_COMPLETION_INDEX)

The spec (YAML)::

    name: lr-and-width
    experiment: rnnlm-sweeps          # default
    base: {corpus: timemachine.txt, epochs: 20, max_tokens: 10000}   # every trial's flags
    grid: {lr: [0.5, 1.0], num_hiddens: [64, 256]}                  # every combination
    # or: random: {trials: 8, seed: 0, space: {lr: {log_uniform: [0.1, 2]}, cell: [rnn, gru]}}
    promote: champion                 # optional: the best trial's model may take this alias

Flags use the training job's names with '_'. Every trial's settings are checked before any
trial starts: an unknown flag or a value the training job would refuse is one line, exit 2.

Each trial is ``python -m jobs.train`` with its settings, ``--parent-run-id`` (the parent
run, found or created by the sweep id, so the pods of an Indexed Job share it) and the tags
``sweep_id`` and ``trial``. A trial that fails (a learning rate so large that the loss becomes
NaN, say) is marked failed and the others go on. After each trial the comparison is logged on
the parent (``comparison.json``, a table of the swept flags, final train and validation
perplexity and tokens/s per trial, and the best trial as tags); when every trial has ended the
parent is finished and, with ``promote``, the best trial's registered version is handed to
``jobs.evaluate --promote``. Exit status: the trial's (one trial), else 0 if any trial finished.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any

import click

from jobs.common import EXIT_TRANSIENT, setup_logging, user_errors
from jobs.flags import config_from_values
from rnnlm.errors import FlagError
from rnnlm.resume import EXIT_PREEMPTED
from rnnlm.tracking import check_server, resolve_uri

SPEC_KEYS = {"name", "experiment", "base", "grid", "random", "promote"}
ROLE, SWEEP_ID, TRIAL = "rnnlm.sweep_role", "sweep_id", "trial"


@click.command(context_settings={"show_default": True, "max_content_width": 100})
@click.option("--spec", required=True, type=click.Path(dir_okay=False), help="The sweep (YAML).")
@click.option("--sweep-id", default=None, envvar="RNNLM_SWEEP_ID",
              help="Shared by all pods of one sweep [default: a new one].")  # fmt: skip
@click.option("--trial", type=int, default=None, help="Run this trial only (0-based).")
@click.option("--work-dir", default="runs/sweeps", help="Trials' models and logs go under it.")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", help="MLflow.")
@click.option("--outage-timeout", type=float, default=120.0,
              help="Seconds an unreachable MLflow server is retried at start.")  # fmt: skip
def main(**flags: Any) -> None:
    """Run a sweep's trials as child runs of one parent run, and compare them."""
    with user_errors(ranked=False):
        setup_logging(0, True)
        spec = read_spec(Path(flags["spec"]))
        trials = expand(spec)
        if flags["trial"] is not None and not 0 <= flags["trial"] < len(trials):
            raise FlagError("--trial", f"got {flags['trial']}; the spec has trials 0 to "
                            f"{len(trials) - 1}.")  # fmt: skip
        if flags["trial"] is not None and not flags["sweep_id"]:
            raise FlagError("--sweep-id", "one trial of a sweep needs the sweep's id, which all "
                            "its trials share (e.g. the Job's name).")  # fmt: skip
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        uri = resolve_uri(flags["tracking_uri"])
        check_server(uri, flags["outage_timeout"])
        import mlflow

        mlflow.set_tracking_uri(uri)
        sweep_id = flags["sweep_id"] or uuid.uuid4().hex[:12]
        parent = parent_run(spec, sweep_id, len(trials))
        chosen = range(len(trials)) if flags["trial"] is None else [flags["trial"]]
        codes = [run_trial(spec, trials, i, parent, sweep_id, uri, flags) for i in chosen]
        click.echo(summarize(spec, parent, trials, uri))
    if flags["trial"] is not None:
        sys.exit(codes[0])
    sys.exit(0 if 0 in codes else 1)


def read_spec(path: Path) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise FlagError("--spec", f"cannot read {path}: {exc}".splitlines()[0]) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise FlagError("--spec", "a sweep is a YAML mapping with a name, base flags and a grid "
                        "or random section; see python -m jobs.sweep --help.")  # fmt: skip
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown or ("grid" in spec) == ("random" in spec):
        raise FlagError("--spec", f"keys {sorted(SPEC_KEYS)} are known (got {unknown or 'none'} "
                        "unknown), and exactly one of grid and random is needed.")  # fmt: skip
    return spec


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial's swept settings, each checked with the base as a training job would."""
    if "grid" in spec:
        grid = spec["grid"]
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise FlagError("--spec", "grid: a mapping of flags to non-empty lists of values.")
        trials = [
            dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
        ]
    else:
        trials = _random_trials(spec["random"])
    base = spec.get("base") or {}
    for i, trial in enumerate(trials):
        try:
            config_from_values({**base, **trial}, "--spec")
        except FlagError as exc:
            raise FlagError("--spec", f"trial {i} {trial}: {exc}".replace("--spec: ", "")) from None
    return trials


def _random_trials(section: Any) -> list[dict[str, Any]]:
    if not isinstance(section, dict) or not isinstance(section.get("space"), dict):
        raise FlagError("--spec", "random: a mapping with trials, seed and space.")
    rng = random.Random(section.get("seed", 0))
    trials = []
    for _ in range(int(section.get("trials", 4))):
        trial = {}
        for flag, dist in section["space"].items():
            if isinstance(dist, list) and dist:
                trial[flag] = rng.choice(dist)
            elif isinstance(dist, dict) and len(dist) == 1 and "uniform" in dist:
                trial[flag] = rng.uniform(*dist["uniform"])
            elif isinstance(dist, dict) and len(dist) == 1 and "log_uniform" in dist:
                low, high = dist["log_uniform"]
                trial[flag] = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                raise FlagError("--spec", f"random.space.{flag}: a list of choices, "
                                "{uniform: [a, b]} or {log_uniform: [a, b]}.")  # fmt: skip
        trials.append(trial)
    return trials


def _experiment_id(name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    return str(found.experiment_id if found else client.create_experiment(name))


def parent_run(spec: dict[str, Any], sweep_id: str, num_trials: int) -> str:
    """The sweep's parent run, created by whichever trial comes first. Two pods creating it at
    once both look again afterwards and keep the oldest, deleting the other."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _experiment_id(spec.get("experiment", "rnnlm-sweeps"))
    query = f"tags.{SWEEP_ID} = '{sweep_id}' and tags.`{ROLE}` = 'parent'"
    if not client.search_runs([experiment_id], query):
        tags = {SWEEP_ID: sweep_id, ROLE: "parent", "trials": str(num_trials)}
        run_id = client.create_run(experiment_id, run_name=spec["name"], tags=tags).info.run_id
        client.log_text(run_id, json.dumps(spec, indent=2), "sweep.json")
    found = sorted(client.search_runs([experiment_id], query),
                   key=lambda r: (r.info.start_time, r.info.run_id))  # fmt: skip
    for extra in found[1:]:
        client.delete_run(extra.info.run_id)
    return str(found[0].info.run_id)


def run_trial(
    spec: dict[str, Any],
    trials: list[dict[str, Any]],
    index: int,
    parent: str,
    sweep_id: str,
    uri: str,
    flags: dict[str, Any],
) -> int:
    """Train trial ``index`` as a child run; mark it failed if the job failed."""
    work = Path(flags["work_dir"]) / sweep_id
    work.mkdir(parents=True, exist_ok=True)
    config = work / f"trial-{index}.json"
    config.write_text(json.dumps({**(spec.get("base") or {}), **trials[index]}))
    command = [
        sys.executable, "-m", "jobs.train", "--config", str(config),
        "--experiment", spec.get("experiment", "rnnlm-sweeps"), "--tracking-uri", uri,
        "--parent-run-id", parent, "--tag", f"{SWEEP_ID}={sweep_id}", "--tag", f"{TRIAL}={index}",
        "--run-name", f"{spec['name']}-{index}", "--output-dir", str(work / f"trial-{index}"),
    ]  # fmt: skip
    with open(work / f"trial-{index}.log", "w") as log:
        code = _run_forwarding_signals(command, log)
    if code not in (0, EXIT_PREEMPTED, EXIT_TRANSIENT):  # those two are retried: not failed
        lines = (work / f"trial-{index}.log").read_text().strip().splitlines()
        _mark_failed(spec, parent, sweep_id, index, lines[-1] if lines else f"exit {code}")
    click.echo(f"trial {index} {trials[index]}: {'finished' if code == 0 else f'failed ({code})'}",
               err=True)  # fmt: skip
    return code


def _run_forwarding_signals(command: list[str], log: IO[str]) -> int:
    """Run the trial; a SIGTERM or SIGINT to the sweep (a pod deleted or preempted) goes to the
    trial, which checkpoints and exits 143 as a training job does."""
    trial = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    forward = lambda signum, _frame: trial.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return trial.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _mark_failed(spec: dict[str, Any], parent: str, sweep_id: str, index: int, why: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _experiment_id(spec.get("experiment", "rnnlm-sweeps"))
    query = f"tags.mlflow.parentRunId = '{parent}' and tags.{TRIAL} = '{index}'"
    runs = client.search_runs([experiment_id], query)
    if runs:
        run_id = runs[0].info.run_id
    else:  # it failed before its run was created
        tags = {"mlflow.parentRunId": parent, SWEEP_ID: sweep_id, TRIAL: str(index)}
        run_id = client.create_run(experiment_id, run_name=f"{spec['name']}-{index}",
                                   tags=tags).info.run_id  # fmt: skip
    client.set_tag(run_id, "error", why[:500])
    client.set_terminated(run_id, "FAILED")


def summarize(spec: dict[str, Any], parent: str, trials: list[dict[str, Any]], uri: str) -> str:
    """The comparison on the parent run, from every trial's child run so far; when all have
    ended, the parent finished and (with ``promote``) the best model handed on."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _experiment_id(spec.get("experiment", "rnnlm-sweeps"))
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    rows = []
    for run in sorted(children, key=lambda r: int(r.data.tags.get(TRIAL, -1))):
        index = int(run.data.tags.get(TRIAL, -1))
        metrics = run.data.metrics
        rows.append({
            "trial": index, **(trials[index] if 0 <= index < len(trials) else {}),
            "status": run.info.status, "run_id": run.info.run_id,
            "train_perplexity": metrics.get("train_perplexity"),
            "val_perplexity": metrics.get("val_perplexity"),
            "tokens_per_s": metrics.get("tokens_per_s"),
        })  # fmt: skip
    finished = [r for r in rows if r["status"] == "FINISHED"]
    key = "val_perplexity" if all(r["val_perplexity"] is not None for r in finished) else (
        "train_perplexity")  # fmt: skip
    best = min(finished, key=lambda r: r[key], default=None)
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "comparison.json"
        table.write_text(json.dumps(rows, indent=2))
        client.log_artifact(parent, str(table))
    ended = len(rows) == len(trials) and all(r["status"] in ("FINISHED", "FAILED") for r in rows)
    if best is not None:
        client.set_tag(parent, "best_trial", str(best["trial"]))
        client.set_tag(parent, "best_run_id", best["run_id"])
        client.log_metric(parent, f"best_{key}", best[key])
    if not ended:
        return f"{len(rows)} of {len(trials)} trials recorded; the comparison is on run {parent}"
    client.set_terminated(parent, "FINISHED" if finished else "FAILED")
    if best is None:
        return f"every trial failed; see run {parent}"
    line = (f"{len(finished)} of {len(trials)} trials finished; best: trial {best['trial']} "
            f"{trials[best['trial']]}, {key} {best[key]:.4f} (run {best['run_id']})")  # fmt: skip
    if spec.get("promote"):
        line += "\n" + _promote(spec, best["run_id"], uri)
    return line


def _promote(spec: dict[str, Any], run_id: str, uri: str) -> str:
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return f"the best trial registered no model: nothing to promote to @{spec['promote']}"
    version = max(versions, key=lambda v: int(v.version))
    base = spec.get("base") or {}
    command = [sys.executable, "-m", "jobs.evaluate", "--tracking-uri", uri,
               "--model-uri", f"models:/{version.name}/{version.version}",
               "--promote", str(spec["promote"])]  # fmt: skip
    for flag in ("corpus", "corpus_sha1", "cache_dir"):
        if base.get(flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(base[flag])]
    done = subprocess.run(command, capture_output=True, text=True)
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[-1] if out else f"promotion exited {done.returncode}"


if __name__ == "__main__":
    main()
