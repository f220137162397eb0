"""The real job, end to end: one process vs torchrun with two, and the model it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rnnlm.artifacts import read_model_dir
from rnnlm.generate import generate
from tests.conftest import read_train_info, run_job

pytestmark = pytest.mark.integration  # every test runs the real job


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--corpus", str(corpus), "--output-dir", str(out), "--sample-every", "2",
        "--no-tracking", *extra,
    ]  # fmt: skip


def run_ok(args: list[str], nproc: int = 1):
    proc = run_job(args, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize(
    "extra",
    [
        ["--epochs", "4"],
        ["--epochs", "3", "--cpu-kernel", "torch"],
        ["--epochs", "3", "--sampling", "random"],
        ["--epochs", "3", "--cell", "lstm", "--num-hiddens", "64", "--num-layers", "2"],
    ],
    ids=["rnn-sequential", "rnn-sequential-core", "rnn-random", "lstm-2-layers"],
)
def test_two_ranks_equal_one_process(corpus_path: Path, tmp_path: Path, extra: list[str]) -> None:
    """DDP with per-rank state splits is right iff 2 ranks x 16 rows train exactly like
    1 process x 32 rows: same per-epoch perplexities, same final parameters."""
    run_ok(train_args(corpus_path, tmp_path / "one", *extra), nproc=1)
    run_ok(train_args(corpus_path, tmp_path / "two", *extra), nproc=2)
    one, two = read_train_info(tmp_path / "one"), read_train_info(tmp_path / "two")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["train_path"] == two["train_path"]
    if "torch" in extra or "lstm" in extra:  # the core's layers, whatever the machine
        assert one["train_path"] == "torch"
    # Only the order of the gradient sum differs (all-reduce), i.e. float round-off.
    assert two["perplexity_by_epoch"] == pytest.approx(one["perplexity_by_epoch"], rel=1e-5)
    w1, w2 = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_dir_is_plain_types_and_samples_without_the_corpus(
    corpus_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    proc = run_ok(train_args(corpus_path, out, "--epochs", "4"))
    assert "epoch 2: time traveller" in proc.stderr  # periodic sample
    assert "epoch 4: traveller" in proc.stderr  # final samples from both prefixes
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(load_file(out / "model.safetensors"))
    assert json.loads((out / "model.json").read_text())["cell"] == "rnn"
    module, vocab = read_model_dir(out)
    final = [line for line in proc.stderr.splitlines() if "epoch 4: time traveller" in line]
    (text,) = generate(module, vocab, ["time traveller"], 50)
    assert final[0].endswith(text)  # the logged sample is greedy generation from these weights


@pytest.mark.slow
def test_reproduces_the_chapter(corpus_path: Path, tmp_path: Path) -> None:
    """500 epochs of the chapter's configuration reach perplexity <= 1.4 (book: 1.3)."""
    out = tmp_path / "chapter"
    run_ok(["--corpus", str(corpus_path), "--output-dir", str(out), "--no-tracking"])
    info = read_train_info(out)
    assert len(info["perplexity_by_epoch"]) == 500
    assert info["final"]["train_perplexity"] <= 1.4
    module, vocab = read_model_dir(out)
    prefixes = ["time traveller", "traveller"]  # the job's default sample prefixes
    samples = generate(module, vocab, prefixes, 200)
    book_words = set(corpus_path.read_text().lower().split())
    generated = [w for p, s in zip(prefixes, samples, strict=True) for w in s[len(p) :].split()]
    real = {w for w in generated if len(w) >= 3 and w in book_words}
    # Recognisable: several distinct real words of the book (an untrained or barely trained
    # model, or weights read back wrongly, give gibberish or "the the the"). 200 characters,
    # not the chapter's 50: how good the first 50 greedy characters are varies from one
    # training trajectory to the next (seeds, or round-off that grows over 4000 steps), even
    # at the chapter's final perplexity.
    assert len(real) >= 5, samples
