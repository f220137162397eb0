"""Evaluation and promotion against a real ``mlflow server``: two trained versions, the better
one becomes @champion, a worse challenger is refused, a repeated promotion changes nothing, and
the figures are version tags that ``search_model_versions`` filters on."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import job_env, run_job
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.integration

NAME = "promo-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    with mlflow_server(tmp_path_factory.mktemp("promo-server")) as url:
        yield url


def train(corpus: Path, work: Path, server: str, epochs: int) -> None:
    args = [
        "--corpus", str(corpus), "--tracking-uri", server, "--experiment", "promo",
        "--registered-model-name", NAME, "--output-dir", str(work), "--epochs", str(epochs),
        "--num-hiddens", "32", "--max-tokens", "3000", "--val-tokens", "1000",
        "--sample-every", "1000", "--cpu-kernel", "torch",
    ]  # fmt: skip
    proc = run_job(args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def versions(corpus_path: Path, server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Version 1 barely trained, version 2 trained for longer: 2 is the better model."""
    work = tmp_path_factory.mktemp("promo")
    train(corpus_path, work / "weak", server, epochs=1)
    train(corpus_path, work / "strong", server, epochs=40)
    return server


def evaluate(server: str, corpus: Path, *args: str):
    flags = ["--corpus", str(corpus), "--tracking-uri", server, *args]
    return run_job(flags, module="jobs.evaluate", env=job_env())


def champion(server: str) -> str:
    return MlflowClient(server).get_model_version_by_alias(NAME, "champion").version


def evaluation_runs(server: str) -> list:
    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("rnnlm-evaluation")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_evaluation_reproduces_the_training_figure_and_tags_the_version(
    versions: str, corpus_path: Path
) -> None:
    client = MlflowClient(versions)
    trained = client.get_model_version(NAME, "2")
    assert float(trained.tags["val_perplexity"]) > 1  # training tags its version too
    proc = evaluate(versions, corpus_path, "--model-uri", f"models:/{NAME}/2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("evaluated: val_perplexity")
    run_val = client.get_metric_history(trained.run_id, "val_perplexity")[-1].value
    tags = client.get_model_version(NAME, "2").tags
    # The same slice, layout and weights as the training job's last validation.
    assert float(tags["val_perplexity"]) == pytest.approx(run_val, rel=1e-5)
    assert tags["eval_slice"].endswith("[3000:4000]")
    found = client.search_model_versions(
        f"name = '{NAME}' and tags.eval_run_id = '{tags['eval_run_id']}'"
    )
    assert [v.version for v in found] == ["2"]
    run = client.get_run(tags["eval_run_id"])
    assert run.data.metrics["val_bpc"] == pytest.approx(float(tags["val_bpc"]), rel=1e-5)
    assert run.inputs.dataset_inputs, "the slice is the evaluation run's dataset"


def test_the_better_model_becomes_champion_and_a_worse_one_is_refused(
    versions: str, corpus_path: Path
) -> None:
    promote = ("--promote", "champion", "--min-improvement", "0.01")
    first = evaluate(versions, corpus_path, "--model-uri", f"models:/{NAME}/1", *promote)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("promoted: no @champion yet")
    assert champion(versions) == "1"

    better = evaluate(versions, corpus_path, "--model-uri", f"models:/{NAME}@candidate", *promote)
    assert better.returncode == 0, better.stderr[-3000:]
    assert better.stdout.startswith("promoted: challenger")
    assert champion(versions) == "2"
    decision = MlflowClient(versions).get_run(
        MlflowClient(versions).get_model_version(NAME, "2").tags["eval_run_id"]
    )
    assert decision.data.tags["decision"] == "promoted"
    ours, theirs = (decision.data.metrics[k] for k in ("val_perplexity", "champion_val_perplexity"))
    assert ours < theirs * 0.99

    worse = evaluate(versions, corpus_path, "--model-uri", f"models:/{NAME}/1", *promote)
    assert worse.returncode == 0, worse.stderr[-3000:]  # losing is an outcome, not an error
    assert worse.stdout.startswith("kept: challenger")
    assert len(worse.stdout.strip().splitlines()) == 1
    assert champion(versions) == "2"
    assert (
        MlflowClient(versions)
        .get_model_version(NAME, "1")
        .tags["promotion"]
        .startswith("refused @champion")
    )

    before = len(evaluation_runs(versions))
    again = evaluate(versions, corpus_path, "--model-uri", f"models:/{NAME}/2", *promote)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds @champion: nothing to do" in again.stdout
    assert len(evaluation_runs(versions)) == before and champion(versions) == "2"


def test_a_vocabulary_that_cannot_encode_the_slice_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "ab.txt"
    text.write_text("ab ba abba baab " * 40)
    model = tmp_path / "model"
    args = [
        "--corpus", str(text), "--preprocess", "raw", "--output-dir", str(model),
        "--epochs", "1", "--num-hiddens", "8", "--max-tokens", "400", "--val-tokens", "100",
        "--batch-size", "4", "--num-steps", "5", "--no-tracking", "--sample-prefix", "ab",
        "--cpu-kernel", "torch",
    ]  # fmt: skip
    assert run_job(args).returncode == 0
    other = tmp_path / "xyz.txt"
    other.write_text("xyz zyx " * 100)
    proc = evaluate(f"sqlite:///{tmp_path / 'mlflow.db'}", other, "--model-uri", str(model))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: --model-uri: ") and "lacks ['x', 'y', 'z']" in lines[-1]
    assert "Traceback" not in proc.stderr
