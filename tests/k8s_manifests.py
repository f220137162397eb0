"""Reading the rendered Kubernetes manifests: kustomize output, and the training launches in it.

A *launch* is one way the manifests start training (Indexed Job, PyTorchJob, TrainJob): the
training container as the pods will run it, plus the topology torchrun gets (nodes, processes
per node), read from wherever that launcher keeps it.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "k8s"
# The names kustomize looks for in a directory.
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def find_overlays(k8s: Path) -> list[str]:
    """Every kustomization directory under ``k8s``, at any depth, relative to it, except
    components (``kind: Component``: they render only inside an overlay)."""
    found = set()
    for name in KUSTOMIZATION_FILES:
        for path in k8s.rglob(name):
            kind = (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization")
            if kind != "Component":
                found.add(path.parent.relative_to(k8s).as_posix())
    return sorted(found)


OVERLAYS = find_overlays(K8S)
TRAINING_OVERLAYS = ["train-job", "pytorchjob", "trainjob"]
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: cannot render the kustomize overlays in k8s/")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/{overlay} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def find(objs: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_specs(obj: Obj) -> Iterator[Obj]:
    """Every pod spec a workload object carries, whatever its kind."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Job", "Deployment", "StatefulSet"):
        yield spec["template"]["spec"]
    elif obj["kind"] == "PyTorchJob":
        for replica in spec["pytorchReplicaSpecs"].values():
            yield replica["template"]["spec"]
    elif obj["kind"] == "TrainingRuntime":
        for rjob in spec["template"]["spec"]["replicatedJobs"]:
            yield rjob["template"]["spec"]["template"]["spec"]


def job_specs(obj: Obj) -> Iterator[Obj]:
    """Every batch/v1 JobSpec an object carries (a Job, or a runtime's replicated jobs)."""
    if obj["kind"] == "Job":
        yield obj["spec"]
    elif obj["kind"] == "TrainingRuntime":
        for rjob in obj["spec"]["template"]["spec"]["replicatedJobs"]:
            yield rjob["template"]["spec"]


def containers(objs: tuple[Obj, ...]) -> Iterator[Obj]:
    for obj in objs:
        for pod in pod_specs(obj):
            yield from pod.get("initContainers", [])
            yield from pod["containers"]


def plain_env(container: Obj) -> dict[str, str]:
    """The container's literal env values (valueFrom entries are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


JOBS_USER = "rnnlm-jobs"  # the MLflow user the jobs log in as (docs/kubernetes.md)


def readme_secrets(admin_password: str, backend_store_uri: str) -> dict[str, dict[str, str]]:
    """Stand-ins for the Secrets that docs/kubernetes.md ("Deploy the tracking server") creates
    by hand (the manifests only refer to them, so rendering never yields them): the same names
    and keys (tests/test_k8s_tracking.py checks them against the docs), test values."""
    return {
        "rnnlm-mlflow-server": {
            "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
        },
        "rnnlm-mlflow-auth": {
            "MLFLOW_TRACKING_USERNAME": JOBS_USER,
            "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16),
        },
    }


def create_jobs_user(url: str, secret_data: Mapping[str, Mapping[str, str]]) -> str:
    """What docs/kubernetes.md runs once the server is up: ``jobs.mlflow_user`` as the admin,
    giving the jobs' user (the ``rnnlm-mlflow-auth`` Secret) its password and grants."""
    jobs = secret_data["rnnlm-mlflow-auth"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RNNLM_"))}
    env.update(
        MLFLOW_TRACKING_URI=url,
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=secret_data["rnnlm-mlflow-server"]["MLFLOW_AUTH_ADMIN_PASSWORD"],
        RNNLM_MLFLOW_USER_PASSWORD=jobs["MLFLOW_TRACKING_PASSWORD"],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.mlflow_user", "--username", jobs["MLFLOW_TRACKING_USERNAME"]],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def container_env(
    objs: tuple[Obj, ...],
    container: Obj,
    secret_data: Mapping[str, Mapping[str, str]],
    base: Mapping[str, str] | None = None,
    downward: Mapping[str, str] | None = None,
    resource_fields: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment Kubernetes gives ``container``, on top of ``base``: ``envFrom``
    ConfigMaps (taken from the rendered objects) and Secrets (from ``secret_data``), then its
    ``env`` list in order, ``$(NAME)`` expanded from variables defined before it as the kubelet
    does. ``downward`` maps fieldRef paths, ``resource_fields`` resourceFieldRef resources, to
    the values this pod would see."""
    env = dict(base or {})
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            name = source["secretRef"]["name"]
            assert name in secret_data, f"no stand-in for Secret {name} (see readme_secrets)"
            env.update(secret_data[name])
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = (downward or {})[source["fieldRef"]["fieldPath"]]
        elif "resourceFieldRef" in source:
            env[name] = (resource_fields or {})[source["resourceFieldRef"]["resource"]]
        else:
            ref = source["secretKeyRef"]
            env[name] = secret_data[ref["name"]][ref["key"]]
    return env


@dataclass
class Launch:
    """One training launch: the container as it will run and the topology torchrun gets."""

    overlay: str
    kind: str
    pod: Obj  # the pod spec (for TrainJob: the runtime's, with the TrainJob's fields applied)
    container: Obj
    num_nodes: int
    nproc_per_node: int
    # PET_* variables the launcher injects (torchrun reads PET_<FLAG> as --<flag>).
    injected_env: dict[str, str]

    @property
    def argv(self) -> list[str]:
        return [*self.container["command"], *self.container.get("args", [])]

    @property
    def resources(self) -> Obj:
        return self.container.get("resources", {})


def training_launch(overlay: str) -> Launch:
    objs = render(overlay)
    kinds = {o["kind"] for o in objs}
    if "PyTorchJob" in kinds:
        job = find(objs, "PyTorchJob")
        replicas = job["spec"]["pytorchReplicaSpecs"]
        pod = replicas["Worker"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
        nodes = sum(r["replicas"] for r in replicas.values())
        nproc = int(job["spec"]["nprocPerNode"])
        return Launch(overlay, "PyTorchJob", pod, container, nodes, nproc, _pet(nodes, nproc))
    if "TrainJob" in kinds:
        trainjob = find(objs, "TrainJob")
        ref = trainjob["spec"]["runtimeRef"]
        assert ref.get("kind") == "TrainingRuntime", f"{overlay}: use the namespaced runtime"
        runtime = find(objs, "TrainingRuntime", ref["name"])
        (pod,) = pod_specs(runtime)
        (node,) = [c for c in pod["containers"] if c["name"] == "node"]
        trainer = trainjob["spec"]["trainer"]
        # What Trainer does: the TrainJob's trainer fields replace the runtime container's.
        container = {
            **node,
            "image": trainer["image"],
            "command": trainer["command"],
            "args": trainer.get("args", []),
            "resources": trainer.get("resourcesPerNode", {}),
        }
        nodes, nproc = int(trainer["numNodes"]), int(trainer["numProcPerNode"])
        return Launch(overlay, "TrainJob", pod, container, nodes, nproc, _pet(nodes, nproc))
    job = find(objs, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = plain_env(container)
    return Launch(
        overlay,
        "Job",
        pod,
        container,
        int(env["PET_NNODES"]),
        int(env["PET_NPROC_PER_NODE"]),
        {},
    )


PREPARE = "prepare"  # the init container that prepares the corpus before training


def prepare_step(launch: Launch) -> Obj:
    """The launch's init container that runs ``jobs.prepare`` before the trainer starts."""
    steps = [c for c in launch.pod.get("initContainers", []) if c["name"] == PREPARE]
    assert len(steps) == 1, f"k8s/{launch.overlay}: no init container {PREPARE!r} before training"
    return steps[0]


def prepare_argv(step: Obj) -> list[str]:
    """What the prepare step runs inside its ``sh -c`` wrapper (which turns exit 2 into 0)."""
    command = step["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 4, command
    assert 'python -m jobs.prepare "$@"' in command[2], command[2]
    return ["python", "-m", "jobs.prepare", *step.get("args", [])]


def _pet(nodes: int, nproc: int) -> dict[str, str]:
    return {"PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(nproc)}
