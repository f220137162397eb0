"""Two "pods" of the Indexed Job on one machine: the manifest's exact command line and
environment, started twice, train together, log ONE run (and one registered model version) to a
real basic-auth MLflow server, and equal a one-node, two-process run."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.conftest import free_port, job_env, read_train_info, run_job
from tests.k8s_manifests import (
    Launch,
    container_env,
    create_jobs_user,
    find,
    readme_secrets,
    render,
    training_launch,
)
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.integration

# Keep it small: the manifest trains the chapter's 500 epochs; flags given later win.
EPOCHS = 3
SMALL = ["--epochs", str(EPOCHS), "--sample-every", "1"]
JOB_NAME = "rnnlm-train"


def pod_env(
    launch: Launch,
    index: int,
    job_uid: str,
    volumes: Mapping[str, Path],
    rdzv: str,
    corpus: Path,
    tracking_uri: str,
    secret_data: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """The container's environment as Kubernetes fills it in for pod ``index`` of the Job."""
    downward = {
        "metadata.labels['batch.kubernetes.io/job-name']": JOB_NAME,
        "metadata.labels['batch.kubernetes.io/controller-uid']": job_uid,
    }
    manifest = container_env(
        render(launch.overlay),
        launch.container,
        secret_data,
        downward=downward,
        resource_fields={"limits.cpu": "1"},  # both pods share this machine's two cores
    )
    # Paths under the pod's volume mounts land in this test's stand-ins for the volumes. Only
    # the manifest's values are pod paths: this machine's (PYTHONPATH, the corpus, the checkout)
    # may lie under /tmp too, and are left as they are.
    for name, value in manifest.items():
        for mount, local in volumes.items():
            if value == mount or value.startswith(mount + "/"):
                manifest[name] = str(local) + value[len(mount) :]
                break
    env = {**job_env(JOB_COMPLETION_INDEX=str(index)), **manifest}
    # The name rnnlm-train-0.rnnlm-train resolves to pod 0; here pod 0 is this machine.
    host, _, _port = env["PET_RDZV_ENDPOINT"].rpartition(":")
    assert host == f"{JOB_NAME}-0.{launch.pod['subdomain']}"
    env["PET_RDZV_ENDPOINT"] = rdzv
    env["RNNLM_CORPUS"] = str(corpus)  # the corpus from a volume rather than the URL
    # The Service name rnnlm-mlflow resolves to the tracking server; here it is on loopback.
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


@pytest.fixture
def auth_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real ``mlflow server`` with basic-auth, as k8s/tracking runs it (sqlite here: the
    PostgreSQL backend has its own test), and the Secrets docs/kubernetes.md creates for it."""
    password = secrets.token_hex(16)  # as docs/kubernetes.md's `openssl rand -hex 16`
    secret_data = readme_secrets(password, backend_store_uri="unused: sqlite here")
    server_secret = secret_data["rnnlm-mlflow-server"]
    server_env = job_env(
        MLFLOW_AUTH_ADMIN_PASSWORD=server_secret["MLFLOW_AUTH_ADMIN_PASSWORD"],
        MLFLOW_FLASK_SERVER_SECRET_KEY=server_secret["MLFLOW_FLASK_SERVER_SECRET_KEY"],
    )
    with mlflow_server(
        tmp_path / "server", extra=["--app-name", "basic-auth"], env=server_env
    ) as url:
        create_jobs_user(url, secret_data)
        # This process reads the server as the jobs do: with the credentials the pods get.
        for name, value in secret_data["rnnlm-mlflow-auth"].items():
            monkeypatch.setenv(name, value)
        yield url, secret_data


def test_two_pods_train_like_one_node(corpus_path: Path, tmp_path: Path, auth_server) -> None:
    url, secret_data = auth_server
    launch = training_launch("train-job")
    # The pods' MLFLOW_TRACKING_URI names the tracking overlay's Service and port.
    service = find(render("tracking"), "Service", "rnnlm-mlflow")
    in_cluster = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert (
        find(render("train-job"), "ConfigMap", "rnnlm-env")["data"]["MLFLOW_TRACKING_URI"]
        == in_cluster
    )
    assert (launch.num_nodes, launch.nproc_per_node) == (2, 1)
    command, *args = launch.argv
    exe = shutil.which(command, path=str(Path(sys.executable).parent))
    assert exe, f"{command} is not installed beside {sys.executable} (pip install -e .)"
    rdzv = f"127.0.0.1:{free_port()}"
    job_uid = str(uuid.uuid4())  # one Job: its pods share the uid, hence the rendezvous id
    shared = tmp_path / "shared"  # the ReadWriteMany volume both pods mount
    pods = []
    for index in range(launch.num_nodes):
        own = tmp_path / f"pod{index}"  # the pod's emptyDir volumes
        volumes = {"/shared": shared, "/tmp": own / "tmp"}
        (own / "tmp").mkdir(parents=True)
        env = pod_env(launch, index, job_uid, volumes, rdzv, corpus_path, url, secret_data)
        log = (own / "log").open("w")
        pods.append(
            (
                subprocess.Popen(
                    [exe, *args, *SMALL],
                    env=env,
                    cwd=own,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                ),
                own / "log",
            )
        )
    try:
        codes = [proc.wait(timeout=300) for proc, _ in pods]
    finally:
        for proc, _ in pods:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = [log.read_text() for _, log in pods]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)

    # Where the manifest's RNNLM_OUTPUT_DIR puts the model on the shared volume.
    output = {e["name"]: e.get("value") for e in launch.container["env"]}["RNNLM_OUTPUT_DIR"]
    model = shared / Path(output.replace("$(RNNLM_JOB_NAME)", JOB_NAME)).relative_to("/shared")
    two_nodes = read_train_info(model)
    # Each agent ran one process, so a world of 2 means the two agents formed one group.
    assert two_nodes["world_size"] == 2
    assert len(two_nodes["perplexity_by_epoch"]) == EPOCHS

    # One run on the whole server (rank 0 of pod 0 logs; pod 1 logs nothing), with the world's
    # size, each epoch's metric once, and the model registered from it under the alias.
    client = MlflowClient(url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, [(r.info.run_id, r.info.experiment_id) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    history = sorted(
        client.get_metric_history(run.info.run_id, "train_perplexity"), key=lambda m: m.step
    )
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert [m.value for m in history] == pytest.approx(two_nodes["perplexity_by_epoch"])
    version = client.get_model_version_by_alias("rnnlm-timemachine", "candidate")
    assert version.run_id == run.info.run_id
    # Each node's first rank reports its node's system metrics into the one run, by node.
    for node in ("node0", "node1"):
        for metric in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            assert f"system/{node}/{metric}" in run.data.metrics, sorted(run.data.metrics)

    one_node_dir = tmp_path / "one-node"
    # The reference logs nothing: it is compared on its results only.
    one_node_args = [*args[2:], *SMALL, "--corpus", str(corpus_path), "--no-tracking"]
    proc = run_job([*one_node_args, "--output-dir", str(one_node_dir)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_node = read_train_info(one_node_dir)
    assert one_node["world_size"] == 2
    assert two_nodes["perplexity_by_epoch"] == pytest.approx(
        one_node["perplexity_by_epoch"], rel=1e-5
    )
    w_two, w_one = (
        load_file(model / "model.safetensors"),
        load_file(one_node_dir / "model.safetensors"),
    )
    assert w_two.keys() == w_one.keys()
    for name in w_one:
        torch.testing.assert_close(w_two[name], w_one[name], rtol=1e-5, atol=1e-6, msg=name)
