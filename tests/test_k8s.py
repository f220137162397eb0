"""The Kubernetes manifests, offline: every overlay renders, every object validates against its
schema, and the project's own rules hold on the rendered YAML (what no schema can see)."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import re
import subprocess
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml
from torch.distributed import run as torch_run

import jobs.evaluate
import jobs.sweep
from jobs.common import EXIT_TRANSIENT, EXIT_USER_ERROR
from jobs.flags import config_from_flags, config_from_values
from rnnlm.config import DataConfig, TrainConfig
from rnnlm.corpus import is_url
from rnnlm.resume import EXIT_PREEMPTED
from tests.conftest import ROOT
from tests.k8s_manifests import (
    GPU,
    K8S,
    OVERLAYS,
    PREPARE,
    TRAINING_OVERLAYS,
    Launch,
    Obj,
    container_env,
    containers,
    find,
    find_overlays,
    job_specs,
    plain_env,
    pod_specs,
    prepare_argv,
    prepare_step,
    readme_secrets,
    render,
    training_launch,
)

# The Kubeflow CRDs, kept out of the project (large, versioned by Kubeflow): beside the checkout.
SCHEMAS = ROOT.parent / "shared" / "schemas"
# Kubeflow Trainer v2.0: its TrainJob still has `podSpecOverrides` (later releases renamed it).
CRD_FILES = {
    ("kubeflow.org", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org", "ClusterTrainingRuntime"): (
        "trainer.kubeflow.org_clustertrainingruntimes.yaml"
    ),
}
# Trainer generates its namespaced TrainingRuntime from the same Go type as the cluster-scoped
# one (TrainingRuntimeSpec); the shared schemas carry the latter only.
SAME_SCHEMA_AS = {("trainer.kubeflow.org", "TrainingRuntime"): "ClusterTrainingRuntime"}
# Core kinds the manifests may use, all namespaced; a kind outside this list needs a look.
NAMESPACED_CORE_KINDS = {
    "ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "ServiceAccount", "Job",
    "Deployment", "StatefulSet", "NetworkPolicy", "Role", "RoleBinding",
}  # fmt: skip
# Objects an overlay starts; the GPU variant of a launcher replaces the CPU one by design.
WORKLOAD_KINDS = {"Job", "PyTorchJob", "TrainJob", "Deployment"}
# podFailurePolicy is GA from 1.31; also check the newest release kubernetes-validate knows.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
ALL_OVERLAYS = [o for o in OVERLAYS if o != "base"]
TRAINING_AND_GPU = [*TRAINING_OVERLAYS, *(f"{o}-gpu" for o in TRAINING_OVERLAYS)]
# The overlays the tests below check by name, on top of the rules every overlay gets (base is
# only rendered and validated: the overlays built on it are checked with what it holds).
CHECKED_BY_NAME = {"base", "tracking", "sample", "evaluate", "sweep", *TRAINING_AND_GPU}
# The workloads that talk to MLflow, besides training.
MLFLOW_CLIENT_OVERLAYS = ["sample", "evaluate", "sweep"]
OUR_IMAGES = ("rnnlm:", "rnnlm-mlflow:")


def test_every_overlay_is_tested() -> None:
    """An overlay added under k8s/ fails here until tests check it by name: the generic rules
    alone would leave its launcher, topology and resources unchecked."""
    assert OVERLAYS, f"no overlay found under {K8S}"
    untested = set(OVERLAYS) - CHECKED_BY_NAME
    assert not untested, f"overlays under k8s/ that no test checks by name: {sorted(untested)}"
    gone = CHECKED_BY_NAME - set(OVERLAYS)
    assert not gone, f"tests name overlays that k8s/ lacks: {sorted(gone)}"


def test_overlay_discovery_sees_every_depth_and_skips_components(tmp_path: Path) -> None:
    """The list the tests run over comes from the directories: an overlay nested or spelt
    .yml is found, a component (rendered only inside an overlay) is not."""
    files = {
        "one/kustomization.yaml": "kind: Kustomization",
        "group/two/kustomization.yaml": "resources: []",  # kind defaults to Kustomization
        "three/kustomization.yml": "kind: Kustomization",
        "components/gpu/kustomization.yaml": "kind: Component",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_text(f"apiVersion: kustomize.config.k8s.io/v1beta1\n{text}\n")
    assert find_overlays(tmp_path) == ["group/two", "one", "three"]


# --- rendering and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    objs = render(overlay)
    assert objs, f"k8s/{overlay} renders nothing"
    for obj in objs:
        group = obj["apiVersion"].rpartition("/")[0]
        what = f"k8s/{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if (group, obj["kind"]) in CRD_FILES or (group, obj["kind"]) in SAME_SCHEMA_AS:
            _validate_custom_resource(obj, what)
        else:
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{what} is invalid for Kubernetes {version}: {exc.message}")


@functools.cache
def _crd_schema(group: str, kind: str, version: str) -> dict[str, Any]:
    if not SCHEMAS.is_dir():
        pytest.fail(f"the CRD schemas are missing: no folder {SCHEMAS} (../shared/schemas)")
    path = SCHEMAS / CRD_FILES[(group, kind)]
    if not path.is_file():
        pytest.fail(f"the CRD schema is missing: {path} (see shared/schemas/README.md)")
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _strict(served["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply --validate=strict` does (CRD
    schemas leave additionalProperties open and let the API server drop unknown fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _validate_custom_resource(obj: dict[str, Any], what: str) -> None:
    group, _, version = obj["apiVersion"].rpartition("/")
    schema = _crd_schema(group, SAME_SCHEMA_AS.get((group, obj["kind"]), obj["kind"]), version)
    body = copy.deepcopy(obj)
    body["metadata"] = {}  # the CRD schema says only "object"; core metadata is checked elsewhere
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path)
    )
    if errors:
        lines = [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:10]]
        pytest.fail(f"{what} does not match its CRD schema:\n" + "\n".join(lines))


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_object_is_namespaced(overlay: str) -> None:
    """Applying an overlay needs rights in one namespace and changes nothing outside it (the
    GPU overlay used to patch a cluster-scoped runtime: every CPU TrainJob of every namespace)."""
    for obj in render(overlay):
        group = obj["apiVersion"].rpartition("/")[0]
        what = f"k8s/{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        if (group, obj["kind"]) in CRD_FILES:
            crd = yaml.safe_load((SCHEMAS / CRD_FILES[(group, obj["kind"])]).read_text())
            assert crd["spec"]["scope"] == "Namespaced", f"{what} is cluster-scoped"
        elif (group, obj["kind"]) not in SAME_SCHEMA_AS:
            assert obj["kind"] in NAMESPACED_CORE_KINDS, f"{what}: a kind the tests do not know"


def test_overlays_side_by_side_leave_each_other_alone() -> None:
    """In one namespace, an overlay applied beside another must not change what the other
    relies on: an object both render under one name (the environment, the shared volume, a
    runtime) is the same in both. Only the workload itself is replaced by its GPU variant."""
    seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for overlay in ALL_OVERLAYS:
        for obj in render(overlay):
            if obj["kind"] in WORKLOAD_KINDS:
                continue
            key = (obj["kind"], obj["metadata"]["name"])
            first, before = seen.setdefault(key, (overlay, obj))
            assert obj == before, f"{key[0]}/{key[1]} differs between k8s/{first} and k8s/{overlay}"


def test_strict_crd_validation_refuses_unknown_fields() -> None:
    """The CRD check has teeth: a misspelt field fails it (and only the misspelling)."""
    job = copy.deepcopy(find(render("pytorchjob"), "PyTorchJob"))
    _validate_custom_resource(job, "PyTorchJob as rendered")
    job["spec"]["runPolicy"]["backofLimit"] = 3
    with pytest.raises(pytest.fail.Exception, match="backofLimit"):
        _validate_custom_resource(job, "misspelt PyTorchJob")


# --- every command line is a valid invocation of our CLI --------------------------------------


def _cli(module: str) -> click.Command:
    mod = importlib.import_module(module)
    (command,) = {v for v in vars(mod).values() if isinstance(v, click.Command)}
    return command


def _parse(command: click.Command, args: list[str]) -> dict[str, Any]:
    try:
        with command.make_context(command.name, list(args)) as ctx:
            return dict(ctx.params)
    except click.ClickException as exc:
        pytest.fail(f"{command.name} refuses {args}: {exc.format_message()}")


def _parse_torchrun(argv: list[str], env: dict[str, str]) -> Any:
    """torchrun's own parser; its defaults come from PET_* variables read when it is built."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return torch_run.get_args_parser().parse_args(argv)


@pytest.mark.parametrize("overlay", TRAINING_AND_GPU)
def test_training_command_parses_and_fits_the_topology(overlay: str) -> None:
    launch = training_launch(overlay)
    command, *rest = launch.argv
    assert command == "rnnlm-torchrun", f"{overlay}: train through rnnlm-torchrun (exit codes)"
    env = {**plain_env(launch.container), **launch.injected_env}
    args = _parse_torchrun(rest, env)
    assert args.module and args.training_script == "jobs.train", rest
    params = _parse(_cli("jobs.train"), args.training_script_args)
    params["sample_prefixes"] = tuple(params["sample_prefixes"])
    # torchrun's --nnodes / --nproc-per-node agree with the launcher's replicas
    assert (int(args.nnodes), int(args.nproc_per_node)) == (
        launch.num_nodes,
        launch.nproc_per_node,
    ), f"{overlay}: torchrun topology != launcher topology"
    # ... and the global batch splits over all of their processes.
    TrainConfig.from_flat(params).validate(world_size=launch.num_nodes * launch.nproc_per_node)


@pytest.mark.parametrize("overlay", ["train-job", "train-job-gpu"])
def test_indexed_job_topology(overlay: str) -> None:
    """Pods = nodes, and the rendezvous endpoint is pod 0's stable name behind a headless
    Service that selects exactly this Job's pods."""
    objs = render(overlay)
    job = find(objs, "Job", "rnnlm-train")
    spec, launch = job["spec"], training_launch(overlay)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == launch.num_nodes
    env = plain_env(launch.container)
    assert env["PET_RDZV_BACKEND"] == "c10d"
    host, _, port = env["PET_RDZV_ENDPOINT"].rpartition(":")
    subdomain = launch.pod["subdomain"]
    assert host == f"{job['metadata']['name']}-0.{subdomain}"
    service = find(objs, "Service", subdomain)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_one_command_line_everywhere() -> None:
    """The three launchers run the same command, environment and mounts."""
    launches = [training_launch(o) for o in TRAINING_OVERLAYS]
    assert len({tuple(launch.argv) for launch in launches}) == 1, [x.argv for x in launches]
    steps = [prepare_step(launch) for launch in launches]
    assert all(step == steps[0] for step in steps), "the prepare steps differ between launchers"
    for name in ("envFrom", "volumeMounts", "securityContext"):
        values = [launch.container[name] for launch in launches]
        assert all(v == values[0] for v in values), name
    shared = {"RNNLM_CHECKPOINT_DIR", "RNNLM_OUTPUT_DIR", "RNNLM_CACHE_DIR", "OMP_NUM_THREADS"}
    for launch in launches:
        names = {e["name"] for e in launch.container["env"]}
        assert shared <= names, (launch.overlay, shared - names)
        # One job id for all of a job's pods and their retries (--fresh resumes its own), the
        # job's name: the same that names its checkpoint directory.
        env = plain_env(launch.container)
        assert env["RNNLM_JOB_ID"] == "$(RNNLM_JOB_NAME)", launch.overlay
        assert env["RNNLM_CHECKPOINT_DIR"].endswith("/$(RNNLM_JOB_NAME)"), launch.overlay
    # Each launcher its own checkpoints and models: same-named jobs of two launchers on the
    # shared volume would otherwise resume, and overwrite, each other's.
    for name in ("RNNLM_CHECKPOINT_DIR", "RNNLM_OUTPUT_DIR"):
        dirs = {plain_env(launch.container)[name] for launch in launches}
        assert len(dirs) == len(launches), (name, dirs)


@pytest.mark.parametrize("overlay", TRAINING_AND_GPU)
def test_resources_match_the_processes(overlay: str) -> None:
    """GPU pods: one process per GPU and the CUDA image; CPU pods: no GPU, the CPU image."""
    launch = training_launch(overlay)
    limits = launch.resources.get("limits", {})
    requests = launch.resources.get("requests", {})
    assert limits.get("cpu") and limits.get("memory"), f"{overlay}: set CPU and memory limits"
    if overlay.endswith("-gpu"):
        assert int(limits[GPU]) == launch.nproc_per_node, f"{overlay}: nproc != GPUs per pod"
        assert requests.get(GPU, limits[GPU]) == limits[GPU]
        assert launch.container["image"].endswith("-cuda")
        assert any(t.get("key") == GPU for t in launch.pod.get("tolerations", []))
    else:
        assert GPU not in limits and GPU not in requests
        assert launch.container["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", TRAINING_OVERLAYS)
def test_training_pods_have_the_volumes_they_need(overlay: str) -> None:
    launch = training_launch(overlay)
    volumes = {v["name"]: v for v in launch.pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in launch.container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    shared = volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"]
    pvc = find(render(overlay), "PersistentVolumeClaim", shared)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # every node writes checkpoints
    env = plain_env(launch.container)
    assert env["RNNLM_CHECKPOINT_DIR"].startswith("/shared/")
    assert env["RNNLM_OUTPUT_DIR"].startswith("/shared/")


# --- the corpus prepared before training ------------------------------------------------------


class _AnyValue(dict[str, str]):
    """Downward-API and resource values: what they are does not matter here, only that every
    variable resolves."""

    def __missing__(self, key: str) -> str:
        return f"<{key}>"

    def __bool__(self) -> bool:  # empty, yet not "none given"
        return True


def _pod_params(
    objs: tuple[Obj, ...],
    container: Obj,
    command: click.Command,
    args: list[str],
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """What ``command`` makes of ``args`` in ``container``'s environment (``env``, else the one
    the pod would give it, downward-API values left open), flags falling back to it as there."""
    if env is None:
        secret_data = readme_secrets("admin", "postgresql://db")
        env = container_env(objs, container, secret_data, None, _AnyValue(), _AnyValue())
    with mock.patch.dict(os.environ, env, clear=True):
        return _parse(command, args)


def _train_config(objs: tuple[Obj, ...], container: Obj, cli: str, args: list[str]) -> TrainConfig:
    """The settings ``args`` give ``cli`` (a training-flags CLI) in ``container``'s pod."""
    return config_from_flags(_pod_params(objs, container, _cli(cli), args))


def _data_config(objs: tuple[Obj, ...], container: Obj, cli: str, args: list[str]) -> DataConfig:
    """The data settings ``args`` give ``cli`` in ``container``'s environment, as in the pod."""
    return _train_config(objs, container, cli, args).data


def _mount(container: Obj, path: str) -> tuple[str, str, str, bool]:
    """(volume, mountPath, subPath, readOnly) of the mount ``path`` lies on in ``container``."""
    mounts = [
        m
        for m in container.get("volumeMounts", [])
        if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts, f"container {container['name']} does not mount {path}"
    m = max(mounts, key=lambda m: len(m["mountPath"]))
    return m["name"], m["mountPath"], m.get("subPath", ""), m.get("readOnly", False)


def _trainer_config(launch: Launch) -> TrainConfig:
    objs = render(launch.overlay)
    env = {**plain_env(launch.container), **launch.injected_env}
    script_args = _parse_torchrun(launch.argv[1:], env).training_script_args
    return _train_config(objs, launch.container, "jobs.train", script_args)


def _trainer_data_config(launch: Launch) -> DataConfig:
    return _trainer_config(launch).data


@pytest.mark.parametrize("overlay", TRAINING_AND_GPU)
def test_the_corpus_is_prepared_before_training_as_the_trainer_loads_it(overlay: str) -> None:
    """An init container runs ``jobs.prepare`` before the trainer: the same image, the same data
    settings (arguments and environment), the same cache and corpus mounts. Were they to
    differ, it would prepare what the trainer never loads, or where the trainer never looks."""
    launch = training_launch(overlay)
    step = prepare_step(launch)
    assert step["image"] == launch.container["image"], overlay
    argv = prepare_argv(step)
    prepare_data = _data_config(render(overlay), step, "jobs.prepare", argv[3:])
    train_data = _trainer_data_config(launch)
    assert prepare_data == train_data, overlay
    cache_dir = prepare_data.cache_dir
    assert cache_dir, f"{overlay}: name the cache directory (RNNLM_CACHE_DIR)"
    cache = _mount(step, cache_dir)
    assert cache == _mount(launch.container, cache_dir), overlay
    assert not cache[3], f"{overlay}: the prepare step writes the cache"
    # The corpus, where the trainer reads it: its path if local; else where the docs put one.
    corpus = "/shared/corpus/timemachine.txt" if is_url(train_data.corpus) else train_data.corpus
    assert _mount(step, corpus)[:3] == _mount(launch.container, corpus)[:3], overlay
    # It talks to no MLflow: no credentials.
    assert not any("secretRef" in source for source in step.get("envFrom", [])), overlay
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in step.get("env", []))


def test_the_prepare_check_sees_a_divergence() -> None:
    """The check above has teeth: another corpus flag, or the cache elsewhere, fails it."""
    launch = training_launch("train-job")
    step = prepare_step(launch)
    objs = render("train-job")
    same = _data_config(objs, step, "jobs.prepare", prepare_argv(step)[3:])
    assert same == _trainer_data_config(launch)
    raw = _data_config(objs, step, "jobs.prepare", [*step["args"], "--preprocess", "raw"])
    assert raw != same
    moved = copy.deepcopy(step)
    (var,) = [v for v in moved["env"] if v["name"] == "RNNLM_CACHE_DIR"]
    var["value"] = "/shared/cache"
    elsewhere = _data_config(objs, moved, "jobs.prepare", step["args"])
    assert elsewhere.cache_dir == "/shared/cache" and elsewhere != same
    # ... and the step's /shared is read-only, the trainer's not: the mounts differ too.
    assert _mount(moved, "/shared/cache") != _mount(launch.container, "/shared/cache")


def test_the_prepare_step_leaves_bad_input_to_the_trainer(tmp_path: Path) -> None:
    """The step's exact ``sh -c`` command, with a stand-in ``python`` exiting with each code:
    it passes the arguments on, exits 0 where ``jobs.prepare`` exits 2 (bad input: the trainer
    then meets the same error and exits 2 through rnnlm-torchrun, so every launcher fails the
    job at once), and any other code unchanged (203, an outage: the pod is retried)."""
    step = prepare_step(training_launch("train-job"))
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf \'%s\\n\' "$@" > "$ARGS_FILE"\nexit "$EXIT_CODE"\n')
    fake.chmod(0o755)
    for code, expected in [(0, 0), (2, 0), (EXIT_TRANSIENT, EXIT_TRANSIENT), (1, 1), (137, 137)]:
        env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "EXIT_CODE": str(code),
               "ARGS_FILE": str(tmp_path / "args")}  # fmt: skip
        proc = subprocess.run(
            [*step["command"], *step["args"]], env=env, timeout=30, stdin=subprocess.DEVNULL
        )
        assert proc.returncode == expected, (code, proc.returncode)
        assert (tmp_path / "args").read_text().splitlines() == prepare_argv(step)[1:]


def test_sample_job_command_parses() -> None:
    (container,) = containers(render("sample"))
    command = [*container["command"], *container["args"]]
    assert command[:3] == ["python", "-m", "jobs.sample"], command
    _parse(_cli("jobs.sample"), command[3:])


# --- evaluation and promotion, sweeps ------------------------------------------------------
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
INDEX_ENV = "JOB_COMPLETION_INDEX"  # what the Job controller sets in every pod of an Indexed Job


def _kubelet_expand(text: str, env: Mapping[str, str]) -> str:
    """``$(NAME)`` in a command or argument replaced as the kubelet does: by the container's
    variable of that name if it has one, else left as written; ``$$`` is a literal ``$``."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


def _job_container(overlay: str, name: str) -> tuple[Obj, Obj]:
    job = find(render(overlay), "Job", name)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return job, container


def _evaluate_params() -> dict[str, Any]:
    """The evaluate Job's command, parsed by ``jobs.evaluate``'s CLI in the pod's environment."""
    _, container = _job_container("evaluate", "rnnlm-evaluate")
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:3] == ["python", "-m", "jobs.evaluate"], argv
    return _pod_params(render("evaluate"), container, jobs.evaluate.main, argv[3:])


def test_the_evaluate_job_promotes_what_training_registers_on_its_corpus() -> None:
    """The Job evaluates the version the training jobs register (their model name and alias),
    on the corpus they train on (the same variable, and the same mount where it is a file),
    and moves another alias (the champion) only by a fraction in [0, 1)."""
    _, container = _job_container("evaluate", "rnnlm-evaluate")
    params = _evaluate_params()
    trainer = training_launch("train-job")
    trained = _trainer_config(trainer)
    tracking = trained.tracking
    assert params["model_uri"] == f"models:/{tracking.registered_model_name}@{tracking.alias}"
    assert params["promote"] and params["promote"] != tracking.alias, params["promote"]
    assert 0 <= params["min_improvement"] < 1
    assert (params["corpus"], params["corpus_sha1"]) == (
        trained.data.corpus,
        trained.data.corpus_sha1,
    ), "the evaluate Job reads another corpus than training"
    corpus = "/shared/corpus/timemachine.txt" if is_url(params["corpus"]) else params["corpus"]
    assert _mount(container, corpus)[:3] == _mount(trainer.container, corpus)[:3]
    assert params["cache_dir"], "name the cache directory (RNNLM_CACHE_DIR)"
    assert not _mount(container, params["cache_dir"])[3], "the cache must be writable"


SWEEP_JOB = "rnnlm-sweep"


def _sweep_pod(index: int, job_name: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Pod ``index`` of the sweep Job (its Job named ``job_name``, as the label would say): its
    environment, as the kubelet builds it from the downward API, and its command as parsed by
    ``jobs.sweep``'s CLI after the kubelet's ``$(VAR)`` expansion."""
    objs = render("sweep")
    job, container = _job_container("sweep", SWEEP_JOB)
    # Only these two fields: a sweep id or an index taken from any other would fail here.
    downward = {JOB_NAME_LABEL: job_name or job["metadata"]["name"], INDEX_ANNOTATION: str(index)}
    secret_data = readme_secrets("admin", "postgresql://db")
    env = container_env(objs, container, secret_data, None, downward, _AnyValue())
    env.setdefault(INDEX_ENV, str(index))  # the controller appends it unless the pod sets it
    argv = [_kubelet_expand(a, env) for a in [*container["command"], *container.get("args", [])]]
    assert argv[:3] == ["python", "-m", "jobs.sweep"], argv
    return env, _pod_params(objs, container, jobs.sweep.main, argv[3:], env)


def _sweep_spec(tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The spec the sweep pods read (the ConfigMap mounted where ``--spec`` points), and the
    trials ``jobs.sweep`` expands it to."""
    objs = render("sweep")
    job, container = _job_container("sweep", SWEEP_JOB)
    spec_path = _sweep_pod(0)[1]["spec"]
    volume, mount_path, sub_path, _ = _mount(container, spec_path)
    (source,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == volume]
    key = sub_path or os.path.relpath(spec_path, mount_path)
    paths = {i["path"]: i["key"] for i in source["configMap"].get("items", [])}
    config_map = find(objs, "ConfigMap", source["configMap"]["name"])
    text = config_map["data"][paths.get(key, key)]
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    spec = jobs.sweep.read_spec(path)
    return spec, jobs.sweep.expand(spec)


def test_the_sweep_job_runs_every_trial_of_its_spec_once(tmp_path: Path) -> None:
    """One index per trial of the very spec in the ConfigMap, as ``jobs.sweep`` counts them:
    fewer would leave trials unrun, more would fail the extra pods (no such trial)."""
    job, _ = _job_container("sweep", SWEEP_JOB)
    spec = job["spec"]
    _, trials = _sweep_spec(tmp_path)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == len(trials), (
        f"completions {spec['completions']} != the {len(trials)} trials of the sweep's spec"
    )
    assert 1 <= spec["parallelism"] <= spec["completions"]


def test_each_sweep_pod_runs_its_own_trial_of_one_shared_sweep() -> None:
    """Pod i passes --trial i, and every pod the same --sweep-id, the Job's name from its
    pod label (so that the pods find one parent run), whatever the Job is called; each trial
    checkpoints to a directory of its own on the shared volume (a retried trial resumes its
    own), and works in a writable directory."""
    job, container = _job_container("sweep", SWEEP_JOB)
    name, completions = job["metadata"]["name"], job["spec"]["completions"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    checkpoints = set()
    for index in range(completions):
        env, params = _sweep_pod(index)
        assert params["trial"] == index, (index, params["trial"])
        assert params["sweep_id"] == name, params["sweep_id"]
        checkpoint_dir = env["RNNLM_CHECKPOINT_DIR"]
        volume, _, _, read_only = _mount(container, checkpoint_dir)
        claim = volumes[volume]["persistentVolumeClaim"]["claimName"]  # seen from every node
        pvc = find(render("sweep"), "PersistentVolumeClaim", claim)
        assert "ReadWriteMany" in pvc["spec"]["accessModes"] and not read_only, checkpoint_dir
        checkpoints.add(checkpoint_dir)
        assert not _mount(container, params["work_dir"])[3], params["work_dir"]
    assert len(checkpoints) == completions, f"trials share checkpoint directories: {checkpoints}"
    renamed_env, renamed = _sweep_pod(0, job_name="another-sweep")
    assert renamed["sweep_id"] == "another-sweep", "the sweep id is not the Job's name label"
    assert renamed_env["RNNLM_CHECKPOINT_DIR"] not in checkpoints, "sweeps share checkpoints"


def test_sweep_trials_train_like_the_jobs_and_promote_like_the_evaluate_job(
    tmp_path: Path,
) -> None:
    """Each trial's training job (``jobs.train --config`` with the trial's settings, in the
    pod's environment, as ``jobs.sweep`` starts it) gets every setting of the spec (none lost
    to a variable of the pod, which would win over the file), reads the training jobs' corpus
    into the pod's cache, checkpoints where the pod says, and registers into the model the
    evaluate Job promotes in, under an alias of its own (@candidate stays the training jobs');
    the sweep promotes to the evaluate Job's alias."""
    spec, trials = _sweep_spec(tmp_path)
    _, container = _job_container("sweep", SWEEP_JOB)
    trained = _trainer_config(training_launch("train-job"))
    evaluate = _evaluate_params()
    assert spec.get("promote") in (None, evaluate["promote"]), spec.get("promote")
    model_name = evaluate["model_uri"].removeprefix("models:/").partition("@")[0]
    base = spec.get("base") or {}
    for index, trial in enumerate(trials):
        env, _ = _sweep_pod(index)
        values = {**base, **trial}
        config_from_values(values, "--spec")  # as jobs.sweep checks it
        settings = tmp_path / f"trial-{index}.json"
        settings.write_text(json.dumps(values))
        params = _pod_params((), container, _cli("jobs.train"), ["--config", str(settings)], env)
        lost = {
            k: (v, params[k])
            for k, v in values.items()
            if params[k] != (tuple(v) if isinstance(v, list) else v)
        }
        assert not lost, f"trial {index}: the pod's environment overrides the spec: {lost}"
        config = config_from_flags(params)
        assert config.data.corpus == trained.data.corpus, f"trial {index}: another corpus"
        assert config.data.cache_dir and not _mount(container, config.data.cache_dir)[3]
        assert config.checkpoint.checkpoint_dir == env["RNNLM_CHECKPOINT_DIR"]
        assert config.tracking.registered_model_name == model_name, f"trial {index}"
        assert config.tracking.alias != trained.tracking.alias, f"trial {index} takes @candidate"


def test_tracking_server_command_parses() -> None:
    from mlflow import cli as mlflow_cli  # here: it takes seconds to import

    deployment = find(render("tracking"), "Deployment", "rnnlm-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["mlflow"]
    subcommand, *args = container["args"]
    params = _parse(mlflow_cli.cli.commands[subcommand], args)
    assert params["serve_artifacts"] and params["app_name"] == "basic-auth"


# --- failure handling --------------------------------------------------------------------------


DISRUPTED = {("DisruptionTarget", "True")}  # the condition of a preempted or evicted pod


def first_rule(
    rules: list[dict[str, Any]],
    container: str,
    exit_code: int,
    conditions: Collection[tuple[str, str]] = (),
) -> str:
    """The action of the first podFailurePolicy rule that matches a container's exit code (or
    one of the pod's ``conditions``, as (type, status)), as the Job controller picks it;
    "Count" (the default) when none does."""
    for rule in rules:
        if any(
            (c["type"], c.get("status", "True")) in conditions
            for c in rule.get("onPodConditions", [])
        ):
            return rule["action"]
        codes = rule.get("onExitCodes")
        if not codes or codes.get("containerName", container) != container:
            continue
        if (exit_code in codes["values"]) == (codes["operator"] == "In"):
            return rule["action"]
    return "Count"


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_launcher_maps_the_exit_code_contract(overlay: str) -> None:
    """0 done, 2 a mistake (never retried), 203 an outage and 143 a preemption (retried)."""
    for obj in render(overlay):
        if obj["kind"] == "PyTorchJob":  # the v1 operator: ExitCode retries 128-255 only
            for replica in obj["spec"]["pytorchReplicaSpecs"].values():
                assert replica["restartPolicy"] == "ExitCode"
            assert EXIT_TRANSIENT >= 128 and EXIT_PREEMPTED >= 128 and EXIT_USER_ERROR < 128
        for spec in job_specs(obj):
            rules, pod = spec["podFailurePolicy"]["rules"], spec["template"]["spec"]
            # An Indexed Job that retries each index on its own (a sweep: one trial per index)
            # fails the index on a mistake, and the other indexes go on.
            per_index = "backoffLimitPerIndex" in spec
            mistake = "FailIndex" if per_index else "FailJob"
            retries = spec["backoffLimitPerIndex"] if per_index else spec["backoffLimit"]
            for container in (c["name"] for c in pod["containers"]):
                assert first_rule(rules, container, EXIT_USER_ERROR) == mistake, overlay
                assert first_rule(rules, container, EXIT_TRANSIENT) == "Count", overlay
                assert first_rule(rules, container, EXIT_PREEMPTED) == "Count", overlay
                # ... unless the pod was preempted or evicted: then it is not counted.
                preempted = first_rule(rules, container, EXIT_PREEMPTED, DISRUPTED)
                assert preempted == "Ignore", f"k8s/{overlay}: a preempted {container} counts"
                assert retries >= 3, overlay
            for init in (c["name"] for c in pod.get("initContainers", [])):
                # The prepare step never exits 2 (left to the trainer); an outage is retried.
                assert first_rule(rules, init, EXIT_TRANSIENT) == "Count", overlay
                assert first_rule(rules, init, EXIT_PREEMPTED) == "Count", overlay
            stated = [
                r for r in rules if EXIT_TRANSIENT in r.get("onExitCodes", {}).get("values", [])
            ]
            assert stated, (
                f"k8s/{overlay}: say what exit {EXIT_TRANSIENT} does, in a rule of its own"
            )


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_jobs_fail_at_once_on_bad_input_and_retry_disruptions(overlay: str) -> None:
    for obj in render(overlay):
        for spec in job_specs(obj):
            what = f"k8s/{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            pod = spec["template"]["spec"]
            # The API refuses podFailurePolicy unless pods never restart in place.
            assert pod["restartPolicy"] == "Never", what
            rules = spec["podFailurePolicy"]["rules"]
            coded = [r for r in rules if "onExitCodes" in r]
            failing = {r["action"] for r in coded} & {"FailJob", "FailIndex"}
            assert failing, f"{what}: no FailJob (or FailIndex) rule"
            if "FailIndex" in failing:  # the API refuses it otherwise
                assert spec.get("completionMode") == "Indexed", what
                assert spec.get("backoffLimitPerIndex"), what
            for rule in coded:
                codes = rule["onExitCodes"]
                assert codes["operator"] == "In", what
                # The API refuses the list otherwise (and 0 with In).
                values = codes["values"]
                assert values == sorted(set(values)) and 0 not in values, f"{what}: {values}"
                assert codes["containerName"] in {c["name"] for c in pod["containers"]}, what
            assert any(
                r["action"] == "Ignore"
                and {"type": "DisruptionTarget", "status": "True"} in r.get("onPodConditions", [])
                for r in rules
            ), f"{what}: disruptions should not count against backoffLimit"
            for key in ("activeDeadlineSeconds", "ttlSecondsAfterFinished"):
                assert spec.get(key), f"{what}: set {key}"
            if "backoffLimitPerIndex" in spec:
                # A job-wide limit would let a few failed indexes end the ones still to run.
                assert "backoffLimit" not in spec, f"{what}: backoffLimit beside per index"
            else:
                assert spec.get("backoffLimit"), f"{what}: set backoffLimit"


def test_pytorchjob_container_and_restart_policy() -> None:
    for overlay in ("pytorchjob", "pytorchjob-gpu"):
        job = find(render(overlay), "PyTorchJob")
        for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
            names = [c["name"] for c in replica["template"]["spec"]["containers"]]
            assert "pytorch" in names, f"{overlay} {role}: the operator needs a 'pytorch' container"
            # ExitCode: retry exits >= 128 (signals), fail on 1-127 (bad input exits 2).
            assert replica["restartPolicy"] == "ExitCode", f"{overlay} {role}"
        run_policy = job["spec"]["runPolicy"]
        for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
            assert run_policy.get(key), f"{overlay}: set runPolicy.{key}"


def test_trainjob_runtime_does_not_restart_failed_jobs() -> None:
    """A JobSet restart would rerun bad input; retries belong to the Job (podFailurePolicy)."""
    for overlay in ("trainjob", "trainjob-gpu"):
        runtime = find(render(overlay), "TrainingRuntime")
        assert runtime["spec"]["template"]["spec"]["failurePolicy"]["maxRestarts"] == 0


# --- images and security -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_images_are_pinned(overlay: str) -> None:
    objs = render(overlay)
    images = [c["image"] for c in containers(objs)]
    images += [o["spec"]["trainer"]["image"] for o in objs if o["kind"] == "TrainJob"]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag and tag != "latest"), image


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_pods_run_as_non_root_restricted(overlay: str) -> None:
    """The 'restricted' Pod Security Standard, on every pod the overlay creates."""
    objs = render(overlay)
    for obj in objs:
        for pod in pod_specs(obj):
            what = f"k8s/{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            ctx = pod.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) > 0, what
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, (what, c["name"])
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], (what, c["name"])
                assert sc.get("runAsUser", 1) != 0, (what, c["name"])


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_no_pod_mounts_a_service_account_token(overlay: str) -> None:
    """None of them calls the Kubernetes API: a mounted token would only be there to steal."""
    for obj in render(overlay):
        for pod in pod_specs(obj):
            assert pod.get("automountServiceAccountToken") is False, f"k8s/{overlay}: {obj['kind']}"


@pytest.mark.parametrize("overlay", TRAINING_AND_GPU)
def test_the_sigterm_checkpoint_fits_the_grace_period(overlay: str) -> None:
    """On SIGTERM a worker finishes its step, writes a checkpoint, gives MLflow at most 10 s and
    exits 143; torchrun allows its workers 30 s of that. The pod must not be killed first."""
    grace = training_launch(overlay).pod.get("terminationGracePeriodSeconds")
    assert grace is not None and grace >= 40, f"k8s/{overlay}: terminationGracePeriodSeconds"


# --- network policies: who may connect to whom ----------------------------------------------
# The labels the controllers add to the pods they create, beside the template's own.
CONTROLLER_POD_LABELS = {
    "Job": "batch.kubernetes.io/job-name",
    "PyTorchJob": "training.kubeflow.org/job-name",
    "TrainJob": "jobset.sigs.k8s.io/jobset-name",  # Trainer names the JobSet after it
}


def _pods(objs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    """Each kind of pod the objects create -> the labels it will carry."""
    pods = {}
    for obj in objs:
        name, kind = obj["metadata"]["name"], obj["kind"]
        if kind == "TrainingRuntime":
            (trainjob,) = [o for o in objs if o["kind"] == "TrainJob"]
            name, kind = trainjob["metadata"]["name"], "TrainJob"
            templates = [
                r["template"]["spec"]["template"]
                for r in obj["spec"]["template"]["spec"]["replicatedJobs"]
            ]
        elif kind == "PyTorchJob":
            templates = [r["template"] for r in obj["spec"]["pytorchReplicaSpecs"].values()]
        elif kind in ("Job", "Deployment", "StatefulSet"):
            templates = [obj["spec"]["template"]]
        else:
            continue
        for template in templates:
            labels = dict(template.get("metadata", {}).get("labels", {}))
            if kind in CONTROLLER_POD_LABELS:
                labels[CONTROLLER_POD_LABELS[kind]] = name
            pods[f"{kind}/{name}"] = labels
    return pods


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    ops = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, values: key in labels,
        "DoesNotExist": lambda key, values: key not in labels,
    }
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and all(
        ops[e["operator"]](e["key"], e.get("values", []))
        for e in selector.get("matchExpressions", [])
    )


def _admits(
    policies: list[dict[str, Any]], to: dict[str, str], source: dict[str, str], port: int
) -> bool:
    """Whether a pod labelled ``source`` may open ``port`` on a pod labelled ``to`` (both in the
    namespace of the policies), by the rules of NetworkPolicy ingress."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], to)]
    if not selecting:
        return True  # no policy selects it: open to all
    for policy in selecting:
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            assert all(set(peer) == {"podSelector"} for peer in rule["from"]), "pods only"
            ports = [p["port"] for p in rule.get("ports", [])]
            if (not ports or port in ports) and any(
                _selects(peer["podSelector"], source) for peer in rule["from"]
            ):
                return True
    return False


def _policies(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("overlay", ALL_OVERLAYS)
def test_every_pod_is_behind_a_network_policy(overlay: str) -> None:
    objs = render(overlay)
    for pod, labels in _pods(objs).items():
        assert any(_selects(p["spec"]["podSelector"], labels) for p in _policies(objs)), pod


@pytest.mark.parametrize("overlay", TRAINING_AND_GPU)
def test_training_pods_take_connections_only_from_their_own_job(overlay: str) -> None:
    """The rendezvous store unpickles what its object collectives receive: only the job's own
    pods may reach it, or the collectives' ports."""
    objs = render(overlay)
    policies = _policies(objs)
    ((pod, labels),) = _pods(objs).items()
    other_job = {
        **labels,
        **{k: "other-job" for k in CONTROLLER_POD_LABELS.values() if k in labels},
    }
    for port in (29400, 45000):  # the rendezvous store, a collective's port
        assert _admits(policies, labels, labels, port), f"{overlay}: {pod} from its own job"
        assert not _admits(policies, labels, other_job, port), f"{overlay}: from another job"
        assert not _admits(policies, labels, {}, port), f"{overlay}: from any pod"


def test_mlflow_takes_the_projects_workloads_and_postgres_only_mlflow() -> None:
    tracking = render("tracking")
    policies = _policies(tracking)
    servers = _pods(tracking)
    mlflow, db = servers["Deployment/rnnlm-mlflow"], servers["StatefulSet/rnnlm-mlflow-db"]
    for overlay in [*TRAINING_AND_GPU, *MLFLOW_CLIENT_OVERLAYS]:  # every client of MLflow
        ((pod, labels),) = _pods(render(overlay)).items()
        assert _admits(policies, mlflow, labels, 5000), f"k8s/{overlay}: {pod} cannot reach MLflow"
        assert not _admits(policies, db, labels, 5432), f"k8s/{overlay}: {pod} reaches PostgreSQL"
    assert not _admits(policies, mlflow, {"app.kubernetes.io/name": "someone-else"}, 5000)
    assert _admits(policies, db, mlflow, 5432)
    assert not _admits(policies, db, {}, 5432)


@pytest.mark.parametrize("overlay", [*TRAINING_OVERLAYS, *MLFLOW_CLIENT_OVERLAYS])
def test_mlflow_settings_come_from_the_environment(overlay: str) -> None:
    objs = render(overlay)
    env_map = find(objs, "ConfigMap", "rnnlm-env")["data"]
    assert env_map["MLFLOW_TRACKING_URI"].startswith("http://")
    tracking = find(render("tracking"), "Service", "rnnlm-mlflow")
    port = tracking["spec"]["ports"][0]["port"]
    assert env_map["MLFLOW_TRACKING_URI"] == f"http://{tracking['metadata']['name']}:{port}"
    ours = [c for c in containers(objs) if c["image"].startswith(OUR_IMAGES)]
    if overlay == "trainjob":
        launch = training_launch(overlay)
        ours = [launch.container, *launch.pod.get("initContainers", [])]
    for c in ours:
        argv = " ".join([*c.get("command", []), *c.get("args", [])])
        assert "tracking-uri" not in argv and "PASSWORD" not in argv
        sources = c["envFrom"]
        assert {"configMapRef": {"name": "rnnlm-env"}} in sources
        if c["name"] != PREPARE:  # it talks to no MLflow (see the prepare step's test)
            assert {"secretRef": {"name": "rnnlm-mlflow-auth"}} in sources


def test_tracking_server() -> None:
    objs = render("tracking")
    deployment = find(objs, "Deployment", "rnnlm-mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = server["args"]
    assert "--serve-artifacts" in args and "--app-name=basic-auth" in args
    for probe in ("readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/health", probe
    assert server["resources"]["requests"]
    # Secrets reach the server only through the environment, never its arguments.
    assert {"secretRef": {"name": "rnnlm-mlflow-server"}} in server["envFrom"]
    assert not any("postgresql://" in a or "password" in a.lower() for a in args)
    # The basic-auth config names no password (MLFLOW_AUTH_ADMIN_PASSWORD supplies it).
    (auth_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    auth_map = find(objs, "ConfigMap", auth_volume["configMap"]["name"])
    auth = auth_map["data"]["basic_auth.ini"]
    assert "admin_password" not in auth
    db = find(objs, "StatefulSet", "rnnlm-mlflow-db")
    (postgres,) = db["spec"]["template"]["spec"]["containers"]
    password = next(e for e in postgres["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"]["name"] == "rnnlm-mlflow-db"
    assert db["spec"]["volumeClaimTemplates"]
