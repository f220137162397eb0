"""Sweeps against a real ``mlflow server``: one parent run with a child run per trial, the
comparison and the best trial on the parent, a diverging trial marked failed while the others
finish, a bad spec refused before any trial, and the Indexed Job's per-pod command giving the
same runs as the local sweep."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, job_env, run_job
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.integration

BASE = {
    "epochs": 3, "num_hiddens": 16, "max_tokens": 3000, "val_tokens": 1000,
    "cpu_kernel": "torch", "sample_every": 100, "registered_model_name": "sweep-model",
}  # fmt: skip


def write_spec(path: Path, corpus: Path, **sections: object) -> Path:
    spec = {"name": "tiny", "base": {**BASE, "corpus": str(corpus)}, **sections}
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def sweep(server: str, spec: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--spec", str(spec), "--tracking-uri", server, "--work-dir", str(work), *args]
    return run_job(flags, module="jobs.sweep", env=job_env())


def runs_of(server: str, experiment: str = "rnnlm-sweeps") -> tuple[list, dict[str, list]]:
    """Parents, and each parent's children by its run id."""
    client = MlflowClient(server)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    parents = [r for r in runs if r.data.tags.get("rnnlm.sweep_role") == "parent"]
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for p in parents
    }
    return parents, children


def comparison(server: str, parent_id: str, tmp: Path) -> list[dict]:
    path = MlflowClient(server).download_artifacts(parent_id, "comparison.json", str(tmp))
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    with mlflow_server(tmp_path_factory.mktemp("sweep-server")) as url:
        yield url


@pytest.fixture(scope="module")
def local_sweep(server: str, corpus_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """Four trials one after another; the last learning rate makes the loss blow up."""
    work = tmp_path_factory.mktemp("sweep")
    spec = write_spec(work / "sweep.yaml", corpus_path, grid={"lr": [0.5, 1.0, 2.0, 1e12]},
                      promote="champion")  # fmt: skip
    proc = sweep(server, spec, work / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, work


def test_a_sweep_is_one_parent_with_a_child_per_trial_and_the_best_named(
    server: str, local_sweep, tmp_path: Path
) -> None:
    proc, _ = local_sweep
    parents, children = runs_of(server)
    assert len(parents) == 1
    parent = parents[0]
    kids = children[parent.info.run_id]
    assert sorted(int(k.data.tags["trial"]) for k in kids) == [0, 1, 2, 3]
    status = {int(k.data.tags["trial"]): k.info.status for k in kids}
    assert status == {0: "FINISHED", 1: "FINISHED", 2: "FINISHED", 3: "FAILED"}
    diverged = next(k for k in kids if k.data.tags["trial"] == "3")
    assert "--lr: the loss became NaN/inf" in diverged.data.tags["error"]

    rows = comparison(server, parent.info.run_id, tmp_path)
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert [r["lr"] for r in rows] == [0.5, 1.0, 2.0, 1e12]
    finished = [r for r in rows if r["status"] == "FINISHED"]
    assert all(r["val_perplexity"] > 1 and r["tokens_per_s"] > 0 for r in finished)
    best = min(finished, key=lambda r: r["val_perplexity"])
    parent = MlflowClient(server).get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == str(best["trial"])
    assert parent.data.metrics["best_val_perplexity"] == pytest.approx(best["val_perplexity"])
    assert f"best: trial {best['trial']}" in proc.stdout
    # The best trial's registered model was handed to the promotion: it is the champion.
    champion = MlflowClient(server).get_model_version_by_alias("sweep-model", "champion")
    assert champion.run_id == best["run_id"]
    assert "promoted" in proc.stdout


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"learning_rate": [1.0]}, r"unknown settings \['learning_rate'\]"),
        ({"lr": [1.0, -1.0]}, r"trial 1 \{'lr': -1.0\}: --lr: got -1.0"),
        ({"num_hiddens": [16, "many"]}, r'trial 1 .*num_hiddens: "many" is not a whole number'),
    ],
    ids=["unknown-flag", "invalid-value", "wrong-type"],
)
def test_a_bad_spec_is_refused_before_any_trial(
    server: str, corpus_path: Path, tmp_path: Path, grid: dict, message: str
) -> None:
    spec = write_spec(tmp_path / "bad.yaml", corpus_path, grid=grid)
    proc = sweep(server, spec, tmp_path / "runs")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: --spec: ") and "Traceback" not in proc.stderr
    assert re.search(message, lines[-1]), lines[-1]
    assert not (tmp_path / "runs").exists()  # no trial started


def test_the_indexed_job_command_as_two_pods_gives_the_same_runs(
    server: str, corpus_path: Path, local_sweep, tmp_path: Path
) -> None:
    """Each "pod" runs ``--trial $JOB_COMPLETION_INDEX`` of one sweep id, at the same time: one
    parent, one child per index, and the same figures as the local sweep's same trials."""
    spec = write_spec(tmp_path / "sweep.yaml", corpus_path, grid={"lr": [0.5, 1.0]})

    def pod(index: int) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "jobs.sweep", "--spec", str(spec), "--tracking-uri", server,
            "--sweep-id", "job-abc", "--trial", str(index), "--work-dir", str(tmp_path / "pod"),
        ]  # fmt: skip
        env = job_env(JOB_COMPLETION_INDEX=str(index))
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.Popen(command, cwd=ROOT, env=env, text=True, **pipes)

    pods = [pod(0), pod(1)]
    for pod in pods:
        _, err = pod.communicate(timeout=600)
        assert pod.returncode == 0, err[-3000:]
    parents, children = runs_of(server)
    ours = [p for p in parents if p.data.tags["sweep_id"] == "job-abc"]
    assert len(ours) == 1
    kids = children[ours[0].info.run_id]
    assert sorted(int(k.data.tags["trial"]) for k in kids) == [0, 1]
    assert MlflowClient(server).get_run(ours[0].info.run_id).info.status == "FINISHED"
    rows = comparison(server, ours[0].info.run_id, tmp_path)
    local_parent = next(p for p in parents if p.data.tags["sweep_id"] != "job-abc")
    local_rows = comparison(server, local_parent.info.run_id, tmp_path / "local")
    for row, local in zip(rows, local_rows[:2], strict=True):
        assert row["lr"] == local["lr"]
        assert row["train_perplexity"] == pytest.approx(local["train_perplexity"], rel=1e-9)
        assert row["val_perplexity"] == pytest.approx(local["val_perplexity"], rel=1e-9)
