"""CPU benchmark: the job against the chapter's loop and against an earlier commit, side by
side in one run.

    python benchmarks/bench_cpu.py --quick                              # a smoke run
    python benchmarks/bench_cpu.py --out benchmarks/results/cpu.json    # the full run

Every configuration is a real command in a fresh process, run as users run it:

- ``chapter``: the chapter's loop (``benchmarks/chapter_loop.py``: one-hot input, ``nn.RNN``,
  ``train_epoch_ch8`` with its per-step ``float()`` and d2l's ``grad_clipping``);
- ``baseline``: ``jobs.train`` of the commit ``--baseline-ref`` (default f6e8055, the last
  commit before the redesign), checked out into a git worktree for this run;
- ``kernel``: ``jobs.train`` with the CPU kernel extension (``--cpu-kernel compiled``);
- ``core``: ``jobs.train`` on the framework's layers alone (``--cpu-kernel torch``);
- ``kernel_2ranks`` / ``core_2ranks``: the same under ``torchrun --nproc-per-node 2`` on gloo
  (global batch 32, one thread per rank).

Before the repetitions each configuration runs once unmeasured (it builds what it builds on
first use, and warms the page cache). The repetitions are interleaved (all configurations,
then all in reverse order, ...) so that a machine getting busier or quieter weighs on all of
them alike. Per configuration: training tokens/s over the epochs after the first (each process
times its own epochs), start-up (command to first training step) and peak resident memory.
Ratios are paired: per repetition, then the median of those ratios.

The chapter's configuration throughout: RNN, 256 hidden, global batch 32, 35 steps, the first
10,000 tokens of The Time Machine; each command's default threads (torch uses every core for
one process; each of two ranks gets one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "timemachine.txt"
BASELINE_REF = "f6e8055"
TARGETS = {  # (top, bottom, the least paired ratio the redesign asked for)
    "kernel_vs_baseline": ("kernel", "baseline", 0.9),
    "kernel_vs_chapter": ("kernel", "chapter", 2.0),
    "core_vs_chapter": ("core", "chapter", 1.0),
}


@dataclass
class Run:
    ok: bool
    tokens_per_s: float | None = None
    startup_s: float | None = None
    peak_rss_mb: float | None = None
    final_perplexity: float | None = None
    error: str | None = None


@dataclass
class Config:
    name: str
    describe: str
    command: Callable[[Path], list[str]]  # the command, given a fresh scratch directory
    result: Callable[[Path], Path]  # where it writes its per-epoch figures
    cwd: Path = ROOT
    runs: list[Run] = field(default_factory=list)


FAMILY, MODEL = r"^cpu family\s*:(.*)$", r"^model\s*:(.*)$"


def machine() -> dict[str, Any]:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""

    def first(pattern: str) -> str | None:
        found = re.search(pattern, info, re.M)
        return found[1].strip() if found else None

    flags = set((first(r"^flags\s*:(.*)$") or "").split())
    return {
        "cpu": first(r"^model name\s*:(.*)$") or platform.processor(),
        "cpu_family_model": f"family {first(FAMILY)} model {first(MODEL)}",
        "isa": "avx512"
        if {"avx512f", "avx512dq"} <= flags
        else "avx2"
        if "avx2" in flags
        else None,
        "logical_cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def env_for(tree: Path) -> dict[str, str]:
    """The caller's environment with ``tree``'s code first on the path, and nothing that would
    change what is measured (thread counts, tracking, the job's own settings)."""
    drop = ("MLFLOW_", "RNNLM_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = str(tree)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(cmd: list[str], cwd: Path, log: Path, timeout: float) -> tuple[int | None, float, float]:
    """Run ``cmd``; return (exit code, or None past ``timeout``; launch time; peak RSS in MB of
    the largest process it waited for)."""
    with log.open("w") as out:
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env_for(cwd), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, launched, usage.ru_maxrss / 1024
            if time.monotonic() > deadline:
                proc.kill()
                _, _, usage = os.wait4(proc.pid, 0)
                return None, launched, usage.ru_maxrss / 1024
            time.sleep(0.02)


def measure(config: Config, scratch: Path, timeout: float) -> Run:
    work = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{config.name}-"))
    code, launched, rss = launch(config.command(work), config.cwd, work / "log.txt", timeout)
    if code != 0:
        why = f"ran past {timeout:.0f} s" if code is None else f"exit {code}"
        return Run(
            ok=False, peak_rss_mb=rss, error=f"{why}: {(work / 'log.txt').read_text()[-1500:]}"
        )
    info = json.loads(config.result(work).read_text())
    seconds, tokens = info["seconds_by_epoch"][1:], info["tokens_by_epoch"][1:]
    return Run(
        ok=True,
        tokens_per_s=sum(tokens) / sum(seconds),
        startup_s=info["first_step_time"] - launched,
        peak_rss_mb=rss,
        final_perplexity=info["perplexity_by_epoch"][-1],
    )


def configs(corpus: Path, epochs: int, cache: Path, baseline: Path) -> list[Config]:
    py = sys.executable
    common = ["--corpus", str(corpus), "--epochs", str(epochs), "--no-tracking",
              "--cache-dir", str(cache)]  # fmt: skip

    def job(*extra: str, nproc: int = 1) -> Callable[[Path], list[str]]:
        launcher = [py, "-m", "jobs.train"]
        if nproc > 1:
            launcher = [py, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={nproc}", "-m", "jobs.train"]  # fmt: skip
        return lambda work: [*launcher, *common, "--output-dir", str(work / "model"), *extra]

    def train_json(work: Path) -> Path:
        return work / "model" / "train.json"

    def chapter(work: Path) -> list[str]:
        script = str(ROOT / "benchmarks" / "chapter_loop.py")
        return [py, script, "--corpus", str(corpus), "--epochs", str(epochs),
                "--out", str(work / "chapter.json")]  # fmt: skip

    return [
        Config("chapter", "the chapter's loop, 1 process", chapter,
               lambda work: work / "chapter.json"),
        Config("baseline", f"jobs.train at {BASELINE_REF}, 1 process", job(), train_json,
               cwd=baseline),
        Config("kernel", "jobs.train --cpu-kernel compiled, 1 process",
               job("--cpu-kernel", "compiled"), train_json),
        Config("core", "jobs.train --cpu-kernel torch, 1 process",
               job("--cpu-kernel", "torch"), train_json),
        Config("kernel_2ranks", "torchrun 2 ranks (gloo), --cpu-kernel compiled",
               job("--cpu-kernel", "compiled", nproc=2), train_json),
        Config("core_2ranks", "torchrun 2 ranks (gloo), --cpu-kernel torch",
               job("--cpu-kernel", "torch", nproc=2), train_json),
    ]  # fmt: skip


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def paired(top: Config, bottom: Config) -> dict[str, float] | None:
    """The per-repetition ratios of ``top``'s tokens/s to ``bottom``'s (both ran)."""
    ratios = [t.tokens_per_s / b.tokens_per_s for t, b in zip(top.runs, bottom.runs, strict=True)
              if t.tokens_per_s and b.tokens_per_s]  # fmt: skip
    return summary(ratios)


def run_all(configs: list[Config], reps: int, scratch: Path, timeout: float) -> None:
    for config in configs:  # unmeasured: first-use builds, caches
        warm = measure(config, scratch, timeout)
        print(f"  warm-up {config.name:<14} {'ok' if warm.ok else 'FAILED: ' + str(warm.error)}")
    for rep in range(reps):
        for config in configs if rep % 2 == 0 else configs[::-1]:
            run = measure(config, scratch, timeout)
            config.runs.append(run)
            shown = f"{run.tokens_per_s:,.0f} tokens/s" if run.ok else f"FAILED: {run.error}"
            print(f"  rep {rep + 1}/{reps} {config.name:<14} {shown}", flush=True)


def report(configs: list[Config]) -> dict[str, Any]:
    by_name = {c.name: c for c in configs}
    out: dict[str, Any] = {"configurations": {}, "ratios_paired": {}, "targets": {}}
    for c in configs:
        ok = [r for r in c.runs if r.ok]
        out["configurations"][c.name] = {
            "describe": c.describe,
            "tokens_per_s": summary([r.tokens_per_s for r in ok if r.tokens_per_s]),
            # in run order, None where it failed: pairs can be pooled across runs
            "tokens_per_s_by_repetition": [r.tokens_per_s for r in c.runs],
            "startup_s": summary([r.startup_s for r in ok if r.startup_s is not None]),
            "peak_rss_mb": summary([r.peak_rss_mb for r in ok if r.peak_rss_mb]),
            "final_perplexity": [r.final_perplexity for r in ok],
            "failures": [r.error for r in c.runs if not r.ok],
        }
        if c.name != "chapter":
            out["ratios_paired"][f"{c.name}_vs_chapter"] = paired(c, by_name["chapter"])
    for name, (top, bottom, least) in TARGETS.items():
        ratio = paired(by_name[top], by_name[bottom])
        out["ratios_paired"][name] = ratio
        out["targets"][name] = {"least": least, "met": bool(ratio and ratio["median"] >= least)}
    return out


def baseline_worktree(ref: str, scratch: Path) -> Path:
    """``ref`` checked out beside this run (removed again by :func:`remove_worktree`)."""
    path = scratch / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT,
                   check=True, capture_output=True)  # fmt: skip
    return path


def remove_worktree(path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                   capture_output=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and repetitions")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu.json")
    parser.add_argument("--reps", type=int, help="repetitions per configuration")
    parser.add_argument("--epochs", type=int, help="epochs per training run")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, help="the commit to compare with")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"corpus not found: {args.corpus} (pass --corpus PATH)")
    reps, epochs = args.reps or (2 if args.quick else 7), args.epochs or (6 if args.quick else 40)
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "cpu", "mode": "quick" if args.quick else "full", "machine": machine(),
        "load_average_at_start": list(os.getloadavg()), "baseline_ref": args.baseline_ref,
        "setup": {"cell": "rnn", "num_hiddens": 256, "global_batch": 32, "num_steps": 35,
                  "max_tokens": 10_000, "epochs_per_run": epochs, "repetitions": reps},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="rnnlm-bench-") as tmp:
        scratch = Path(tmp)
        baseline = baseline_worktree(args.baseline_ref, scratch)
        try:
            chosen = configs(args.corpus, epochs, scratch / "cache", baseline)
            print(f"{len(chosen)} configurations, {epochs} epochs x {reps} repetitions")
            run_all(chosen, reps, scratch, args.timeout)
        finally:
            remove_worktree(baseline)
    result.update(report(chosen))
    result["load_average_at_end"] = list(os.getloadavg())
    result["seconds"] = time.time() - started
    for name, ratio in result["ratios_paired"].items():
        if ratio:
            print(f"{name:<26} {ratio['median']:.3f} [{ratio['min']:.3f}-{ratio['max']:.3f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
