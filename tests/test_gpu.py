"""The CUDA options: refused with a clear error on the CPU, exact where they claim to be on a
GPU. Tests that need CUDA skip cleanly without it; the GPU benchmark's CLI is checked on CPU."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_gpu
from benchmarks.chapter_loop import chapter_tokens
from rnnlm.batching import epoch_batches
from rnnlm.config import ModelConfig, TrainConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError
from rnnlm.loop import Epoch, in_order, train_epoch
from rnnlm.model import RNNLM
from rnnlm.steps import EagerStep, GraphedStep
from tests.conftest import ROOT, run_job

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"autocast": "bf16"}, r"--autocast: bf16 autocast is a CUDA option"),
        ({"cuda_graphs": True}, r"--cuda-graphs: CUDA graphs need a CUDA device"),
    ],
)
def test_cuda_options_are_refused_on_the_cpu(flags: dict, message: str) -> None:
    with pytest.raises(FlagError, match=message):
        TrainConfig.from_flat({"device": "cpu", **flags}).validate()
    # --device auto resolves late; the trainer checks again once the device is known.
    runtime = TrainConfig.from_flat(flags).runtime
    runtime.check(world_size=1)
    with pytest.raises(FlagError, match=message):
        runtime.check_device("cpu")
    runtime.check_device("cuda")


def test_cuda_graphs_refuse_several_processes() -> None:
    with pytest.raises(FlagError, match=r"--cuda-graphs: the captured step runs in one process"):
        TrainConfig.from_flat({"cuda_graphs": True}).validate(world_size=2)


@pytest.mark.integration
def test_the_job_says_so_in_one_line(corpus_path: Path, tmp_path: Path) -> None:
    args = ["--corpus", str(corpus_path), "--output-dir", str(tmp_path / "m"), "--device", "cpu"]
    proc = run_job([*args, "--autocast", "bf16"])
    assert proc.returncode == 2
    assert "Error: --autocast: bf16 autocast is a CUDA option" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_gpu_benchmark_cli_works_without_a_gpu(tmp_path: Path) -> None:
    args = bench_gpu.parse_args(["--out", str(tmp_path / "g.json"), "--quick"])
    assert args.quick and args.configs.split(",") == list(bench_gpu.CONFIGS)
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--out", "x.json", "--configs", "nope"])
    help_text = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--out" in help_text


@pytest.mark.integration
def test_gpu_benchmark_needs_only_torch_and_rnnlm() -> None:
    """It must run in a bare environment with torch: no mlflow, click, requests, safetensors
    (whatever torch itself happens to import is not counted)."""
    code = (
        "import sys, torch; before = set(sys.modules); import benchmarks.bench_gpu; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} & "
        "{'mlflow', 'click', 'requests', 'safetensors', 'tqdm', 'numpy', 'urllib3'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_gpu_benchmark_tokenizes_as_the_job(corpus_path: Path) -> None:
    assert bench_gpu.d2l_tokens(corpus_path.read_text()) == chapter_tokens(corpus_path)


def _losses(step_kind: str, epochs: int = 2) -> list[float]:
    """Every step's loss over ``epochs`` epochs of the job's loop on CUDA."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    module = RNNLM(ModelConfig(28, num_hiddens=64)).to(device)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    autocast = torch.bfloat16 if "bf16" in step_kind else None
    eager = EagerStep(module, optimizer, 1.0, autocast)
    step = bench_gpu.RecordingStep(GraphedStep(eager, 8, 10) if "graphs" in step_kind else eager)
    text = random.Random(1)
    corpus = torch.tensor([text.randrange(28) for _ in range(3000)], device=device)
    rng = random.Random(0)
    for number in range(1, epochs + 1):
        batches = epoch_batches(corpus, 8, 10, "sequential", rng)
        train_epoch(step, Epoch(number, in_order(batches)), DistInfo(device=device))
    return [float(v) for v in step.losses]


@needs_cuda
def test_cuda_graph_replays_the_eager_step_exactly() -> None:
    eager, graphed = _losses("fp32"), _losses("fp32-graphs")
    assert graphed == pytest.approx(eager, rel=1e-6)


@needs_cuda
def test_bf16_autocast_trains() -> None:
    losses = _losses("bf16", epochs=4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@needs_cuda
@pytest.mark.integration
def test_the_job_runs_on_cuda_with_graphs(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = [
        "--corpus",
        str(corpus_path),
        "--output-dir",
        str(out),
        "--epochs",
        "3",
        "--no-tracking",
    ]
    proc = run_job([*args, "--device", "cuda", "--cuda-graphs"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/sec on cuda" in proc.stderr
