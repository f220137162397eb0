"""The MLflow Model Registry: register a trained model, and find one again to sample from.

A registered model is an MLflow pyfunc built as "model from code" (``rnnlm/pyfunc_model.py``
is the code; no pickled Python object is stored). Its artifacts are plain files: the
state_dict as safetensors, the model config and the vocabulary as JSON.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rnnlm import artifacts
from rnnlm.corpus import sha1_of
from rnnlm.errors import UserError

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_NAME_IN_RUN = "model"
SERVING_FILES = (artifacts.WEIGHTS, artifacts.MODEL_CONFIG, artifacts.VOCAB)
WEIGHTS_TAG = "rnnlm.weights_sha1"  # which weights a logged model or a version holds


def signature():  # -> mlflow.models.ModelSignature
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prefix")]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema(
            [
                ParamSpec("num_chars", "long", 50),
                ParamSpec("temperature", "double", 0.0),
                ParamSpec("top_k", "long", 0),  # 0: no restriction
                ParamSpec("seed", "long", 0),
            ]
        ),
    )


SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "mlflow")


def requirements() -> list[str]:
    """What serving the model installs: the releases it was trained with, pinned, so that an
    environment built for it (``mlflow models serve --env-manager virtualenv``) does not take
    whatever is newest. torch is pinned without its build tag (``+cpu``, ``+cu128``), which
    pip cannot install from PyPI: the serving machine's pip picks that release's wheel."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def log_and_register(
    run_id: str, model_dir: Path, name: str, alias: str, summary: dict[str, float]
) -> int:
    """Log ``model_dir`` as a pyfunc in run ``run_id``, register it as ``name`` and point
    ``alias`` at the new version. Returns the version number. Idempotent: a retry, or the same
    job run again, finds the model and the version of these weights that an earlier try of this
    run logged or registered, rather than adding another (a run that trained on registers anew)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    weights = {WEIGHTS_TAG: sha1_of(Path(model_dir) / artifacts.WEIGHTS)}
    mine = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if v.tags.get(WEIGHTS_TAG) == weights[WEIGHTS_TAG]]  # fmt: skip
    if mine:
        version = min(int(v.version) for v in mine)
        log.info("found version %d of %s, registered by this run", version, name)
    else:
        version = _register(client, run_id, model_dir, name, weights)
    client.set_registered_model_alias(name, alias, str(version))
    description = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in summary.items())
    client.update_model_version(name, str(version), description=f"Final {description}.")
    for key, value in summary.items():  # queryable: search_model_versions filters on tags
        client.set_model_version_tag(name, str(version), key, f"{value:.6g}")
    log.info("registered %s version %d as @%s", name, version, alias)
    return version


def _register(client: Any, run_id: str, model_dir: Path, name: str, weights: dict[str, str]) -> int:
    """Register this run's logged model of these ``weights`` (a tag), logging it first unless
    an earlier try did."""
    import mlflow

    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([experiment], f"source_run_id = '{run_id}'")
    ready = [  # not a half-uploaded one, not one of earlier weights
        m.model_id for m in logged if str(m.status) == "READY" and m.tags.items() >= weights.items()
    ]
    model_id = ready[0] if ready else _log_model(run_id, model_dir, weights)
    return int(mlflow.register_model(f"models:/{model_id}", name, tags=weights).version)


def _log_model(run_id: str, model_dir: Path, tags: dict[str, str]) -> str:
    """Log the model directory as a pyfunc in the run; its logged model's id."""
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        serving = Path(tmp) / "model_dir"
        serving.mkdir()
        for file in SERVING_FILES:  # only plain files: no model.pt (a zip with a pickle)
            shutil.copy2(Path(model_dir) / file, serving / file)
        # The core as source only: no bytecode caches, no extension (serving needs neither)
        code = Path(tmp) / "rnnlm"
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "extensions")
        shutil.copytree(PACKAGE_DIR, code, ignore=skip)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=str(PYFUNC_CODE),
                artifacts={"model_dir": str(serving)},
                code_paths=[str(code)],
                signature=signature(),
                input_example=(pd.DataFrame({"prefix": ["time traveller"]}), {"num_chars": 20}),
                pip_requirements=requirements(),
                tags=tags,
            )
    return str(info.model_id)


def download_model(model_uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Fetch a model to ``dst`` and return the directory holding weights, config and vocab.

    ``model_uri``: ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model``, or a local
    model directory (a training ``--output-dir``).
    """
    local = Path(model_uri).expanduser()
    if local.is_dir():
        return local if (local / artifacts.WEIGHTS).is_file() else local / "artifacts/model_dir"
    if not model_uri.startswith(("models:/", "runs:/")):
        raise UserError(
            f"--model-uri: {model_uri!r} is neither a model directory nor a models:/ or runs:/ "
            "URI; pass e.g. models:/rnnlm-timemachine@candidate."
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if model_uri.startswith("models:/"):
        _check_registered(model_uri)
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst))
    except MlflowException as exc:
        raise UserError(f"--model-uri: cannot load {model_uri}: {exc.message}") from None
    return Path(path) / "artifacts" / "model_dir"


def _check_registered(model_uri: str) -> None:
    """Turn an unknown model name, version or alias into a one-line error naming what exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    ref = model_uri.removeprefix("models:/").split("/")
    name, _, alias = ref[0].partition("@")
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise UserError(
            f"--model-uri: no registered model {name!r}; registered models: "
            f"{', '.join(names) or 'none'}."
        ) from None
    aliases = model.aliases or {}
    if alias and alias not in aliases:
        known = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items()))
        raise UserError(
            f"--model-uri: {name!r} has no alias {alias!r}; its aliases: {known or 'none'}."
        )
    if not alias and len(ref) > 1 and ref[1].isdigit():
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        if int(ref[1]) not in versions:
            raise UserError(
                f"--model-uri: {name!r} has no version {ref[1]}; versions: "
                f"{', '.join(map(str, versions))}."
            )


def version_of(model_uri: str) -> Any | None:
    """The registered version ``model_uri`` names (``models:/name@alias``, ``models:/name/N``),
    else None (a run's model, a directory)."""
    if not model_uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    _check_registered(model_uri)
    name, _, alias = model_uri.removeprefix("models:/").split("/")[0].partition("@")
    client = MlflowClient()
    if alias:
        return client.get_model_version_by_alias(name, alias)
    return client.get_model_version(name, model_uri.removeprefix("models:/").split("/")[1])


def alias_holder(name: str, alias: str) -> Any | None:
    """The version ``alias`` points at, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def training_settings(version: Any) -> dict[str, str]:
    """The training job's settings (its run's parameters) of a registered version."""
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(version.run_id).data.params) if version.run_id else {}


def tag_version(version: Any, tags: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(version.name, str(version.version), key, value)


def move_alias(version: Any, alias: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(version.name, alias, str(version.version))
