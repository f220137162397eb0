"""Two "pods" of the Indexed Job on one machine: the manifest's exact command line and
environment, started twice, train together and equal a one-node, two-process run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import free_port, job_env, read_train_info, run_job
from tests.k8s_manifests import find, render, training_launch

# Keep it small: the manifest trains the chapter's 500 epochs; flags given later win.
SMALL = ["--epochs", "3", "--sample-every", "1"]
JOB_NAME = "rnnlm-train"


def pod_env(
    launch, index: int, job_uid: str, volumes: dict[str, Path], rdzv: str, corpus: Path
) -> dict:
    """The container's environment as Kubernetes fills it in for pod ``index`` of the Job."""
    objs = render(launch.overlay)
    env = job_env(JOB_COMPLETION_INDEX=str(index))
    for source in launch.container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
        # secretRef: the MLflow credentials; there is no tracking server in this test.
    downward = {
        "metadata.labels['batch.kubernetes.io/job-name']": JOB_NAME,
        "metadata.labels['batch.kubernetes.io/controller-uid']": job_uid,
    }
    for var in launch.container["env"]:
        if "value" in var:
            # $(NAME) expands from variables defined earlier, as the kubelet does it.
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = downward[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # resourceFieldRef limits.cpu: both pods share this machine's cores
            env[var["name"]] = "1"
    # The name rnnlm-train-0.rnnlm-train resolves to pod 0; here pod 0 is this machine.
    host, _, _port = env["PET_RDZV_ENDPOINT"].rpartition(":")
    assert host == f"{JOB_NAME}-0.{launch.pod['subdomain']}"
    env["PET_RDZV_ENDPOINT"] = rdzv
    env["RNNLM_CORPUS"] = str(corpus)  # the corpus from a volume rather than the URL
    env.pop("MLFLOW_TRACKING_URI")
    # Paths under the pod's volume mounts land in this test's stand-ins for the volumes.
    for name, value in env.items():
        for mount, local in volumes.items():
            if value == mount or value.startswith(mount + "/"):
                env[name] = str(local) + value[len(mount) :]
    return env


def test_two_pods_train_like_one_node(corpus_path: Path, tmp_path: Path) -> None:
    launch = training_launch("train-job")
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
        env = pod_env(launch, index, job_uid, volumes, rdzv, corpus_path)
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

    model = shared / "models" / JOB_NAME
    two_nodes = read_train_info(model)
    # Each agent ran one process, so a world of 2 means the two agents formed one group.
    assert two_nodes["world_size"] == 2
    assert len(two_nodes["perplexity_by_epoch"]) == 3

    one_node_dir = tmp_path / "one-node"
    one_node_args = [*args[2:], *SMALL, "--corpus", str(corpus_path)]
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
