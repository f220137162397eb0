"""CPU benchmark: the chapter's training loop vs this job, side by side, in one run.

    python benchmarks/bench_cpu.py --quick                        # ~2 minutes, a smoke run
    python benchmarks/bench_cpu.py --out benchmarks/results/cpu.json   # the full run

Every configuration is a real command in a fresh process, run as users run it, and the
repetitions are interleaved (baseline, ours, ours on 2 ranks, baseline, ...) so that a machine
getting busier or quieter affects all of them alike. Reported per configuration: median and
spread (min, max) over the repetitions of

- training tokens/s: tokens / seconds over the epochs after the first (the first epoch warms
  up allocators and caches), each process timing its own epochs, sampling excluded;
- start-up: seconds from launching the command to the first training step (the job and the
  baseline record the wall-clock time of their first step);
- peak memory: the largest resident set of any process of the command (``wait4``'s
  ``ru_maxrss``; for torchrun the launcher and both ranks).

Ratios are against the chapter's loop (:mod:`rnnlm.reference`: one-hot input, ``nn.RNN``,
``train_epoch_ch8`` with its per-step ``float()`` and d2l ``grad_clipping``), both of the medians
and paired (per repetition, median of the ratios). The full run also times the chapter's whole
result (500 epochs, perplexity <= 1.4) from command to exit, with tracking on again beside the
untracked job (its training tokens/s over the whole run), and greedy sampling in characters/s.
2 ranks against 1 rank are also measured with the machine's drift taken out, their epochs
interleaved in one torchrun job (``benchmarks/bench_scaling.py``).

The chapter's configuration throughout: RNN, 256 hidden, global batch 32, 35 steps, the first
10,000 tokens of The Time Machine. Thread settings are each command's defaults (torch uses every
core for one process; torchrun gives each of its ranks one thread), plus one row of our job
with one thread to show the per-core speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
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
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rnnlm.config import ModelConfig  # noqa: E402
from rnnlm.corpus import load_tokens  # noqa: E402
from rnnlm.generate import generate  # noqa: E402
from rnnlm.model import RNNLM  # noqa: E402
from rnnlm.reference import build, predict_ch8  # noqa: E402
from rnnlm.vocab import Vocab  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "timemachine.txt"
CHAPTER_EPOCHS = 500
CHAPTER_PERPLEXITY = 1.4


@dataclass
class Run:
    ok: bool
    wall_s: float
    startup_s: float | None = None
    tokens_per_s: float | None = None
    peak_rss_mb: float | None = None
    final_perplexity: float | None = None
    background_cpu_share: float | None = None  # background threads' CPU / training seconds
    error: str | None = None


@dataclass
class Config:
    name: str
    describe: str
    command: Callable[[Path], list[str]]  # the command, given a fresh scratch directory
    result_file: Callable[[Path], Path]
    env: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)


def machine() -> dict[str, Any]:
    cpu, family_model = platform.processor() or "unknown", None
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    names = re.findall(r"^model name\s*:\s*(.+)$", info, re.M)
    cpu = names[0] if names else cpu
    family, model = (
        re.search(r"^cpu family\s*:\s*(\d+)", info, re.M),
        re.search(r"^model\s*:\s*(\d+)", info, re.M),
    )
    if family and model:  # e.g. AMD family 25 is Zen 3/4, 26 is Zen 5
        family_model = f"family {family[1]} model {model[1]}"
    return {
        "cpu": cpu,
        "cpu_family_model": family_model,
        "kernel_isa": kernel_isa(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": _memory_gb(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def kernel_isa() -> str | None:
    """The instruction set the job's compiled kernel uses here (None: it cannot run here)."""
    try:
        from rnnlm import native
    except ImportError:  # benchmarking a tree without the kernel
        return None
    if native.why_unavailable() is not None:
        return None
    try:
        return native.chosen_isa()
    except (native.KernelUnavailable, native.UnsupportedCapability):
        return None


def _memory_gb() -> float | None:
    try:
        kb = int(re.findall(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())[0])
        return round(kb / 2**20, 1)
    except (OSError, IndexError):
        return None


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def base_env() -> dict[str, str]:
    """The caller's environment without settings that would change what is measured."""
    drop = ("MLFLOW_", "RNNLM_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(
    cmd: list[str], env: dict[str, str], log: Path, timeout: float
) -> tuple[int | None, float, float, float]:
    """Run ``cmd``; return (exit code or None if it ran past ``timeout`` seconds, launch time,
    wall seconds, peak RSS in MB)."""
    with log.open("w") as out:
        launched = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        code: int | None = None
        try:
            while True:
                # wait4 gives this child's own usage; ru_maxrss covers its waited-for children
                # too, so for torchrun it is the peak of the largest of launcher and ranks.
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    code = os.waitstatus_to_exitcode(status)
                    break
                if time.perf_counter() - start > timeout:
                    proc.terminate()
                    _, _, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
        except BaseException:  # interrupted: do not leave the job running
            proc.terminate()
            proc.wait()
            raise
        proc.returncode = code
        wall = time.perf_counter() - start
    return code, launched, wall, usage.ru_maxrss / 1024  # KB on Linux


def measure(config: Config, scratch: Path, timeout: float) -> Run:
    work = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{config.name}-"))
    env = {**base_env(), **config.env}
    log = work / "log.txt"
    code, launched, wall, rss = launch(config.command(work), env, log, timeout)
    if code != 0:
        why = f"ran past {timeout:.0f} s" if code is None else f"exit {code}"
        tail = log.read_text()[-1500:]
        shutil.rmtree(work, ignore_errors=True)
        return Run(ok=False, wall_s=wall, peak_rss_mb=rss, error=f"{why}: {tail}")
    info = json.loads(config.result_file(work).read_text())
    seconds, tokens = info["seconds_by_epoch"][1:], info["tokens_by_epoch"][1:]
    background = info.get("background_cpu_s")  # the job's; the chapter's loop has none
    share = background / sum(seconds) if seconds and background is not None else None
    shutil.rmtree(work, ignore_errors=True)
    return Run(
        ok=True,
        wall_s=wall,
        startup_s=info["first_step_time"] - launched,
        tokens_per_s=sum(tokens) / sum(seconds) if seconds else None,
        peak_rss_mb=rss,
        final_perplexity=info["perplexity_by_epoch"][-1],
        background_cpu_share=share,
    )


def summary(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def tracking_args(help_text: str) -> tuple[list[str] | None, list[str] | None, str | None]:
    """(args that turn tracking on into a local store, args that turn it off, why skipped).

    Tracking on/off is measured only when the job has a ``--tracking-uri`` flag AND a way to
    switch tracking off (``--no-tracking``, or ``--tracking-uri none``).
    """
    if "--tracking-uri" not in help_text:
        return None, None, "the job has no --tracking-uri flag"
    on = ["--tracking-uri", "sqlite:///{work}/mlflow.db"]
    if "--no-tracking" in help_text:
        return on, ["--no-tracking"], None
    if re.search(r"--tracking-uri[^\n]*\n?[^\n]*\bnone\b", help_text, re.I):
        return on, ["--tracking-uri", "none"], None
    return on, None, "the job has --tracking-uri but no documented way to switch tracking off"


def job_configs(corpus: Path, epochs: int, help_text: str) -> tuple[list[Config], list[str]]:
    py = sys.executable
    on, off, why = tracking_args(help_text)
    notes = [] if why is None else [f"tracking on vs off skipped: {why}"]
    off = off or []

    def job(*extra: str, nproc: int = 1) -> Callable[[Path], list[str]]:
        def command(work: Path) -> list[str]:
            launcher = [py, "-m", "jobs.train"]
            if nproc > 1:
                launcher = [py, "-m", "torch.distributed.run", "--standalone"]
                launcher += [f"--nproc-per-node={nproc}", "-m", "jobs.train"]
            args = [a.format(work=work) for a in extra]
            common = ["--corpus", str(corpus), "--epochs", str(epochs)]
            return [*launcher, *common, "--output-dir", str(work / "model"), *args]

        return command

    def job_result(work: Path) -> Path:
        return work / "model" / "train.json"

    def chapter(work: Path) -> list[str]:
        common = ["--corpus", str(corpus), "--epochs", str(epochs)]
        return [py, "-m", "rnnlm.reference", *common, "--out", str(work / "ref.json")]

    def chapter_result(work: Path) -> Path:
        return work / "ref.json"

    configs = [
        Config(
            "chapter",
            "the chapter's loop (rnnlm.reference), 1 process, default threads",
            chapter,
            chapter_result,
        ),
        Config(
            "chapter_1thread",
            "the chapter's loop, 1 process, OMP_NUM_THREADS=1",
            chapter,
            chapter_result,
            env={"OMP_NUM_THREADS": "1"},
        ),
        Config("ours_1proc", "jobs.train, 1 process, default threads", job(*off), job_result),
        Config(
            "ours_1proc_1thread",
            "jobs.train, 1 process, OMP_NUM_THREADS=1",
            job(*off),
            job_result,
            env={"OMP_NUM_THREADS": "1"},
        ),
        Config(
            "ours_2ranks",
            "torchrun --standalone --nproc-per-node 2 jobs.train (global batch 32)",
            job(*off, nproc=2),
            job_result,
        ),
    ]
    if "--cpu-kernel" in help_text:
        configs += [
            Config(
                "ours_1proc_torch_ops",
                "as ours_1proc, recurrence on the framework's operations (--cpu-kernel torch)",
                job(*off, "--cpu-kernel", "torch"),
                job_result,
            ),
            Config(
                "ours_2ranks_torch_ops",
                "as ours_2ranks, recurrence on the framework's operations (--cpu-kernel torch)",
                job(*off, "--cpu-kernel", "torch", nproc=2),
                job_result,
            ),
        ]
    if kernel_isa() == "avx512":  # the same bits from the narrower build: its speed, side by side
        configs.append(
            Config(
                "ours_1proc_avx2",
                "as ours_1proc, the compiled kernel's AVX2 build (RNNLM_CPU_CAPABILITY=avx2)",
                job(*off),
                job_result,
                env={"RNNLM_CPU_CAPABILITY": "avx2"},
            )
        )
    if "--allreduce" in help_text:
        configs.append(
            Config(
                "ours_2ranks_gloo",
                "as ours_2ranks, gradients all-reduced by gloo (--allreduce backend)",
                job(*off, "--allreduce", "backend", nproc=2),
                job_result,
            )
        )
    if on is not None and why is None:
        configs.append(
            Config(
                "ours_1proc_tracking",
                "jobs.train, 1 process, MLflow tracking into a local sqlite store",
                job(*on),
                job_result,
            )
        )
    # Each compared pair runs back to back (run_repetitions also reverses the order every other
    # repetition): on a machine whose speed drifts within minutes, a pair minutes apart measured
    # the drift as much as the difference.
    order = [
        "chapter",
        "ours_1proc",
        "ours_1proc_tracking",
        "ours_1proc_torch_ops",
        "ours_1proc_avx2",
        "chapter_1thread",
        "ours_1proc_1thread",
        "ours_2ranks",
        "ours_2ranks_gloo",
        "ours_2ranks_torch_ops",
    ]
    configs.sort(key=lambda config: order.index(config.name))
    return configs, notes


def interleaved_scaling(corpus: Path, rounds: int, scratch: Path) -> dict[str, Any] | None:
    """benchmarks/bench_scaling.py: 2 ranks against 1 rank with the drift taken out (each round's
    two halves a fraction of a second apart); None, with the reason printed, if it failed."""
    out = scratch / "scaling.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", str(ROOT / "benchmarks" / "bench_scaling.py")]
    command += ["--corpus", str(corpus), "--rounds", str(rounds), "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=base_env(), capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        print(f"  FAILED: {proc.stderr[-2000:]}")
        return None
    result: dict[str, Any] = json.loads(out.read_text())
    ratio = result["ratio_2_ranks_vs_1_rank_per_round"]
    rates = {name: f"{r['median']:,.0f}" for name, r in result["tokens_per_s"].items()}
    print(f"  tokens/s medians {rates}")
    print(
        f"  ratio per round: median {ratio['median']:.3f} [{ratio['min']:.2f}-{ratio['max']:.2f}]"
    )
    return result


def bench_sampling(corpus: Path, num_chars: int, reps: int) -> dict[str, Any]:
    """Greedy characters/s: the chapter's predict_ch8 (one prefix) vs rnnlm.generate (one
    prefix, and 64 prefixes at once). Untrained weights: greedy speed does not depend on them."""
    tokens = load_tokens(corpus, "d2l")
    vocab = Vocab.build(tokens)
    text = "".join(tokens)
    prefixes = [text[i : i + 12] for i in range(0, 64 * 997, 997)][:64]
    torch.manual_seed(0)
    ours = RNNLM(ModelConfig(len(vocab)))
    chapter = build(len(vocab))
    cpu = torch.device("cpu")
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "chapter_predict_ch8_1_prefix": (
            lambda: predict_ch8("time traveller", num_chars, chapter, vocab, cpu),
            num_chars,
        ),
        "ours_generate_1_prefix": (
            lambda: generate(ours, vocab, ["time traveller"], num_chars),
            num_chars,
        ),
        "ours_generate_64_prefixes": (
            lambda: generate(ours, vocab, prefixes, num_chars),
            64 * num_chars,
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for fn, _ in cases.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, (fn, chars) in cases.items():
            start = time.perf_counter()
            fn()
            rates[name].append(chars / (time.perf_counter() - start))
    return {
        "num_chars": num_chars,
        "threads": torch.get_num_threads(),
        "chars_per_s": {name: summary(r) for name, r in rates.items()},
    }


def run_repetitions(
    configs: list[Config],
    reps: int,
    scratch: Path,
    timeout: float,
    show: Callable[[Run], str] = lambda run: f"{run.tokens_per_s or 0:,.0f} tokens/s",
) -> None:
    """Run every configuration ``reps`` times, interleaved, into ``config.runs``: in the given
    order, then in reverse, and so on, so that a drift of the machine's speed during the run
    weighs on both sides of each pair of neighbours alike."""
    for rep in range(reps):
        for config in configs if rep % 2 == 0 else configs[::-1]:
            run = measure(config, scratch, timeout)
            config.runs.append(run)
            shown = show(run) if run.ok else "FAILED"
            print(f"  rep {rep + 1}/{reps} {config.name:<22} {shown}", flush=True)
            if not run.ok:
                print(f"    {run.error}", flush=True)


def ratios(top: list[float | None], bottom: list[float | None]) -> tuple[float, Any] | None:
    """median(top) / median(bottom), and the summary of top_i / bottom_i over the repetitions
    where both ran (None, a failed or missing run); None when there is no pair."""
    tops, bottoms = [t for t in top if t], [b for b in bottom if b]
    paired = [t / b for t, b in zip(top, bottom, strict=True) if t and b]
    if not paired:
        return None
    return statistics.median(tops) / statistics.median(bottoms), summary(paired)


def rates_of(config: Config) -> list[float | None]:
    """Tokens/s of each repetition, None where it failed: the input of :func:`ratios`."""
    return [r.tokens_per_s if r.ok else None for r in config.runs]


def report_configs(configs: list[Config]) -> dict[str, Any]:
    base_rates = rates_of(configs[0])
    by_name = {config.name: config for config in configs}
    out: dict[str, Any] = {}
    for config in configs:
        ok = [r for r in config.runs if r.ok]
        rates = [r.tokens_per_s for r in ok if r.tokens_per_s]
        entry: dict[str, Any] = {
            "describe": config.describe,
            "tokens_per_s": summary(rates),
            "startup_s": summary([r.startup_s for r in ok if r.startup_s is not None]),
            "peak_rss_mb": summary([r.peak_rss_mb for r in ok if r.peak_rss_mb]),
            "failures": [r.error for r in config.runs if not r.ok],
        }
        shares = [r.background_cpu_share for r in ok if r.background_cpu_share is not None]
        if shares:
            entry["background_cpu_share"] = summary(shares)
        against_chapter = ratios(rates_of(config), base_rates)
        if against_chapter:
            entry["ratio_vs_chapter_of_medians"], entry["ratio_vs_chapter_paired"] = against_chapter
        out[config.name] = entry

    def versus(top: str, bottom: str) -> tuple[float, Any] | None:
        """:func:`ratios` of two configurations' rates; None where either did not run."""
        if top not in by_name or bottom not in by_name:
            return None
        return ratios(rates_of(by_name[top]), rates_of(by_name[bottom]))

    scaling: dict[str, float] = {}
    for key, top, bottom in [
        ("2ranks_vs_1proc", "ours_2ranks", "ours_1proc"),
        ("2ranks_vs_1proc_1thread", "ours_2ranks", "ours_1proc_1thread"),
        ("2ranks_shm_vs_2ranks_gloo", "ours_2ranks", "ours_2ranks_gloo"),
        ("1proc_avx512_vs_avx2", "ours_1proc", "ours_1proc_avx2"),
        ("per_core_1thread_vs_chapter_1thread", "ours_1proc_1thread", "chapter_1thread"),
    ]:
        if compared := versus(top, bottom):
            scaling[key] = compared[0]
    # the median of the repetitions' ratios: drift between repetitions cancels
    if compared := versus("ours_2ranks", "ours_1proc_1thread"):
        scaling["2ranks_vs_1proc_1thread_paired"] = compared[1]["median"]
    if slowdown := tracking_slowdown(by_name):
        scaling.update(slowdown)
        # Drift-free: the CPU tracking's threads took while training, as a share of the
        # training time (on minus off); the most tracking can have slowed training by.
        on, off = (
            [r.background_cpu_share for r in by_name[name].runs if r.ok]
            for name in ("ours_1proc_tracking", "ours_1proc")
        )
        known_on, known_off = ([x for x in xs if x is not None] for xs in (on, off))
        if on and off and len(known_on) == len(on) and len(known_off) == len(off):
            scaling["tracking_cpu_share"] = statistics.median(known_on) - statistics.median(
                known_off
            )
    out["_derived"] = scaling
    return out


def time_to_result(
    configs: list[Config], reps: int, scratch: Path, timeout: float
) -> dict[str, Any]:
    """The chapter's whole run (500 epochs) per configuration, command to exit, ``reps`` times
    interleaved like the throughput runs: wall seconds (median, range), the ratio to the
    chapter's (of the medians and paired), and the final perplexity of every run."""
    run_repetitions(
        configs,
        reps,
        scratch,
        timeout,
        show=lambda run: f"{run.wall_s:.1f} s, perplexity {run.final_perplexity:.3f}",
    )
    base_walls = [r.wall_s if r.ok else None for r in configs[0].runs]
    result: dict[str, Any] = {}
    for config in configs:
        ok = [r for r in config.runs if r.ok]
        perplexities = [r.final_perplexity for r in ok if r.final_perplexity is not None]
        entry: dict[str, Any] = {
            "wall_s": summary([r.wall_s for r in ok]),
            "final_perplexity": perplexities,
            "reached": len(perplexities) == len(config.runs)
            and all(p <= CHAPTER_PERPLEXITY for p in perplexities),
            "failures": [r.error for r in config.runs if not r.ok],
        }
        shares = [r.background_cpu_share for r in ok if r.background_cpu_share is not None]
        if shares:
            entry["background_cpu_share"] = summary(shares)
        rates = [r.tokens_per_s for r in ok if r.tokens_per_s is not None]
        if rates and config is not configs[0]:
            entry["tokens_per_s"] = summary(rates)  # training epochs after the first
        # A speed-up: the chapter's seconds over ours.
        versus = ratios(base_walls, [r.wall_s if r.ok else None for r in config.runs])
        if versus:
            entry["speedup_vs_chapter_of_medians"], entry["speedup_vs_chapter_paired"] = versus
        result[config.name] = entry
    # Tracking's cost over the whole run, by the training epochs' tokens/s (start-up and the
    # model's registration at the end are not training)
    if slowdown := tracking_slowdown({config.name: config for config in configs}):
        result["_derived"] = slowdown
    return result


def tracking_slowdown(by_name: dict[str, Config]) -> dict[str, float]:
    """1 - tracked / untracked tokens/s, of the medians and paired; empty where either is
    missing or no pair ran."""
    if "ours_1proc_tracking" not in by_name or "ours_1proc" not in by_name:
        return {}
    compared = ratios(rates_of(by_name["ours_1proc_tracking"]), rates_of(by_name["ours_1proc"]))
    if not compared:
        return {}
    return {
        "tracking_slowdown": 1 - compared[0],
        "tracking_slowdown_paired": 1 - compared[1]["median"],
    }


def print_table(report: dict[str, Any]) -> None:
    print("\nconfiguration            tokens/s median [min-max]     x chapter  start-up s  peak MB")
    for name, e in report.items():
        if name.startswith("_") or not e["tokens_per_s"]:
            continue
        t = e["tokens_per_s"]
        ratio = e.get("ratio_vs_chapter_of_medians", float("nan"))
        startup = e["startup_s"]["median"] if e["startup_s"] else float("nan")
        rss = e["peak_rss_mb"]["median"] if e["peak_rss_mb"] else float("nan")
        print(
            f"{name:<24} {t['median']:>9,.0f} [{t['min']:,.0f}-{t['max']:,.0f}]"
            f"  {ratio:>9.2f}  {startup:>10.2f}  {rss:>7.0f}"
        )
    for key, value in report["_derived"].items():
        print(f"{key}: {value:.3f}")


def main(argv: list[str] | None = None) -> None:
    # A terminated benchmark stops the command it is timing (see launch).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and repetitions")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu.json")
    parser.add_argument("--reps", type=int, help="repetitions per configuration")
    parser.add_argument("--epochs", type=int, help="epochs per training run")
    parser.add_argument(
        "--reps-500", type=int, default=3, help="repetitions of the 500-epoch runs (full mode)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds before one command counts as failed"
    )
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"corpus not found: {args.corpus} (pass --corpus PATH)")
    reps = args.reps or (2 if args.quick else 5)
    epochs = args.epochs or (6 if args.quick else 40)
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "cpu",
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "load_average_at_start": load_average(),
        "setup": {
            "cell": "rnn",
            "num_hiddens": 256,
            "global_batch": 32,
            "num_steps": 35,
            "max_tokens": 10_000,
            "epochs_per_run": epochs,
            "repetitions": reps,
        },
    }
    help_text = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--help"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    configs, notes = job_configs(args.corpus, epochs, help_text)
    for note in notes:
        print(f"note: {note}")
    with tempfile.TemporaryDirectory(prefix="rnnlm-bench-") as scratch:
        print(f"training throughput: {epochs} epochs x {reps} repetitions, interleaved")
        run_repetitions(configs, reps, Path(scratch), args.timeout)
        result["training"] = report_configs(configs)
        print_table(result["training"])
        rounds = 6 if args.quick else 40
        print(f"\n2 ranks vs 1 rank, epochs interleaved in one torchrun job ({rounds} rounds)")
        result["scaling_interleaved"] = interleaved_scaling(args.corpus, rounds, Path(scratch))
        print("\nsampling (greedy, characters/s)")
        result["sampling"] = bench_sampling(args.corpus, 100 if args.quick else 500, reps)
        for name, s in result["sampling"]["chars_per_s"].items():
            print(f"  {name:<32} {s['median']:>12,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]")
        if not args.quick:
            print(f"\ntime to the chapter's result ({CHAPTER_EPOCHS} epochs, command to exit)")
            full, _ = job_configs(args.corpus, CHAPTER_EPOCHS, help_text)
            # Tracking on again over the chapter's whole run: its costs come per second of
            # training, and the 40-epoch runs above train for about a second.
            names = ("chapter", "ours_1proc", "ours_1proc_tracking", "ours_2ranks")
            chosen = [c for c in full if c.name in names]
            result["time_to_result"] = time_to_result(
                chosen, args.reps_500, Path(scratch), args.timeout
            )
            for name, entry in result["time_to_result"].items():
                if name.startswith("_"):
                    for key, value in entry.items():
                        print(f"  {key}: {value:.3f}")
                    continue
                wall = entry["wall_s"]
                if wall:
                    speedup = entry.get("speedup_vs_chapter_of_medians", float("nan"))
                    print(
                        f"  {name:<22} median {wall['median']:.1f} s "
                        f"[{wall['min']:.1f}-{wall['max']:.1f}]  x chapter {speedup:.2f}"
                    )
    result["notes"] = notes
    result["load_average_at_end"] = load_average()
    result["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
