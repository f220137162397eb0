"""Fault tolerance, for real: killed workers, preemption, corrupt checkpoints, hung peers,
tracking outages, authentication, divergence."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from rnnlm import checkpoint
from tests.conftest import ROOT, free_port, job_env, read_train_info, run_job
from tests.mlflow_server import mlflow_server, start_server, stop_server

pytestmark = pytest.mark.integration  # every test runs the real job under torchrun

EPOCHS = 30


def args_for(corpus: Path, work: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    """A small job with 35 minibatches per epoch, checkpointed every epoch."""
    return [
        "--corpus", str(corpus), "--output-dir", str(work / "model"),
        "--checkpoint-dir", str(work / "ckpt"), "--epochs", str(epochs), "--num-hiddens", "64",
        "--max-tokens", "40000", "--sample-every", "10", "--experiment", "ft", *extra,
    ]  # fmt: skip


def launch(args: list[str], nproc: int = 2, restarts: int = 0, env=None) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", "-m", "jobs.train", *args,
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env or job_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The job's worker processes by global rank."""
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "jobs.train" in " ".join(child.cmdline()):
            found[int(env["RANK"])] = child
    return found


def wait_for_checkpoint(directory: Path, launcher: subprocess.Popen, min_epoch: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        for path in checkpoint.list_checkpoints(directory):
            try:
                if checkpoint.load(path)["epoch"] > min_epoch:
                    return
            except Exception:
                pass  # being written
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def finish(launcher: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, stderr = launcher.communicate(timeout=timeout)
    return launcher.returncode, stderr


def weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "model" / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # bit for bit


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    with mlflow_server(tmp_path_factory.mktemp("ft-server")) as url:
        yield url


@pytest.fixture(scope="module")
def uninterrupted(corpus_path: Path, tmp_path_factory) -> Path:
    """The reference: the same 2-rank job, never interrupted."""
    work = tmp_path_factory.mktemp("uninterrupted")
    proc = run_job(args_for(corpus_path, work, "--no-tracking"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def one_run_each_epoch_once(server: str, experiment: str = "ft") -> str:
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run_id = runs[0].info.run_id
    for metric in ("train_perplexity", "val_perplexity", "tokens_per_s", "rank1_tokens_per_s"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), metric
    assert runs[0].info.status == "FINISHED"
    return run_id


def test_killed_worker_restarts_and_resumes_exactly(
    corpus_path: Path, tmp_path: Path, server: str, uninterrupted: Path
) -> None:
    launcher = launch(
        args_for(corpus_path, tmp_path, "--tracking-uri", server, "--experiment", "ft-kill"),
        restarts=1,
    )
    wait_for_checkpoint(tmp_path / "ckpt", launcher, min_epoch=3)
    time.sleep(0.03)  # into the next epoch
    victim = workers(launcher)[1]
    victim.send_signal(signal.SIGKILL)
    code, stderr = finish(launcher)
    assert code == 0, stderr[-4000:]
    assert "resuming from" in stderr
    assert_same_weights(tmp_path, uninterrupted)
    assert read_train_info(tmp_path / "model")["perplexity_by_epoch"] == pytest.approx(
        read_train_info(uninterrupted / "model")["perplexity_by_epoch"], rel=1e-12
    )
    one_run_each_epoch_once(server, "ft-kill")


STEP_ARGS = (
    "--max-tokens", "8000", "--max-steps", "60", "--eval-every", "10",
    "--checkpoint-unit", "step", "--checkpoint-every", "3",
)  # fmt: skip  # 7 minibatches a pass: 60 steps are 8 passes and a half


def newest_step(directory: Path) -> int:
    """The global step of the newest checkpoint (0: none yet; one may vanish while read, as
    only the newest are kept)."""
    steps = [0]
    for path in checkpoint.list_checkpoints(directory):
        with contextlib.suppress(Exception):  # removed meanwhile
            steps.append(checkpoint.load(path)["global_step"])
    return max(steps)


def test_a_job_by_steps_resumes_exactly_after_a_killed_worker(
    corpus_path: Path, tmp_path: Path, server: str
) -> None:
    """--max-steps over many passes: reports, checkpoints and the layout of each pass all
    cross pass boundaries, and a restart must land on the same minibatch of the same pass."""
    reference = tmp_path / "reference"
    proc = run_job(args_for(corpus_path, reference, "--no-tracking", *STEP_ARGS), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "killed"
    args = args_for(corpus_path, work, *STEP_ARGS, "--tracking-uri", server, "--experiment",
                    "ft-steps")  # fmt: skip
    launcher = launch(args, restarts=1)
    deadline = time.monotonic() + 300
    while newest_step(work / "ckpt") < 25:
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers(launcher)[1].send_signal(signal.SIGKILL)
    code, stderr = finish(launcher)
    assert code == 0, stderr[-4000:]
    assert "resuming from" in stderr
    assert_same_weights(work, reference)
    ours, theirs = read_train_info(work / "model"), read_train_info(reference / "model")
    assert ours["perplexity_by_epoch"] == pytest.approx(theirs["perplexity_by_epoch"], rel=1e-12)
    assert len(ours["val_perplexity_by_epoch"]) == 6
    client = MlflowClient(server)
    (run,) = client.search_runs([client.get_experiment_by_name("ft-steps").experiment_id])
    for metric in ("train_perplexity", "train_bpc", "val_perplexity", "val_bpc"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [10, 20, 30, 40, 50, 60], metric


def test_preempted_job_checkpoints_and_the_same_command_completes(
    corpus_path: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """The ranks agree to stop at the same step (every rank's stop flag rides on DDP's
    gradient all-reduce), checkpoint there, and the retried command finishes the job exactly
    as if it had never stopped."""
    args = args_for(corpus_path, tmp_path, "--no-tracking")
    launcher = launch(args)
    wait_for_checkpoint(tmp_path / "ckpt", launcher, min_epoch=3)
    time.sleep(0.03)
    launcher.send_signal(signal.SIGTERM)  # what Kubernetes sends on eviction
    code, stderr = finish(launcher, timeout=120)
    assert code != 0
    newest = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "ckpt")[0])
    assert newest["epoch"] < EPOCHS
    assert "stopping" in stderr and not (tmp_path / "model").exists()
    proc = run_job(args, nproc=2)  # the Job's retry: the very same command
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    assert_same_weights(tmp_path, uninterrupted)


def test_truncated_newest_checkpoint_resumes_from_the_previous(
    corpus_path: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    first = run_job(args_for(corpus_path, tmp_path, "--no-tracking", epochs=8), nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    newest, previous = checkpoint.list_checkpoints(tmp_path / "ckpt")[:2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = run_job(args_for(corpus_path, tmp_path, "--no-tracking"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping unusable checkpoint {newest}" in proc.stderr
    assert f"resuming from {previous}" in proc.stderr
    assert_same_weights(tmp_path, uninterrupted)


def test_a_hung_rank_fails_the_job_within_the_timeout(corpus_path: Path, tmp_path: Path) -> None:
    """A rank that stops answering (alive, so torchrun sees nothing) makes rank 0's next
    collective time out after --dist-timeout, not after torch's default of many minutes, and
    the job fails with that timeout as its root cause."""
    timeout = 15
    launcher = launch(
        args_for(corpus_path, tmp_path, "--no-tracking", "--dist-timeout", str(timeout), epochs=500)
    )
    wait_for_checkpoint(tmp_path / "ckpt", launcher, min_epoch=1)
    victim = workers(launcher)[1]
    victim.send_signal(signal.SIGSTOP)  # alive but silent: no crash for torchrun to see
    stopped, stopped_at = time.monotonic(), time.time()
    try:
        code, stderr = finish(launcher, timeout=timeout + 120)
    finally:
        if victim.is_running():
            victim.send_signal(signal.SIGKILL)
    # torchrun then stops the hung rank: SIGTERM, and SIGKILL after its 30 s grace.
    assert time.monotonic() - stopped < timeout + 60
    assert code == 1, stderr[-3000:]
    # torchrun's summary names the first failure: rank 0, in gloo, after exactly the timeout.
    _, _, root_cause = stderr.partition("Root Cause (first observed failure):")
    assert re.search(r"^\s*rank\s*: 0 \(local_rank: 0\)$", root_cause, re.M), stderr[-3000:]
    timed_out = rf"Timed out waiting {timeout * 1000}ms for (recv|send) operation to complete"
    assert re.search(timed_out, root_cause), stderr[-3000:]
    failed = re.search(r"^\s*time\s*: (\S+)$", root_cause, re.M)
    assert failed, stderr[-3000:]
    failed_at = datetime.fromisoformat(failed[1].replace("_", "T")).timestamp()  # local, 1 s
    assert timeout - 2 <= failed_at - stopped_at <= timeout + 15


def test_tracking_outage_mid_run_loses_nothing(corpus_path: Path, tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "server"
    url, server = start_server(root, port=port)
    launcher = launch(args_for(corpus_path, tmp_path, "--tracking-uri", url))
    try:
        wait_for_checkpoint(tmp_path / "ckpt", launcher, min_epoch=3)
        stop_server(server)  # the server goes away mid-run...
        time.sleep(3)
        url, server = start_server(root, port=port)  # ...and comes back on the same address
        code, stderr = finish(launcher)
    finally:
        stop_server(server)
        if launcher.poll() is None:
            launcher.kill()
    with mlflow_server(root, port=port):
        assert code == 0, stderr[-3000:]
        assert "MLflow call failed" in stderr
        run_id = one_run_each_epoch_once(url)
        version = MlflowClient(url).get_model_version_by_alias("rnnlm-timemachine", "candidate")
        assert version.run_id == run_id


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> str:
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": "correct-horse-battery",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "tests-only"}  # fmt: skip
    with mlflow_server(
        tmp_path_factory.mktemp("auth-server"), extra=["--app-name", "basic-auth"], env=env
    ) as url:
        yield url


def test_basic_auth_server(corpus_path: Path, tmp_path: Path, auth_server: str) -> None:
    args = args_for(corpus_path, tmp_path, "--tracking-uri", auth_server, epochs=2)
    bad = run_job(args, nproc=2, env=job_env(MLFLOW_TRACKING_USERNAME="admin",
                                            MLFLOW_TRACKING_PASSWORD="wrong-password"))  # fmt: skip
    assert bad.returncode != 0
    errors = [line for line in bad.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "refused the credentials of user 'admin'" in errors[0]
    assert "epoch 1" not in bad.stderr and not (tmp_path / "model").exists()
    good_env = job_env(
        MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="correct-horse-battery"
    )
    good = run_job(args, nproc=2, env=good_env)
    assert good.returncode == 0, good.stderr[-3000:]
    os.environ.update(
        MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="correct-horse-battery"
    )
    try:
        client = MlflowClient(auth_server)
        runs = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]


def test_divergence_stops_without_touching_the_last_good_checkpoint(
    corpus_path: Path, tmp_path: Path
) -> None:
    good = run_job(args_for(corpus_path, tmp_path, "--no-tracking", epochs=3))
    assert good.returncode == 0, good.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(tmp_path / "ckpt")}
    shutil.rmtree(tmp_path / "model")
    proc = run_job(args_for(corpus_path, tmp_path, "--no-tracking", "--lr", "1e38", epochs=6))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "NaN/inf at epoch 4, step" in errors[0], proc.stderr[-2000:]
    after = {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(tmp_path / "ckpt")}
    assert after == before
    assert not (tmp_path / "model").exists()


def test_checkpoint_of_another_model_is_refused_unless_fresh(
    corpus_path: Path, tmp_path: Path
) -> None:
    assert run_job(args_for(corpus_path, tmp_path, "--no-tracking", epochs=2)).returncode == 0
    other = args_for(corpus_path, tmp_path, "--no-tracking", epochs=2)
    other[other.index("--num-hiddens") + 1] = "32"
    proc = run_job(other)
    assert proc.returncode == 2
    assert "--checkpoint-dir:" in proc.stderr and "num_hiddens 64 vs 32" in proc.stderr
    assert "--fresh" in proc.stderr
    fresh = run_job([*other, "--fresh"])
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "removed 2 checkpoint(s)" in fresh.stderr


def test_unwritable_checkpoint_dir(corpus_path: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    args = args_for(corpus_path, tmp_path, "--no-tracking")
    args[args.index("--checkpoint-dir") + 1] = str(tmp_path / "file" / "ckpt")
    proc = run_job(args)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and errors[0].startswith("Error: --checkpoint-dir: cannot write")
    assert not (tmp_path / "model").exists()


@pytest.fixture
def full_volume(tmp_path: Path):
    """A 16 KiB tmpfs: room for the job's start-up probe, not for a checkpoint (a full disk)."""
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mountpoint)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_full_checkpoint_volume_is_one_line(
    corpus_path: Path, tmp_path: Path, full_volume: Path
) -> None:
    (full_volume / f"{checkpoint.TMP_PREFIX}killed.tmp").write_bytes(b"x" * 1024)
    args = args_for(corpus_path, tmp_path, "--no-tracking", epochs=2)
    args[args.index("--checkpoint-dir") + 1] = str(full_volume)
    proc = run_job(args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert (
        errors[0].startswith("Error: --checkpoint-dir: cannot write ckpt-") and "free" in errors[0]
    )
    assert "Traceback" not in proc.stderr
    assert os.listdir(full_volume) == []  # the killed writer's file and the failed one are gone


def test_a_sigterm_checkpoint_on_a_full_volume_still_exits_143(
    corpus_path: Path, tmp_path: Path, full_volume: Path
) -> None:
    """The retry resumes from an older checkpoint (or the start): still a preemption."""
    args = args_for(corpus_path, tmp_path, "--no-tracking", epochs=100000)
    args[args.index("--checkpoint-dir") + 1] = str(full_volume)
    args += ["--checkpoint-every", "100000"]  # no checkpoint before the signal
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *args], env=job_env(), cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # training has started once an epoch is reported
            seen.append(line)
            if "epoch 1" in line:
                break
        proc.send_signal(signal.SIGTERM)
        seen += proc.stderr.readlines()
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, "".join(seen)[-2000:]
        assert any("cannot write ckpt-" in line for line in seen), "".join(seen)[-2000:]
        assert os.listdir(full_volume) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fresh_clears_an_earlier_job_once_and_a_restart_resumes(
    corpus_path: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """--fresh used to run again on every torchrun restart, deleting the checkpoints the same
    job had just written; it clears only another job's (torchrun's run id tells them apart)."""
    earlier = args_for(corpus_path, tmp_path, "--no-tracking", epochs=2)
    earlier[earlier.index("--output-dir") + 1] = str(tmp_path / "earlier-model")
    assert run_job(earlier).returncode == 0
    left = len(checkpoint.list_checkpoints(tmp_path / "ckpt"))
    assert left > 0
    launcher = launch(args_for(corpus_path, tmp_path, "--no-tracking", "--fresh"), restarts=1)
    wait_for_checkpoint(tmp_path / "ckpt", launcher, min_epoch=3)
    time.sleep(0.03)  # into the next epoch
    workers(launcher)[1].send_signal(signal.SIGKILL)
    code, stderr = finish(launcher)
    assert code == 0, stderr[-4000:]
    assert re.findall(r"--fresh: removed (\d+) checkpoint", stderr) == [str(left)]
    assert "resuming from" in stderr
    assert_same_weights(tmp_path, uninterrupted)


def test_fresh_on_a_retried_pod_resumes_its_own_job(
    corpus_path: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """A pod retry is a new torchrun: RNNLM_JOB_ID (the manifests set it from the job's name)
    makes it the same job, so --fresh resumes it; another job id starts over."""
    args = args_for(corpus_path, tmp_path, "--no-tracking", "--fresh")
    launcher = launch(args, env=job_env(RNNLM_JOB_ID="job-a"))
    wait_for_checkpoint(tmp_path / "ckpt", launcher, min_epoch=3)
    time.sleep(0.03)
    launcher.send_signal(signal.SIGTERM)  # the pod is preempted
    code, _ = finish(launcher, timeout=120)
    assert code != 0 and not (tmp_path / "model").exists()
    retry = run_job(args, nproc=2, env=job_env(RNNLM_JOB_ID="job-a"))
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert "resuming from" in retry.stderr and "--fresh: removed" not in retry.stderr
    assert_same_weights(tmp_path, uninterrupted)
    another = run_job(args, env=job_env(RNNLM_JOB_ID="job-b"))
    assert another.returncode == 0, another.stderr[-3000:]
    assert "--fresh: removed" in another.stderr and "resuming from" not in another.stderr


@pytest.mark.parametrize(
    ("flag", "value", "difference"),
    [("--seed", "1", "seed 0 vs 1"), ("--batch-size", "64", "batch_size 32 vs 64"),
     ("--max-tokens", "30000", "max_tokens 40000 vs 30000")],
)  # fmt: skip
def test_a_checkpoint_of_other_data_settings_is_refused(
    corpus_path: Path, tmp_path: Path, flag: str, value: str, difference: str
) -> None:
    """Only the model's shape and vocabulary were compared: another seed, batch size or token
    budget resumed silently into the old job (a larger batch mid-epoch: a traceback)."""
    assert run_job(args_for(corpus_path, tmp_path, "--no-tracking", epochs=2)).returncode == 0
    other = args_for(corpus_path, tmp_path, "--no-tracking", flag, value, epochs=3)
    proc = run_job(other)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and difference in errors[0] and "--fresh" in errors[0], errors
    assert "Traceback" not in proc.stderr


def test_a_finished_job_run_again_trains_and_registers_nothing(
    corpus_path: Path, tmp_path: Path, server: str
) -> None:
    args = args_for(corpus_path, tmp_path, "--tracking-uri", server, "--experiment", "ft-done",
                    "--registered-model-name", "ft-done", epochs=2)  # fmt: skip
    assert run_job(args).returncode == 0
    model = (tmp_path / "model" / "model.safetensors").read_bytes()
    again = run_job([*args, "--lr", "0.5"])  # the learning rate may change: the same job
    assert again.returncode == 0, again.stderr[-2000:]
    assert "this job finished" in again.stderr and "epoch 1" not in again.stderr
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == model
    client = MlflowClient(server)
    assert len(client.search_model_versions("name='ft-done'")) == 1
    longer = run_job([*args, "--epochs", "3"])  # a larger --epochs trains on (the last wins)
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert "resuming from" in longer.stderr and "epoch 3" in longer.stderr
    assert len(client.search_model_versions("name='ft-done'")) == 2
