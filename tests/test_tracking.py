"""MLflow tracking and the Model Registry, against a real server and the embedded default."""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from rnnlm.artifacts import read_model_dir
from rnnlm.config import TrackingConfig
from rnnlm.generate import generate
from rnnlm.records import EpochStats
from tests.conftest import ROOT, free_port, job_env, read_train_info, run_job
from tests.mlflow_server import mlflow_server, stop_server

EPOCHS = 6
METRICS = [
    "train_perplexity", "val_perplexity", "tokens_per_s", "rank0_tokens_per_s",
    "rank1_tokens_per_s", "grad_norm",
]  # fmt: skip


def job_args(corpus: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "--corpus", str(corpus), "--output-dir", str(out), "--epochs", str(EPOCHS),
        "--sample-every", "3", "--num-hiddens", "64", "--experiment", "tests", *extra,
    ]  # fmt: skip


def check_run(client: MlflowClient, out: Path) -> str:
    """Exactly one run holding everything a reviewer expects; returns its id."""
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    info = read_train_info(out)
    assert info["mlflow_run_id"] == run.info.run_id
    assert run.data.params["num_hiddens"] == "64" and run.data.params["epochs"] == str(EPOCHS)
    assert set(info["config"]) <= set(run.data.params)  # every config value
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["backend"] == "gloo" and tags["device"] == "cpu"
    assert tags["corpus_sha1"] == "090b5e7e70c295757f55df93cb0a180b9691891a"
    assert {"torch_version", "rnnlm_version"} <= set(tags)
    for name in METRICS:
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), name
    # the learning rate when it changes: here it never does
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "lr")] == [
        (1, 1.0)
    ]
    train_ppl = sorted(
        client.get_metric_history(run.info.run_id, "train_perplexity"), key=lambda m: m.step
    )
    assert [m.value for m in train_ppl] == pytest.approx(info["perplexity_by_epoch"])
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples", "samples.json", "perplexity.png", "vocab.json", "config.json"} <= paths
    samples = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert samples == {"samples/epoch_0003.txt", f"samples/epoch_{EPOCHS:04d}.txt"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json")).read_text())
    assert table["columns"] == ["epoch", "prefix", "text"] and len(table["data"]) == 3
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == "090b5e7e70"
    version = client.get_model_version_by_alias("rnnlm-timemachine", "candidate")
    assert version.run_id == run.info.run_id
    assert "train perplexity" in version.description and "val perplexity" in version.description
    return run.info.run_id


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    with mlflow_server(tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.fixture(scope="module")
def trained(server: str, tmp_path_factory, corpus_path: Path) -> Path:
    """A 2-rank torchrun job logged to the real server; its local output directory."""
    work = tmp_path_factory.mktemp("job")
    corpus = work / "timemachine.txt"
    shutil.copy(corpus_path, corpus)  # removed later: sampling must not need it
    out = work / "model"
    # An interval longer than the job: its system metrics are the sample taken at the end.
    env = job_env(MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="600")
    proc = run_job(job_args(corpus, out, "--tracking-uri", server), nproc=2, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.integration
def test_two_rank_job_logs_one_complete_run_to_a_server(server: str, trained: Path) -> None:
    client = MlflowClient(server)
    run = client.get_run(check_run(client, trained))
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )


@pytest.mark.integration
def test_embedded_default_store(corpus_path: Path, tmp_path: Path) -> None:
    """No server, no MLFLOW_TRACKING_URI: MLflow's local sqlite store in the working dir."""
    out = tmp_path / "model"
    proc = run_job(job_args(corpus_path, out), nproc=2, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mlflow.db").is_file()
    check_run(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), out)


def sample(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_job(
        ["--model-uri", "models:/rnnlm-timemachine@candidate", *args],
        module="jobs.sample",
        env=job_env(MLFLOW_TRACKING_URI=server),
        cwd=ROOT,
    )


@pytest.mark.integration
def test_sampling_job_matches_in_process_greedy_generation(server: str, trained: Path) -> None:
    module, vocab = read_model_dir(trained)
    prefixes = ["time traveller", "the machine", "he said"]
    expected = generate(module, vocab, prefixes, 60)
    (trained.parent / "timemachine.txt").unlink()  # sampling needs no training data...
    aside = trained.parent.with_name("moved-away")
    trained.parent.rename(aside)  # ...nor the training output directory
    args = [a for p in prefixes for a in ("--prefix", p)]
    try:
        proc = sample(server, *args, "--num-chars", "60")
    finally:
        aside.rename(trained.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected

    seeded = ["--temperature", "1.0", "--top-k", "5", "--num-chars", "80", "--format", "jsonl"]
    first = sample(server, *args, *seeded, "--seed", "7").stdout
    assert first == sample(server, *args, *seeded, "--seed", "7").stdout  # reproducible
    assert first != sample(server, *args, *seeded, "--seed", "8").stdout
    records = [json.loads(line) for line in first.splitlines()]
    assert [r["prefix"] for r in records] == prefixes
    assert all(len(r["text"]) == len(r["prefix"]) + 80 for r in records)


@pytest.mark.integration
def test_sampling_errors_name_what_exists(server: str, trained: Path) -> None:
    proc = run_job(
        ["--model-uri", "models:/rnnlm-timemachine@nope"], module="jobs.sample",
        env=job_env(MLFLOW_TRACKING_URI=server),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: --model-uri: 'rnnlm-timemachine' has no alias 'nope'; its aliases: "
        "@candidate (version 1)."
    )
    proc = run_job(
        ["--model-uri", "models:/other@candidate"], module="jobs.sample",
        env=job_env(MLFLOW_TRACKING_URI=server),
    )  # fmt: skip
    assert "no registered model 'other'; registered models: rnnlm-timemachine." in proc.stderr
    proc = sample(server, "--prefix", "Time Traveller!")
    assert proc.returncode == 2
    assert "--prefix: characters outside the model's vocabulary: ['!', 'T']" in proc.stderr
    assert "--map-unknown" in proc.stderr
    mapped = sample(server, "--prefix", "Time Traveller!", "--map-unknown")
    assert mapped.returncode == 0 and mapped.stdout.startswith("Time Traveller!")


@pytest.mark.integration
def test_registered_artifacts_hold_no_pickle(server: str, trained: Path, tmp_path: Path) -> None:
    client = MlflowClient(server)
    version = client.get_model_version_by_alias("rnnlm-timemachine", "candidate")
    import mlflow

    mlflow.set_tracking_uri(server)
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/rnnlm-timemachine/{version.version}", dst_path=str(tmp_path)
        )
    )
    files = [p for p in local.rglob("*") if p.is_file()]
    names = {p.relative_to(local).as_posix() for p in files}
    assert {
        "MLmodel",
        "artifacts/model_dir/model.safetensors",
        "artifacts/model_dir/vocab.json",
    } <= names
    for path in files:
        assert path.suffix not in {".pkl", ".pickle", ".pt", ".pth", ".pyc", ".joblib"}, path
        head = path.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in bytes(range(2, 6))), f"pickle: {path}"
    mlmodel = (local / "MLmodel").read_text()
    assert "python_model.pkl" not in mlmodel and "model_code_path" in mlmodel
    # Only the core's source travels with the model: no extension, no compiled library.
    assert not any("/extensions/" in n or n.endswith(".so") for n in names), sorted(names)


@pytest.mark.integration
def test_registered_model_pins_the_releases_it_was_trained_with(
    server: str, trained: Path, tmp_path: Path
) -> None:
    """Serving it in a fresh environment installs these releases, not today's newest."""
    from importlib.metadata import version

    import mlflow

    mlflow.set_tracking_uri(server)
    local = Path(mlflow.artifacts.download_artifacts(
        "models:/rnnlm-timemachine@candidate", dst_path=str(tmp_path)))  # fmt: skip
    pinned = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    assert set(pinned) >= {"torch", "mlflow", "safetensors", "numpy", "pandas"}, pinned
    assert pinned["torch"] == version("torch").split("+")[0]  # 2.13.0, not 2.13.0+cpu
    assert pinned["mlflow"] == version("mlflow")


@pytest.mark.integration
def test_mlflow_models_serve_answers(server: str, trained: Path, tmp_path: Path) -> None:
    module, vocab = read_model_dir(trained)
    (expected,) = generate(module, vocab, ["time traveller"], 30)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         "models:/rnnlm-timemachine@candidate", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=job_env(MLFLOW_TRACKING_URI=server, RNNLM_MAX_NUM_CHARS="100"),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "wb"), start_new_session=True,  # noqa: SIM115
    )  # fmt: skip
    try:
        body = {
            "dataframe_split": {"columns": ["prefix"], "data": [["time traveller"]]},
            "params": {"num_chars": 30},
        }
        deadline = time.monotonic() + 120
        while True:
            try:
                resp = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=30)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "model server did not start"
                time.sleep(1)
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"] == [{"text": expected}]
        # Requests out of bounds: 400, naming the parameter (the limit on num_chars set to 100
        # by RNNLM_MAX_NUM_CHARS above).
        url, bad = f"http://127.0.0.1:{port}/invocations", {
            "num_chars": ({"num_chars": 101}, ["prefix"]),
            "temperature": ({"temperature": -1.0}, ["prefix"]),
            "top_k": ({"top_k": -1, "temperature": 1.0}, ["prefix"]),
            "prefix": ({}, [""]),
            "RNNLM_MAX_PREFIXES": ({}, ["time"] * 257),
            "RNNLM_MAX_PREFIX_CHARS": ({}, ["t" * 1001]),
            "vocabulary": ({}, ["Time!"]),
        }  # fmt: skip
        for needle, (params, prefixes) in bad.items():
            rows = [[p] for p in prefixes]
            body = {"dataframe_split": {"columns": ["prefix"], "data": rows}, "params": params}
            refused = requests.post(url, json=body, timeout=30)
            assert refused.status_code == 400 and needle in refused.json()["message"], needle
    finally:
        stop_server(proc)


@pytest.mark.integration
def test_unreachable_server_at_start_fails_before_training(
    corpus_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    url = f"http://127.0.0.1:{free_port()}"
    args = job_args(corpus_path, out, "--tracking-uri", url, "--outage-timeout", "0")
    proc = run_job(args, nproc=2, cwd=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "cannot reach the MLflow tracking server" in errors[0]
    assert "epoch 1" not in proc.stderr  # no training happened
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_live_metrics_carry_the_newest_epoch_and_the_close_sends_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While training, each metrics call carries only the newest epoch's rows (one call per
    METRICS_EVERY_S); the epochs in between reach the store when the run closes."""
    from rnnlm import tracking

    monkeypatch.setattr(tracking, "METRICS_EVERY_S", 0.0)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "600")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = TrackingConfig(tracking_uri=uri, experiment="tests", registered_model_name="live")
    tracker = tracking.MlflowTracker(settings)
    client, run_id = MlflowClient(uri), tracker.run_id
    assert run_id is not None

    def epochs(first: int, last: int) -> None:
        for epoch in range(first, last + 1):
            stats = EpochStats(epoch, 10.0 / epoch, 100, 0.01, 1e4, 1e4, 0.5, 1.0)
            tracker.log_epoch(stats, {"val_perplexity": 20.0 / epoch})

    def logged() -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "train_perplexity"))

    epochs(1, 1)
    assert tracker.wait_sent(60)
    gate = threading.Event()  # the sender waits here: epochs 2-9 pile up for one call
    tracker.sender.submit("gate", lambda: gate.wait(60))
    epochs(2, 9)
    gate.set()
    assert tracker.wait_sent(60)
    assert logged() == [1, 9]
    tracker.close("FINISHED")
    assert logged() == list(range(1, 10))
    history = client.get_metric_history(run_id, "val_perplexity")
    assert sorted((m.step, m.value) for m in history) == [(e, 20.0 / e) for e in range(1, 10)]


def test_closing_sends_waiting_metrics_without_waiting_out_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A metrics send waiting for its interval goes out as soon as the run closes: the job's
    end (and a preempted job's 10 s) must not wait up to METRICS_EVERY_S for it. With an hour's
    interval and 20 s to flush, waiting it out would leave epoch 2 unsent."""
    from rnnlm import tracking

    monkeypatch.setattr(tracking, "METRICS_EVERY_S", 3600.0)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "600")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = TrackingConfig(tracking_uri=uri, experiment="tests",
                              registered_model_name="closing", tracking_timeout=20.0)  # fmt: skip
    tracker = tracking.MlflowTracker(settings)
    client, run_id = MlflowClient(uri), tracker.run_id
    assert run_id is not None
    for epoch in (1, 2):  # epoch 1 goes at once; epoch 2's send then waits out the interval
        tracker.log_epoch(EpochStats(epoch, 5.0, 100, 0.01, 1e4, 1e4, 0.5, 1.0), {})
        if epoch == 1:
            assert tracker.wait_sent(60)
    assert tracker.next_metrics_send - time.monotonic() > 1800  # epoch 2's send is waiting
    tracker.close("FINISHED")
    logged = client.get_metric_history(run_id, "train_perplexity")
    assert sorted(m.step for m in logged) == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


class _CorpusWithPassword(http.server.BaseHTTPRequestHandler):
    """Serves the corpus only to a request with the right basic-auth credentials."""

    corpus: bytes = b""
    expected = "Basic " + base64.b64encode(b"reader:corpus-s3cret").decode()

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.corpus)))
        self.end_headers()
        self.wfile.write(self.corpus)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.integration
def test_credentials_in_urls_are_written_nowhere(corpus_path: Path, tmp_path: Path) -> None:
    """A user and password inside the corpus URL or the tracking URI reach no log, MLflow
    record (params, tags, dataset), artifact, model file or checkpoint."""
    _CorpusWithPassword.corpus = corpus_path.read_bytes()
    corpus_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CorpusWithPassword)
    threading.Thread(target=corpus_server.serve_forever, daemon=True).start()
    corpus_url = f"http://reader:corpus-s3cret@127.0.0.1:{corpus_server.server_port}/tm.txt"
    try:
        with mlflow_server(tmp_path / "server") as url:
            tracking = url.replace("http://", "http://someone:tracking-s3cret@")
            proc = run_job(
                [*job_args(corpus_url, tmp_path / "model", "--tracking-uri", tracking),
                 "--checkpoint-dir", str(tmp_path / "ckpt")],
                nproc=2, env=job_env(),
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
            client = MlflowClient(url)
            (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
            assert run.data.params["corpus"] == corpus_url.replace("reader:corpus-s3cret@", "***@")
    finally:
        corpus_server.shutdown()
    written = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    for folder in ("model", "ckpt", "server"):  # the server's: its database and artifacts
        written |= {str(p): p.read_bytes() for p in (tmp_path / folder).rglob("*") if p.is_file()}
    assert any("ckpt" in name for name in written) and any(".db" in name for name in written)
    for secret in (b"corpus-s3cret", b"tracking-s3cret"):
        leaks = [name for name, data in written.items() if secret in data]
        assert not leaks, (secret, leaks)
