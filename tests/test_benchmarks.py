"""The benchmarks compute the ratios they report the way their docs say, and the in-job ones
run as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_cpu
from tests.conftest import ROOT, job_env


def _config(name: str, rates: list[float | None]) -> bench_cpu.Config:
    config = bench_cpu.Config(name, name, lambda work: [], lambda work: work)
    config.runs = [bench_cpu.Run(ok=r is not None, tokens_per_s=r) for r in rates]
    return config


def test_ratios_are_paired_per_repetition() -> None:
    """Each repetition against its own neighbour, then the median: the drift between
    repetitions cancels (the ratio of the medians would be 1.5 here, the paired one 2.0); a
    repetition where either side failed is left out."""
    top = _config("kernel", [200.0, 400.0, 300.0, 999.0])
    bottom = _config("baseline", [100.0, 200.0, 150.0, None])
    ratio = bench_cpu.paired(top, bottom)
    assert ratio == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 3}


def test_targets_are_judged_on_the_paired_median() -> None:
    configs = [
        _config("chapter", [100.0, 100.0, 100.0]),
        _config("baseline", [300.0, 300.0, 300.0]),
        _config("kernel", [260.0, 280.0, 250.0]),  # 0.87x the baseline: short of 0.9x
        _config("core", [101.0, 99.0, 102.0]),
        _config("kernel_2ranks", [150.0, 150.0, 150.0]),
        _config("core_2ranks", [80.0, 80.0, 80.0]),
    ]
    report = bench_cpu.report(configs)
    assert report["targets"]["kernel_vs_baseline"] == {"least": 0.9, "met": False}
    assert report["targets"]["kernel_vs_chapter"] == {"least": 2.0, "met": True}
    assert report["targets"]["core_vs_chapter"] == {"least": 1.0, "met": True}
    assert report["ratios_paired"]["core_2ranks_vs_chapter"]["median"] == pytest.approx(0.8)


@pytest.mark.integration
def test_stop_flag_benchmark_runs_in_a_two_rank_job(tmp_path: Path) -> None:
    out = tmp_path / "stop.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "benchmarks/bench_stop_flag.py", "--blocks", "2", "--per-block", "2",
         "--out", str(out)],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert set(result["ms_per_step_median"]) == {"none", "hook", "all_reduce"}
    assert all(ms > 0 for ms in result["ms_per_step_median"].values())


@pytest.mark.integration
def test_cpu_kernel_benchmark_reports_each_piece(kernel_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "kernel.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_cpu_kernel.py", "--blocks", "2", "--per-block", "2",
         "--cache-dir", str(kernel_cache), "--out", str(out)],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["speedup_paired"]) == {
        "loss_op_vs_core", "clip_sgd_op_vs_torch", "direct_vs_autograd", "extension_vs_core",
    }  # fmt: skip
    assert all(r["n"] == 2 and r["median"] > 0 for r in result["speedup_paired"].values())
