"""Every user mistake: one line naming the flag and the fix, exit 2, nothing written."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import common
from rnnlm.errors import FlagError
from tests.conftest import ROOT, job_env, run_job


def assert_refused(proc, *needles: str, out: Path) -> None:
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # nothing half-written


CASES = {
    "outage-timeout-nan": (["--outage-timeout", "nan"], ["--outage-timeout", "pass 0 or more"]),
    "zero-batch": (["--batch-size", "0"], ["--batch-size", "greater than 0"]),
    "negative-steps": (["--num-steps", "-5"], ["--num-steps", "greater than 0"]),
    "zero-hiddens": (["--num-hiddens", "0"], ["--num-hiddens"]),
    "zero-lr": (["--lr", "0"], ["--lr", "must be > 0"]),
    "negative-lr": (["--lr", "-1"], ["--lr"]),
    "zero-epochs": (["--epochs", "0"], ["--epochs", "greater than 0"]),
    "zero-clip": (["--clip", "0"], ["--clip"]),
    "bad-max-tokens": (["--max-tokens", "0"], ["--max-tokens", "-1 for all"]),
    "unknown-cell": (["--cell", "transformer"], ["--cell", "rnn"]),
    "bidirectional": (["--bidirectional"], ["--bidirectional", "left-to-right"]),
    "dropout-one-layer": (["--dropout", "0.2"], ["--dropout", "--num-layers 2"]),
    "short-corpus": (["--max-tokens", "500"], ["--max-tokens", "500 tokens", "at least 1156"]),
    "bad-sha1": (["--corpus-sha1", "0" * 40], ["--corpus-sha1", "expected " + "0" * 40]),
    "bad-device": (["--device", "tpu"], ["--device"]),
    "nan-tracking-timeout": (["--tracking-timeout", "nan"], ["--tracking-timeout", "nan"]),
    "inf-dist-timeout": (["--dist-timeout", "inf"], ["--dist-timeout", "finite number"]),
    "huge-samples": (["--num-sample-chars", "100000"], ["--num-sample-chars", "0 to 10000"]),
    "negative-max-steps": (["--max-steps", "-1"], ["--max-steps", "pass 0"]),
    "zero-eval-every": (["--max-steps", "5", "--eval-every", "0"], ["--eval-every"]),
    "tag-not-a-pair": (["--tag", "trial"], ["--tag", "KEY=VALUE"]),
}

CONFIG_FILES = {
    "a-number": ("5", "a JSON object of settings"),
    "null": ("null", "a JSON object of settings"),
    "fractional-epochs": ('{"epochs": 1.9}', "epochs: 1.9 is not a whole number"),
    "string-lr": ('{"lr": "0.5"}', 'lr: "0.5" is not a number'),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_flag(case: str, corpus_path: Path, tmp_path: Path) -> None:
    args, needles = CASES[case]
    out = tmp_path / "out"
    proc = run_job(
        ["--corpus", str(corpus_path), "--output-dir", str(out), "--epochs", "1", *args],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert_refused(proc, *needles, out=out)
    assert not (tmp_path / "mlflow.db").exists()  # no tracking run was started


@pytest.mark.integration
@pytest.mark.integration
@pytest.mark.parametrize("case", CONFIG_FILES, ids=list(CONFIG_FILES))
def test_bad_config_file(case: str, corpus_path: Path, tmp_path: Path) -> None:
    """A --config file that is no object of settings, or a value of the wrong type (which
    click would convert silently: 1.9 epochs into 1), is one line and exit 2."""
    text, needle = CONFIG_FILES[case]
    (tmp_path / "config.json").write_text(text)
    out = tmp_path / "out"
    proc = run_job(
        ["--config", str(tmp_path / "config.json"), "--corpus", str(corpus_path),
         "--output-dir", str(out), "--no-tracking"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert_refused(proc, "--config", needle, out=out)


@pytest.mark.integration
def test_a_second_job_on_the_same_output_dir_is_refused_at_start(
    corpus_path: Path, tmp_path: Path
) -> None:
    """Two jobs given one --output-dir: the second stops before training, in one line, while
    the first goes on (its claim ends with its process)."""
    out = tmp_path / "shared-out"
    args = ["--corpus", str(corpus_path), "--output-dir", str(out), "--no-tracking",
            "--cpu-kernel", "torch"]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "jobs.train", *args, "--epochs", "100000"], env=job_env(),
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert first.stderr is not None
        for line in first.stderr:  # the first job trains once it reports an epoch
            if "epoch 1:" in line:
                break
        second = run_job([*args, "--epochs", "1"], timeout=120)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and "--output-dir: another job is writing" in errors[0]
        assert "epoch 1:" not in second.stderr and first.poll() is None
    finally:
        first.kill()
        first.wait()
    again = run_job([*args, "--epochs", "1"])  # the claim went with the first job's process
    assert again.returncode == 0, again.stderr[-2000:]


def test_missing_corpus_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_job(["--corpus", str(tmp_path / "nope.txt"), "--output-dir", str(out)])
    assert_refused(proc, "--corpus", "no such file", out=out)


@pytest.mark.integration
def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("1234\n")
    out = tmp_path / "out"
    proc = run_job(["--corpus", str(tmp_path / "empty.txt"), "--output-dir", str(out)])
    assert_refused(proc, "--corpus", "no tokens", "--preprocess raw", out=out)


@pytest.mark.integration
def test_output_dir_under_a_file(corpus_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "model"
    proc = run_job(["--corpus", str(corpus_path), "--output-dir", str(out), "--epochs", "1"])
    assert_refused(proc, "--output-dir", "not a directory", out=out)


@pytest.mark.integration
def test_batch_not_divisible_by_ranks(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_job(
        ["--corpus", str(corpus_path), "--output-dir", str(out), "--batch-size", "33"], nproc=2
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert errors == [
        "Error: --batch-size: the global batch 33 does not split evenly over 2 processes; "
        "pass a multiple of 2 (e.g. 32)."
    ]
    assert not out.exists()


@pytest.mark.parametrize(
    ("env", "waits"),
    [({"RANK": "1", "LOCAL_RANK": "1"}, True), ({"RANK": "3", "LOCAL_RANK": "1"}, False)],
    ids=["rank-0s-node", "other-node"],
)
def test_ranks_other_than_0_leave_the_report_to_rank_0(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], waits: bool
) -> None:
    """On rank 0's node another rank waits, at SIGTERM's default action, for the launcher to
    stop it once rank 0 has said the mistake, then says it itself (then rank 0 did not make it);
    on another node it leaves at once with exit 2. A one-process command says it at once."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    waited: list[float] = []
    monkeypatch.setattr(common.time, "sleep", waited.append)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # as a job's stop flag sets it

    def mistake() -> None:
        raise FlagError("--corpus", "no such file on this host; pass a path every rank has.")

    try:
        if waits:
            with pytest.raises(common.JobError) as refused, common.user_errors():
                mistake()
            assert refused.value.exit_code == common.EXIT_USER_ERROR
            assert refused.value.format_message().startswith("--corpus: no such file")
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            assert waited == [common.PEER_REPORT_WAIT_S]
        else:
            with pytest.raises(SystemExit) as left, common.user_errors():
                mistake()
            assert left.value.code == common.EXIT_USER_ERROR
            assert waited == []
        with pytest.raises(common.JobError), common.user_errors(ranked=False):
            raise FlagError("--num-chars", "got -1; pass 0 or more.")
        assert len(waited) == int(waits)  # no wait for a one-process command
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.integration
def test_short_corpus_across_ranks(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_job(
        ["--corpus", str(corpus_path), "--output-dir", str(out), "--max-tokens", "1000"], nproc=2
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "over 2 processes" in errors[0] and "1000 tokens" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("password", [None, "short"])
def test_mlflow_user_without_a_good_password(tmp_path: Path, password: str | None) -> None:
    """The jobs' MLflow user gets its password from the environment, 12 characters or more."""
    env = job_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9")  # never reached
    if password is not None:
        env["RNNLM_MLFLOW_USER_PASSWORD"] = password
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.mlflow_user"], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == common.EXIT_USER_ERROR
    assert_refused(proc, "RNNLM_MLFLOW_USER_PASSWORD", "12 characters", out=tmp_path / "none")


SAMPLE_CASES = {
    "too-many-chars": (["--num-chars", "10001"], {}, ["--num-chars", "0 to 10000"]),
    "nan-temperature": (["--temperature", "nan"], {}, ["--temperature", "got nan"]),
    "negative-temperature": (["--temperature", "-1"], {}, ["--temperature"]),
    "negative-top-k": (["--top-k", "-1"], {}, ["--top-k"]),
    "empty-prefix": (["--prefix", ""], {}, ["--prefix", "empty"]),
    "long-prefix": (["--prefix", "t" * 1001], {}, ["--prefix", "RNNLM_MAX_PREFIX_CHARS"]),
    "many-prefixes": (["--prefix", "a"] * 257, {}, ["--prefix", "got 257"]),
    "own-limit": (["--num-chars", "6"], {"RNNLM_MAX_NUM_CHARS": "5"}, ["--num-chars", "0 to 5"]),
    "bad-limit": ([], {"RNNLM_MAX_PREFIXES": "many"}, ["RNNLM_MAX_PREFIXES", "whole number"]),
}


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=list(SAMPLE_CASES))
def test_sampling_request_out_of_bounds(case: str, tmp_path: Path) -> None:
    """Refused before any model is fetched (the tracking server here is never reached), with
    the bounds the served model keeps too."""
    args, env, needles = SAMPLE_CASES[case]
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.sample", "--model-uri", "models:/m@a", *args],
        env=job_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", **env), cwd=ROOT,
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == common.EXIT_USER_ERROR, proc.stderr[-2000:]
    assert_refused(proc, *needles, out=tmp_path / "none")


@pytest.mark.integration
def test_an_error_quoting_a_url_hides_its_credentials(tmp_path: Path) -> None:
    out = tmp_path / "out"
    url = "http://reader:s3cret-pw@127.0.0.1:9/timemachine.txt"  # nothing listens on port 9
    args = ["--corpus", url, "--output-dir", str(out), "--no-tracking", "--outage-timeout", "0"]
    proc = run_job(args, cwd=tmp_path)
    assert proc.returncode == common.EXIT_TRANSIENT  # nothing listens: an outage, not a mistake
    assert_refused(proc, "--corpus: cannot download http://***@127.0.0.1:9/", out=out)
    assert "s3cret-pw" not in proc.stderr + proc.stdout
