"""The interleaved scaling benchmark runs as documented and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_interleaved_scaling_benchmark(corpus_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "benchmarks/bench_scaling.py", "--corpus", str(corpus_path), "--rounds", "2",
         "--epochs-per-half", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rates = result["tokens_per_s"]
    assert rates["1_rank"]["n"] == rates["2_ranks"]["n"] == 2  # the warm-up round left out
    assert all(r["min"] > 0 for r in rates.values())
    ratios = result["ratio_2_ranks_vs_1_rank_per_round"]
    assert ratios["min"] <= ratios["median"] <= ratios["max"] and ratios["n"] == 2
    assert "round 2 2_ranks" in proc.stdout
