"""Outages and refusals, for real: an MLflow server that is down, whose database is down, or
that does not answer in time at start, one that goes away before the end, a registration that
the server refuses. The exit-code contract: 0 done, 2 a mistake (never retried), 203 an outage
that outlasted ``--outage-timeout`` (the launchers retry it)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from mlflow import MlflowClient
from mlflow.server.auth.client import AuthServiceClient

from jobs.common import EXIT_TRANSIENT, EXIT_USER_ERROR
from tests.conftest import ROOT, free_port, job_env, read_train_info
from tests.mlflow_server import mlflow_server, start_server, stop_server
from tests.test_k8s_tracking import postgres_admin

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "correct-horse-battery"
USER, USER_PASSWORD = "trainer", "a-trainer-password"


def args_for(corpus: Path, work: Path, *extra: str) -> list[str]:
    """A small job, checkpointed, so that the same command run again finds it finished."""
    return [
        "--corpus", str(corpus), "--output-dir", str(work / "model"),
        "--checkpoint-dir", str(work / "ckpt"), "--epochs", "2", "--num-hiddens", "32",
        "--max-tokens", "5000", "--experiment", "outages", *extra,
    ]  # fmt: skip


def start_job(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The job in the background, its stderr in ``log`` (read while it runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *args], env=env or job_env(), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=log.open("w"), stdin=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for_line(log: Path, text: str, job: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error")]


def registered_once(url: str, name: str = "rnnlm-timemachine") -> str:
    """Exactly one finished run, its model logged once, registered once, the alias on it."""
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("outages").experiment_id])
    assert run.info.status == "FINISHED"
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias(name, "candidate").version == version.version
    logged = client.search_logged_models([run.info.experiment_id])
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    return run.info.run_id


# --- at start: wait out an outage, exit 203 past --outage-timeout -----------------------------


@contextlib.contextmanager
def database_down(root: Path) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """An ``mlflow server`` on a PostgreSQL database of its own, and a switch that refuses
    (False) or allows (True) connections to that database: down, the server answers 503."""
    admin = postgres_admin()
    name = f"rnnlm_outage_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    user = psycopg.conninfo.conninfo_to_dict(admin)["user"]
    uri = f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}"

    def allow(up: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(up).lower()}")
            if not up:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )

    try:
        with mlflow_server(root, extra=["--backend-store-uri", uri]) as url:
            yield url, allow
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_server_down_at_start_is_waited_for(corpus_path: Path, tmp_path: Path) -> None:
    """Connection refused (a server restarting): the job retries, then trains once it is up."""
    port = free_port()
    log = tmp_path / "job.log"
    args = args_for(corpus_path, tmp_path, "--tracking-uri", f"http://127.0.0.1:{port}")
    job = start_job(args, log)
    try:
        wait_for_line(log, "is not answering (Connection refused); retrying for up to 120 s", job)
        with mlflow_server(tmp_path / "server", port=port) as url:
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
            registered_once(url)
    finally:
        job.kill()


def test_a_server_whose_database_is_down_is_waited_for(corpus_path: Path, tmp_path: Path) -> None:
    """The server is up but its database is not: it answers 5xx (503), the job retries."""
    with database_down(tmp_path / "server") as (url, allow):
        search = f"{url}/api/2.0/mlflow/experiments/search"
        assert requests.post(search, json={"max_results": 1}, timeout=60).ok  # the store is up
        allow(False)
        assert requests.post(search, json={"max_results": 1}, timeout=60).status_code >= 500
        log = tmp_path / "job.log"
        job = start_job(args_for(corpus_path, tmp_path, "--tracking-uri", url), log)
        try:
            wait_for_line(log, "is not answering", job)
            allow(True)
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            job.kill()
        registered_once(url)


def test_a_server_too_slow_to_answer_is_waited_for(corpus_path: Path, tmp_path: Path) -> None:
    """A server that accepts connections but does not answer (stopped): requests time out."""
    url, server = start_server(tmp_path / "server")
    log = tmp_path / "job.log"
    try:
        os.killpg(server.pid, signal.SIGSTOP)
        env = job_env(MLFLOW_HTTP_REQUEST_TIMEOUT="2")
        job = start_job(args_for(corpus_path, tmp_path, "--tracking-uri", url), log, env)
        try:
            wait_for_line(log, "is not answering (timed out)", job)
            os.killpg(server.pid, signal.SIGCONT)
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            job.kill()
        registered_once(url)
    finally:
        os.killpg(server.pid, signal.SIGCONT)
        stop_server(server)


def test_an_outage_longer_than_the_timeout_exits_203(corpus_path: Path, tmp_path: Path) -> None:
    """Two ranks under rnnlm-torchrun: the launcher exits 203 too, the code the manifests
    retry; one line says what happened; nothing is trained or written."""
    url = f"http://127.0.0.1:{free_port()}"
    args = args_for(corpus_path, tmp_path, "--tracking-uri", url, "--outage-timeout", "3")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.torchrun", "--standalone", "--nproc-per-node=2",
         "-m", "jobs.train", *args],
        env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_TRANSIENT, proc.stderr[-3000:]
    (line,) = errors(proc.stderr)
    assert f"cannot reach the MLflow tracking server at {url} for 3 s" in line
    assert "--outage-timeout; Connection refused" in line
    # No rank crashed (torchrun's summary quotes the error files; a rank's own traceback on
    # stderr would be "[rankN]: Traceback"): rank 1 waited for the launcher to stop it.
    assert not re.search(r"^\[rank\d\]: Traceback", proc.stderr, re.M), proc.stderr[-3000:]
    assert "epoch 1" not in proc.stderr
    assert not (tmp_path / "model").exists()


# --- at the end: an outage exits 203, a refusal exits 2; the same command then records it ---


def test_a_server_gone_at_the_end_exits_203_and_the_same_command_registers_once(
    corpus_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    root = tmp_path / "server"
    url, server = start_server(root, port=port)
    args = args_for(corpus_path, tmp_path, "--tracking-uri", url, "--tracking-timeout", "3",
                    "--log-every", "1")  # fmt: skip
    args[args.index("--epochs") + 1] = "300"
    log = tmp_path / "job.log"
    job = start_job(args, log)
    try:
        wait_for_line(log, "epoch 10: perplexity", job)  # the run is open and training
        stop_server(server)
        assert job.wait(timeout=600) == EXIT_TRANSIENT, log.read_text()[-3000:]
    finally:
        stop_server(server)
        job.kill()
    stderr = log.read_text()
    (line,) = errors(stderr)
    assert "--tracking-timeout: MLflow did not take" in line and "run again" in line
    assert len(read_train_info(tmp_path / "model")["perplexity_by_epoch"]) == 300
    assert not (tmp_path / "model" / "mlflow.json").exists()  # not recorded yet
    with mlflow_server(root, port=port):
        again = subprocess.run(
            [sys.executable, "-m", "jobs.train", *args], env=job_env(), cwd=ROOT,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        assert "recording what MLflow is missing" in again.stderr
        assert "epoch 1: perplexity" not in again.stderr  # nothing trained again
        run_id = registered_once(url)
        steps = MlflowClient(url).get_metric_history(run_id, "train_perplexity")
        assert sorted(m.step for m in steps) == list(range(1, 301))  # each epoch, once
        third = subprocess.run(
            [sys.executable, "-m", "jobs.train", *args], env=job_env(), cwd=ROOT,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert third.returncode == 0 and "this job finished" in third.stderr
        registered_once(url)


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[str]:
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only"}  # fmt: skip
    with mlflow_server(tmp_path / "server", extra=["--app-name", "basic-auth"], env=env) as url:
        yield url


@contextlib.contextmanager
def as_admin() -> Iterator[None]:
    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD)
    try:
        yield
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]


def test_a_refused_registration_fails_fast_and_the_same_command_registers_once(
    corpus_path: Path, tmp_path: Path, auth_server: str
) -> None:
    """The jobs' account may edit the experiment but only read the registered model: the
    registration's 403 is not retried (with --tracking-timeout 300 left), the job exits 2 with
    one line, the model is on disk. Once the grant is fixed, the same command registers the
    model it logged before: one logged model, one version."""
    with as_admin():
        client, auth = MlflowClient(auth_server), AuthServiceClient(auth_server)
        auth.create_user(USER, USER_PASSWORD)
        experiment = client.create_experiment("outages")
        auth.grant_user_permission(USER, "experiment", experiment, "EDIT")
        client.create_registered_model("rnnlm-timemachine")  # the account may only read it
    env = job_env(MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=USER_PASSWORD)
    args = args_for(corpus_path, tmp_path, "--tracking-uri", auth_server)
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert refused.returncode == EXIT_USER_ERROR, refused.stderr[-3000:]
    (line,) = errors(refused.stderr)
    assert "MLflow refused registered model (HTTP 403: Permission denied)" in line, line
    assert "run the same command again" in line
    assert "not retried" in refused.stderr and "retrying registered model" not in refused.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "model" / "mlflow.json").exists()

    with as_admin():
        auth.grant_user_permission(USER, "registered_model", "rnnlm-timemachine", "EDIT")
    again = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recording what MLflow is missing" in again.stderr
    with as_admin():
        registered_once(auth_server)
