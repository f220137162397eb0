"""The tracking server exactly as k8s/tracking starts it, on a real PostgreSQL backend.

The Deployment's ``mlflow server`` command and arguments are taken from the rendered overlay and
run here unchanged except for what cannot be the same on one machine (each substitution is
listed where it is made). Its environment is the container's, filled in as Kubernetes would:
the basic-auth config file from the ConfigMap, the Secrets with the names and keys that
docs/kubernetes.md creates, the backend store a fresh database on the PostgreSQL server at
127.0.0.1:5432. Then a real 2-rank torchrun job logs to it with the credentials the jobs get,
registers its model, and the sampling Job's exact command prints text from
``models:/rnnlm-timemachine@candidate``.

Where no PostgreSQL answers on 127.0.0.1:5432 the tests skip, saying so.
"""

from __future__ import annotations

import configparser
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests
from mlflow import MlflowClient

from tests.conftest import ROOT, free_port, job_env, read_train_info, run_job
from tests.k8s_manifests import (
    JOBS_USER,
    container_env,
    create_jobs_user,
    find,
    readme_secrets,
    render,
)
from tests.mlflow_server import stop_server, wait_healthy

# Every test renders the manifests with kubectl, and most start a server and a job.
pytestmark = pytest.mark.integration

PG_HOST, PG_PORT = "127.0.0.1", 5432
# Trust authentication on the CI machines; the first role that exists is used.
PG_USERS = ("postgres", "root")
EPOCHS = 3
MODEL = "rnnlm-timemachine"


@dataclass
class Server:
    url: str  # how this machine reaches it (see --allowed-hosts below)
    client_env: dict[str, str]  # MLFLOW_* as the training and sampling pods get them
    database: str  # the SQLAlchemy URI of its backend store
    artifacts: Path  # the stand-in for --artifacts-destination
    admin_password: str


def postgres_admin() -> str:
    """A connection string for creating databases, or skip with the reason."""
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=3).close()
    except OSError as exc:
        pytest.skip(f"no PostgreSQL server on {PG_HOST}:{PG_PORT} ({exc}): start one to run this")
    errors = []
    for user in PG_USERS:
        conninfo = f"host={PG_HOST} port={PG_PORT} user={user} dbname=test"
        try:
            psycopg.connect(conninfo, connect_timeout=5).close()
            return conninfo
        except psycopg.OperationalError as exc:
            errors.append(f"{user}: {str(exc).strip()}")
    pytest.skip(f"PostgreSQL on {PG_HOST}:{PG_PORT} refused roles {PG_USERS}: {errors}")


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards: the URI of it for SQLAlchemy."""
    admin = postgres_admin()
    name = f"rnnlm_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    user = psycopg.conninfo.conninfo_to_dict(admin)["user"]
    try:
        # postgresql+psycopg: the driver the tracking-server image carries (psycopg 3).
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def server(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    objs = render("tracking")
    pod = find(objs, "Deployment", "rnnlm-mlflow")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    manifest_argv = [*container["command"], *container.get("args", [])]
    assert manifest_argv[:2] == ["mlflow", "server"]

    root = tmp_path_factory.mktemp("k8s-tracking")
    # The pod's volumes become directories here, empty as a new PVC or emptyDir is.
    volumes = {m["mountPath"]: root / m["name"] for m in container["volumeMounts"]}
    for local in volumes.values():
        local.mkdir()

    def local_path(path: str) -> str:
        """A path inside the container -> the same path under this test's volume stand-ins."""
        for mount, local in volumes.items():
            if path == mount or path.startswith(mount + "/"):
                return str(local) + path[len(mount) :]
        raise AssertionError(f"{path} is on no volume of the pod (read-only root filesystem)")

    # The auth-config volume: the ConfigMap's files, as the kubelet projects them. Paths inside
    # them (the auth database under /mlflow) point into the volume stand-ins the same way.
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    config_map = find(objs, "ConfigMap", config_volume["configMap"]["name"])
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == config_volume["name"]]
    for filename, text in config_map["data"].items():
        text = re.sub(r"sqlite:///(/\S+)", lambda m: "sqlite:///" + local_path(m[1]), text)
        (volumes[mount["mountPath"]] / filename).write_text(text)

    port = free_port()
    # Substitutions, and only these (asserted below):
    #   --host=0.0.0.0 -> 127.0.0.1: listen on loopback only, not on this machine's network;
    #   --port=5000 -> a free port: other tests and users share this machine;
    #   --artifacts-destination=/mlflow/artifacts -> the data volume's stand-in directory;
    #   mlflow -> the mlflow of this virtual environment (the image has it on PATH).
    substitute = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--artifacts-destination": local_path,
    }
    argv = []
    for arg in manifest_argv:
        flag, eq, value = arg.partition("=")
        if eq and flag in substitute:
            new = substitute[flag]
            arg = f"{flag}={new(value) if callable(new) else new}"
        argv.append(arg)
    changed = {a: b for a, b in zip(manifest_argv, argv, strict=True) if a != b}
    assert {a.partition("=")[0] for a in changed} == set(substitute), changed
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert exe, f"mlflow is not installed beside {sys.executable}"

    password = secrets.token_hex(16)  # as docs/kubernetes.md's `openssl rand -hex 16`
    # The Secret's backend store URI: the fresh database instead of the in-cluster
    # postgresql+psycopg://mlflow:$DB_PW@rnnlm-mlflow-db:5432/mlflow.
    secret_data = readme_secrets(password, backend_store_uri=database)
    env = container_env(objs, container, secret_data, base=job_env())
    # HOME=/tmp and MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/... are on the pod's volumes.
    for name in ("HOME", "MLFLOW_AUTH_CONFIG_PATH"):
        env[name] = local_path(env[name])
    assert env["MLFLOW_BACKEND_STORE_URI"] == database

    log = root / "server.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [exe, *argv[1:]], env=env, cwd=volumes["/tmp"], stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    # --allowed-hosts admits "localhost:*" (the docs' kubectl port-forward), not
    # 127.0.0.1, so this machine talks to it as localhost, as a port-forward does.
    url = f"http://localhost:{port}"
    try:
        wait_healthy(url, proc, log, timeout=180)  # the first start migrates the database
        create_jobs_user(url, secret_data)
        client_env = {"MLFLOW_TRACKING_URI": url, **secret_data["rnnlm-mlflow-auth"]}
        artifacts = next(a for a in argv if a.startswith("--artifacts-destination="))
        yield Server(url, client_env, database, Path(artifacts.partition("=")[2]), password)
    finally:
        stop_server(proc)


def connect(server: Server):
    """A connection to the server's backend store database, as psycopg spells its URI."""
    return psycopg.connect(server.database.replace("postgresql+psycopg://", "postgresql://"))


def test_the_docs_create_the_secrets_the_tests_stand_in_for() -> None:
    """The stand-in Secrets have the names and keys of docs/kubernetes.md, and its user is the
    admin the basic-auth config bootstraps, so what runs here is what the docs deploy."""
    readme = (ROOT / "docs" / "kubernetes.md").read_text()
    created = {
        m[1]: set(re.findall(r"--from-literal=(\w+)=", m[2]))
        for m in re.finditer(r"kubectl create secret generic ([\w-]+)((?:\\\n|[^\n])*)", readme)
    }
    stand_ins = readme_secrets("x", "y")
    assert {k: set(v) for k, v in stand_ins.items()} == {
        k: v for k, v in created.items() if k in stand_ins
    }
    # The jobs log in as their own user, which the docs create as tests/k8s_manifests.py does.
    assert f"--from-literal=MLFLOW_TRACKING_USERNAME={JOBS_USER}" in readme
    assert f"python -m jobs.mlflow_user --username {JOBS_USER}" in readme
    assert "RNNLM_MLFLOW_USER_PASSWORD=$JOBS_PW" in readme
    ini = configparser.ConfigParser()
    (auth_config,) = [
        o["data"]["basic_auth.ini"]
        for o in render("tracking")
        if o["kind"] == "ConfigMap" and "basic_auth.ini" in o["data"]
    ]
    ini.read_string(auth_config)
    assert ini["mlflow"]["admin_username"] == "admin"  # the docs' admin, who creates the user
    # The backend store URI names the driver the tracking-server image installs.
    assert "MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://" in readme
    assert '"psycopg[binary]' in (ROOT / "Dockerfile").read_text()


def test_server_runs_on_postgres_with_the_manifests_guards(server: Server) -> None:
    # The schema is in the fresh PostgreSQL database: it is the backend store.
    with connect(server) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
    assert {"experiments", "runs", "metrics", "registered_models", "model_versions"} <= tables

    port = server.url.rpartition(":")[2]
    # /health answers without credentials and whatever the Host (the kubelet's probes).
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).ok
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    # --allowed-hosts: a Host header not listed is refused, even with credentials.
    creds = ("admin", server.admin_password)
    assert requests.get(f"http://127.0.0.1:{port}{api}", auth=creds, timeout=10).status_code == 403
    # Exact names only: a look-alike of the Service's name is refused as well.
    evil = {"Host": "rnnlm-mlflow.evil.example"}
    refused = requests.get(f"{server.url}{api}", auth=creds, headers=evil, timeout=10)
    assert refused.status_code == 403
    # --app-name=basic-auth: no credentials, or wrong ones, are refused; the Secret's pass.
    assert requests.get(f"{server.url}{api}", timeout=10).status_code == 401
    assert (
        requests.get(f"{server.url}{api}", auth=("admin", "x" * 12), timeout=10).status_code == 401
    )
    assert requests.get(f"{server.url}{api}", auth=creds, timeout=10).ok


@pytest.fixture(scope="module")
def trained(server: Server, corpus_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real 2-rank torchrun job logging to the server with the jobs' credentials."""
    work = tmp_path_factory.mktemp("k8s-tracking-job")
    args = [
        "--corpus", str(corpus_path), "--output-dir", str(work / "model"),
        "--epochs", str(EPOCHS), "--num-hiddens", "64", "--sample-every", str(EPOCHS),
    ]  # fmt: skip
    proc = run_job(args, nproc=2, env=job_env(**server.client_env), cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_train_info(work / "model")


def test_training_logs_and_registers_through_it(
    server: Server, trained: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in server.client_env.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(server.url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    history = sorted(
        client.get_metric_history(run.info.run_id, "train_perplexity"), key=lambda m: m.step
    )
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert [m.value for m in history] == pytest.approx(trained["perplexity_by_epoch"])
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert version.run_id == run.info.run_id
    # The model's files went through the server (--serve-artifacts) onto the data volume.
    assert any(server.artifacts.rglob("MLmodel")), sorted(server.artifacts.rglob("*"))[:20]

    # And the run's metrics and the alias are rows in PostgreSQL.
    with connect(server) as c:
        (points,) = c.execute(
            "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train_perplexity'",
            (run.info.run_id,),
        ).fetchone()
        (alias,) = c.execute(
            "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
            (MODEL, "candidate"),
        ).fetchone()
    assert (points, str(alias)) == (EPOCHS, version.version)


def test_sample_job_command_prints_text_through_it(
    server: Server, trained: dict, tmp_path: Path
) -> None:
    objs = render("sample")
    (container,) = find(objs, "Job", "rnnlm-sample")["spec"]["template"]["spec"]["containers"]
    command, *args = [*container["command"], *container.get("args", [])]
    assert command == "python" and "--model-uri=models:/rnnlm-timemachine@candidate" in args
    secret_data = readme_secrets(server.admin_password, "unused")
    # The jobs' user as the server's fixture created it.
    secret_data["rnnlm-mlflow-auth"] = {
        k: server.client_env[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    env = container_env(objs, container, secret_data, base=job_env())
    # The Service name in rnnlm-env's MLFLOW_TRACKING_URI -> this machine's way to the server;
    # HOME=/tmp (an emptyDir in the pod) -> a directory of this test.
    assert env["MLFLOW_TRACKING_URI"] == "http://rnnlm-mlflow:5000"
    env.update(MLFLOW_TRACKING_URI=server.url, HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    num_chars = int(next(a for a in args if a.startswith("--num-chars=")).partition("=")[2])
    prefix = next(a for a in args if a.startswith("--prefix=")).partition("=")[2]
    (line,) = proc.stdout.splitlines()
    assert line.startswith(prefix) and len(line) == len(prefix) + num_chars, line


def test_the_jobs_user_edits_its_experiment_and_model_and_nothing_more(
    server: Server, trained: dict
) -> None:
    """The jobs trained and registered as ``rnnlm-jobs`` (above); that user is no admin, and may
    not write into an experiment or a model that was not granted to it."""
    admin = ("admin", server.admin_password)
    jobs = (JOBS_USER, server.client_env["MLFLOW_TRACKING_PASSWORD"])
    api = f"{server.url}/api/2.0/mlflow"
    user = requests.get(f"{api}/users/get", params={"username": JOBS_USER}, auth=admin, timeout=10)
    assert user.ok and user.json()["user"]["is_admin"] is False
    # Creating users is the admin's.
    new_user = {"username": "intruder", "password": "x" * 16}
    assert (
        requests.post(f"{api}/users/create", json=new_user, auth=jobs, timeout=10).status_code
        == 403
    )
    # Another team's experiment and model: readable (default_permission = READ), not writable.
    other = requests.post(
        f"{api}/experiments/create", json={"name": "other-team"}, auth=admin, timeout=10
    )
    assert other.ok, other.text
    run = {"experiment_id": other.json()["experiment_id"]}
    assert requests.post(f"{api}/runs/create", json=run, auth=jobs, timeout=10).status_code == 403
    model = {"name": "other-team-model"}
    assert requests.post(f"{api}/registered-models/create", json=model, auth=admin, timeout=10).ok
    alias = {"name": "other-team-model", "alias": "candidate", "version": "1"}
    refused = requests.post(f"{api}/registered-models/alias", json=alias, auth=jobs, timeout=10)
    assert refused.status_code == 403
