"""Data benchmark: corpora of any size, prepared once, and what a job then pays for their size.

    python benchmarks/bench_data.py --work /scratch/bench-data \\
        --out benchmarks/results/data.json            # 1MB,100MB,1GB; ~3 GB of scratch disk
    python benchmarks/bench_data.py --sizes 1MB --repeats 1 --out /tmp/data.json   # a smoke run
    python benchmarks/bench_data.py --markdown benchmarks/results/data.json \\
        --plot docs/figures/data.png                  # the docs' table (and figure) of a report

Per size (decimal units: 1 MB = 10**6 bytes, memory included), a synthetic corpus is written
from the chapter's text (``--corpus``): words drawn with replacement from the chapter's word
positions (so at the chapter's word frequencies, punctuation attached) by a seeded numpy
generator, a line ending after a word at the chapter's rate of lines per word. It is never a
repetition of one block: the report records the fraction of its lines that are distinct (a
text repeating the chapter N times has at most 1/N) and how well zlib compresses its first MB
next to the chapter itself. Then, for that corpus, every command as users run it, in a fresh
process:

1. **first preparation**: ``python -m jobs.prepare`` into an empty cache. Its wall time (command
   to exit: interpreter, imports, hashing the file, tokenising, writing the ids) and the
   preparation's own seconds and MB/s from its ``prepared ...`` log line (tokenising and writing
   the ids, after the hash). The file has just been written, so it is read from the page cache
   (as is a corpus that was just downloaded). The sha1 of the file is also timed in this process
   (``rnnlm.corpus.sha1_of``), once.
2. **cached start**: ``python -m jobs.train --max-tokens -1 --max-steps 2`` (one process) with
   that cache, from just before the command is started to its first training step
   (``first_step_time`` in its ``train.json``), next to the same command on the chapter's corpus
   (prepared in its own cache), both run once unmeasured first, then ``--repeats`` times
   interleaved (the order reversed every other repetition). The difference is paired: each
   repetition's size minus its chapter run, then the median.
3. **peak resident memory per rank**: ``torchrun --standalone --nproc-per-node 2 -m jobs.train
   --max-tokens -1 --max-steps --rss-steps`` for each ``--samplings``. The two ranks (torchrun's
   descendants with ``RANK`` in their environment) are polled every ``--poll-ms`` for their
   ``/proc/<pid>/status``: ``VmHWM`` is the kernel's own peak of the resident set, ``RssAnon``,
   ``RssFile`` and ``RssShmem`` its parts (their largest samples are reported), and every
   ``SMAPS_EVERY`` samples the resident part of the ``ids.bin`` mapping (``/proc/<pid>/smaps``).
   The memory-mapped ids count as ``RssFile`` while mapped: pages shared with the page cache,
   and between ranks (where the page cache holds the file in large folios, a fault maps a whole
   folio, up to 2 MB). The job unmaps the pages it has read before each minibatch, so they do
   not accumulate. Of the anonymous part only random sampling's window starts (4 bytes per
   ``--num-steps`` tokens) grow with the corpus.
   ``wait4``'s ``ru_maxrss`` of torchrun (the largest resident set of the whole process tree)
   is a cross-check. Each job's start (command to ``first_step_time``) and first report's
   seconds are recorded too: with ``--sampling random`` the start includes laying out the first
   pass (shuffling its window starts), which the job does before its first step.

The chapter's corpus is measured alike (its preparation and memory once, its start next to every
size). All jobs: ``--cpu-kernel torch --no-tracking --val-tokens 2000 --num-sample-chars 0``, the
chapter's model and global batch (32 x 35), ``OMP_NUM_THREADS=1``. Each size's corpus and caches
are deleted once it is measured (disk stays bounded by the largest size, about 3x it).

Targets (from the issue; each judged from the measurements, with the sizes it was judged at):
preparation >= 100 MB/s at 100 MB and above (a run of smaller sizes only: at its largest);
cached start at most 1 s later than the chapter's at every size (paired median); peak
``VmHWM`` per rank < 500 MB at the largest size, for every sampling measured. A measurement that
failed counts as not met.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_cpu import DEFAULT_CORPUS, machine  # noqa: E402

MB = 10**6
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
DEFAULT_SIZES = "1MB,100MB,1GB"
TARGET_PREP_MB_PER_S = 100.0
TARGET_PREP_FROM_BYTES = 100 * MB  # the preparation target applies from this size up
TARGET_START_S = 1.0
TARGET_RSS_MB = 500.0
COMMON = ["--no-tracking", "--max-tokens", "-1", "--val-tokens", "2000", "--cpu-kernel", "torch",
          "--num-sample-chars", "0", "--device", "cpu"]  # fmt: skip
PREPARED_LINE = re.compile(
    r"prepared (?P<name>.+?): (?P<tokens>\d+) tokens, vocabulary (?P<vocab>\d+), "
    r"(?P<seconds>[\d.]+) s \((?P<mb_per_s>[\d.]+) MB/s\)"
)
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
SMAPS_EVERY = 25  # status samples between two reads of the (longer) smaps


# ---------------------------------------------------------------------------------- sizes ---


def parse_size(text: str) -> int:
    """``"1MB"`` -> 1_000_000 (decimal units, as the preparation's MB/s; a bare number: bytes)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text.upper())
    if not found:
        raise ValueError(f"not a size: {text!r} (e.g. 200KB, 100MB, 1GB)")
    return int(float(found[1]) * UNITS[found[2] or "B"])


def size_label(size: int) -> str:
    """The shortest exact label: 1_000_000_000 -> ``"1GB"``, 1_500_000 -> ``"1500KB"``."""
    for unit in ("TB", "GB", "MB", "KB"):
        if size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return f"{size}B"


# ------------------------------------------------------------------------ synthetic corpus ---


class DistinctLines:
    """Estimates the fraction of a stream's lines that are distinct, from the lines whose CRC-32
    falls in one ``SAMPLE``-th of its values (equal lines are all kept or all left out, so the
    fraction among them is that of all lines, in bounded memory). A text that repeats a block of
    L lines has at most L distinct ones."""

    SAMPLE = 8

    def __init__(self) -> None:
        self.kept: list[np.ndarray] = []
        self.carry = b""

    def add(self, chunk: bytes) -> None:
        *lines, self.carry = (self.carry + chunk).split(b"\n")
        hashes = np.fromiter(map(zlib.crc32, lines), dtype=np.int64, count=len(lines))
        self.kept.append(hashes[hashes % self.SAMPLE == 0])

    def fraction(self) -> float | None:
        """Distinct lines / lines among those sampled (None: none sampled)."""
        self.add(b"\n")  # the last line
        kept = np.concatenate(self.kept) if self.kept else np.empty(0, dtype=np.int64)
        return len(np.unique(kept)) / len(kept) if len(kept) else None


def synthetic_corpus(chapter: Path, out: Path, size: int, seed: int = 0) -> dict[str, Any]:
    """Write ``size`` bytes of text made of ``chapter``'s words (see the module's docstring),
    a chunk at a time; return how it was made and how mixed it is."""
    text = chapter.read_text(encoding="utf-8")
    words = text.split()
    if not words:
        raise ValueError(f"{chapter} holds no words")
    lines = sum(1 for line in text.split("\n") if line.strip())
    eol_rate = lines / len(words)
    encoded = [w.encode("utf-8") for w in words]
    width = max(map(len, encoded)) + 1
    # Row i: word i and a space; row n + i: word i and a line end.
    table = np.zeros((2 * len(words), width), dtype=np.uint8)
    lengths = np.zeros(2 * len(words), dtype=np.int64)
    for i, word in enumerate(encoded):
        for row, sep in ((i, b" "), (len(words) + i, b"\n")):
            table[row, : len(word) + 1] = np.frombuffer(word + sep, dtype=np.uint8)
            lengths[row] = len(word) + 1
    rng = np.random.Generator(np.random.PCG64(seed))
    per_chunk = 1 << 18  # words at a time (~1.6 MB): a smaller corpus is a larger one's start
    lines_seen = DistinctLines()
    written, head = 0, bytearray()
    started = time.perf_counter()
    with open(out, "wb") as f:
        while written < size:
            rows = rng.integers(0, len(words), per_chunk) + len(words) * (
                rng.random(per_chunk) < eol_rate
            )
            chunk = table[rows][np.arange(width) < lengths[rows][:, None]].tobytes()
            if written + len(chunk) >= size:  # end at a word's end, padded with line ends
                chunk = chunk[: size - written]
                end = max(chunk.rfind(b" "), chunk.rfind(b"\n")) + 1
                chunk = chunk[:end] + b"\n" * (len(chunk) - end)
            f.write(chunk)
            written += len(chunk)
            if len(head) < MB:
                head += chunk[: MB - len(head)]
            lines_seen.add(chunk)
    seconds = time.perf_counter() - started
    source = text.encode("utf-8")
    return {
        "bytes": written,
        "method": "words drawn with replacement from the chapter's word positions (its word "
        "frequencies, punctuation attached), a line end after a word with the chapter's "
        "lines-per-word probability, by numpy's PCG64 generator",
        "seed": seed,
        "source": str(chapter),
        "source_sha1": hashlib.sha1(source).hexdigest(),
        "source_words": len(words),
        "source_distinct_words": len(set(words)),
        "line_end_probability": eol_rate,
        "distinct_lines_fraction": lines_seen.fraction(),
        "distinct_lines_fraction_chapter": _distinct_lines(source),
        "zlib_ratio_first_mb": len(zlib.compress(bytes(head), 6)) / len(head),
        "zlib_ratio_chapter": len(zlib.compress(source[:MB], 6)) / len(source[:MB]),
        "seconds": seconds,
    }


def _distinct_lines(text: bytes) -> float | None:
    counter = DistinctLines()
    counter.add(text)
    return counter.fraction()


# ------------------------------------------------------------------------------- commands ---


def job_env() -> dict[str, str]:
    """The caller's environment with this checkout first on the path, none of the job's own
    settings, and one thread per process (as torchrun gives each rank)."""
    drop = ("MLFLOW_", "RNNLM_", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def train_command(corpus: Path, cache: Path, output: Path, steps: int, *extra: str,
                  nproc: int = 1) -> list[str]:  # fmt: skip
    launcher = [sys.executable, "-m", "jobs.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", "-m", "jobs.train"]  # fmt: skip
    return [*launcher, "--corpus", str(corpus), "--cache-dir", str(cache), "--output-dir",
            str(output), "--max-steps", str(steps), "--eval-every", str(steps), *COMMON,
            *extra]  # fmt: skip


def _failure(code: int | None, log: Path, timeout: float) -> str:
    why = f"ran past {timeout:.0f} s" if code is None else f"exit {code}"
    return f"{why}: {log.read_text(errors='replace')[-1500:]}"


def _wait(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int | None, float]:
    """(exit code or None when killed at ``deadline``, ``ru_maxrss`` of the tree in MB)."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024 / MB
        if time.monotonic() > deadline:
            _kill_tree(proc.pid)
            _, _, usage = os.wait4(proc.pid, 0)
            return None, usage.ru_maxrss * 1024 / MB
        time.sleep(0.02)


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        for p in [*parent.children(recursive=True), parent]:
            p.kill()
    except psutil.Error:
        pass


def parse_prepared(log_text: str) -> dict[str, Any] | None:
    """The figures of the preparation's ``prepared NAME: N tokens, vocabulary V, S s (R MB/s)``
    log line (None without one)."""
    found = PREPARED_LINE.search(log_text)
    if not found:
        return None
    return {
        "tokens": int(found["tokens"]),
        "vocabulary": int(found["vocab"]),
        "seconds_logged": float(found["seconds"]),
        "mb_per_s": float(found["mb_per_s"]),
    }


def measure_preparation(corpus: Path, cache: Path, log: Path, timeout: float) -> dict[str, Any]:
    """The first preparation of ``corpus`` into the empty ``cache`` (see the docstring)."""
    size = corpus.stat().st_size
    cmd = [sys.executable, "-m", "jobs.prepare", "--corpus", str(corpus), "--cache-dir", str(cache)]
    with log.open("w") as out:
        launched = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        code, max_rss = _wait(proc, time.monotonic() + timeout)
        wall = time.perf_counter() - launched
    result: dict[str, Any] = {
        "ok": code == 0,
        "command_s": wall,
        "command_mb_per_s": size / MB / wall,
        "max_rss_mb": max_rss,
    }
    logged = parse_prepared(log.read_text(errors="replace")) if code == 0 else None
    if code != 0:
        result["error"] = _failure(code, log, timeout)
    elif logged is None:
        result.update(ok=False, error="no 'prepared ...' line in its log")
    else:
        # The log rounds seconds to 0.1 s, its MB/s to 1: seconds from the rate are finer.
        result.update(logged, seconds=size / MB / logged["mb_per_s"] if logged["mb_per_s"] else
                      logged["seconds_logged"])  # fmt: skip
    return result


def time_sha1(corpus: Path) -> dict[str, float]:
    from rnnlm.corpus import sha1_of

    started = time.perf_counter()
    sha1_of(corpus)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "mb_per_s": corpus.stat().st_size / MB / seconds}


def measure_start(corpus: Path, cache: Path, work: Path, timeout: float) -> dict[str, Any]:
    """One cached start: command to the first training step, in seconds."""
    run = Path(tempfile.mkdtemp(dir=work, prefix="start-"))
    log = run / "log.txt"
    with log.open("w") as out:
        launched = time.time()
        proc = subprocess.Popen(train_command(corpus, cache, run / "model", 2), cwd=ROOT,
                                env=job_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)  # fmt: skip
        code, _ = _wait(proc, time.monotonic() + timeout)
    try:
        if code != 0:
            return {"ok": False, "error": _failure(code, log, timeout)}
        info = json.loads((run / "model" / "train.json").read_text())
        return {"ok": True, "seconds": info["first_step_time"] - launched}
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _read_status(pid: int) -> dict[str, float] | None:
    """The memory fields of ``/proc/<pid>/status``, in MB (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in STATUS_FIELDS:
            fields[name] = int(value.split()[0]) * 1024 / MB  # kB
    return fields if "VmHWM" in fields else None


def _mapped_mb(pid: int, name: str) -> float | None:
    """The resident MB of ``pid``'s mappings of files called ``name`` (``/proc/<pid>/smaps``)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    total, inside = 0, False
    for line in text.splitlines():
        if _MAPPING.match(line):
            inside = line.rstrip().endswith("/" + name)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total * 1024 / MB


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def _workers(root: int) -> dict[int, int]:
    """pid -> rank of the job's ranks among ``root``'s descendants."""
    found: dict[int, int] = {}
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            if "jobs.train" in " ".join(child.cmdline()) and "RANK" in (env := child.environ()):
                found[child.pid] = int(env["RANK"])
        except (psutil.Error, ValueError):
            continue
    return found


def measure_memory(corpus: Path, cache: Path, work: Path, sampling: str, steps: int,
                   poll_s: float, timeout: float) -> dict[str, Any]:  # fmt: skip
    """A 2-rank job's peak resident memory per rank (see the docstring)."""
    run = Path(tempfile.mkdtemp(dir=work, prefix=f"memory-{sampling}-"))
    log = run / "log.txt"
    cmd = train_command(corpus, cache, run / "model", steps, "--sampling", sampling, nproc=2)
    peaks: dict[int, dict[str, float]] = {}  # rank -> the largest sample of every field
    last: dict[int, dict[str, float]] = {}
    samples: dict[int, int] = {}
    with log.open("w") as out:
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        deadline, code, tree_mb = time.monotonic() + timeout, None, None
        ranks: dict[int, int] = {}  # pid -> rank
        while True:
            pid, status_code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = proc.returncode = os.waitstatus_to_exitcode(status_code)
                tree_mb = usage.ru_maxrss * 1024 / MB
                break
            if time.monotonic() > deadline:
                code, tree_mb = _wait(proc, deadline)
                break
            if len(ranks) < 2:
                ranks.update(_workers(proc.pid))
            for worker, rank in ranks.items():
                status = _read_status(worker)
                if status is None:
                    continue
                peak = peaks.setdefault(rank, {})
                for name, value in status.items():
                    peak[name] = max(peak.get(name, 0.0), value)
                last[rank], samples[rank] = status, samples.get(rank, 0) + 1
                if samples[rank] % SMAPS_EVERY == 1:  # costlier: now and then
                    ids = _mapped_mb(worker, "ids.bin")
                    if ids is not None:
                        peak["ids"] = max(peak.get("ids", 0.0), ids)
            time.sleep(poll_s)
    result: dict[str, Any] = {"sampling": sampling, "ok": code == 0, "steps": steps,
                              "wall_s": time.time() - launched,
                              "tree_max_rss_mb": tree_mb}  # fmt: skip
    result["ranks"] = [
        {"rank": rank, "samples": samples[rank],
         "vm_hwm_mb": peaks[rank]["VmHWM"],
         **{f"{_snake(name)}_mb_max": peaks[rank].get(name) for name in STATUS_FIELDS[1:]},
         "ids_mapped_mb_max": peaks[rank].get("ids"),
         "last": {f"{_snake(name)}_mb": last[rank].get(name) for name in STATUS_FIELDS}}
        for rank in sorted(peaks)
    ]  # fmt: skip
    result["peak_vm_hwm_mb_per_rank"] = max((r["vm_hwm_mb"] for r in result["ranks"]),
                                            default=None)  # fmt: skip
    try:
        if code != 0:
            result["error"] = _failure(code, log, timeout)
        elif len(peaks) != 2:
            result.update(ok=False, error=f"sampled {len(peaks)} of 2 ranks")
        else:
            info = json.loads((run / "model" / "train.json").read_text())
            result["start_s"] = info["first_step_time"] - launched
            result["first_report_s"] = info["seconds_by_epoch"][0]
        return result
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _snake(name: str) -> str:
    return {"VmHWM": "vm_hwm", "VmRSS": "vm_rss", "RssAnon": "rss_anon", "RssFile": "rss_file",
            "RssShmem": "rss_shmem"}[name]  # fmt: skip


# ------------------------------------------------------------------------------- the report ---


def summary(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def start_report(size_runs: list[dict[str, Any]], chapter_runs: list[dict[str, Any]]
                 ) -> dict[str, Any]:  # fmt: skip
    """Both sides' starts by repetition (None where it failed), their medians and the paired
    difference (size minus chapter, per repetition where both ran, then the median)."""
    size_s = [r["seconds"] if r["ok"] else None for r in size_runs]
    chapter_s = [r["seconds"] if r["ok"] else None for r in chapter_runs]
    pairs = [s - c for s, c in zip(size_s, chapter_s, strict=True)
             if s is not None and c is not None]  # fmt: skip
    return {
        "size_s_by_repetition": size_s,
        "chapter_s_by_repetition": chapter_s,
        "size_s": summary([s for s in size_s if s is not None]),
        "chapter_s": summary([c for c in chapter_s if c is not None]),
        "difference_s_paired": summary(pairs),
        "failures": [r["error"] for r in [*size_runs, *chapter_runs] if not r["ok"]],
    }


def _largest(job: dict[str, Any], key: str) -> float | None:
    values = [r[key] for r in job.get("ranks", []) if r.get(key) is not None]
    return max(values) if values else None


def targets(sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, judged from the per-size results (label -> result with
    ``bytes``, ``preparation``, ``start`` and ``memory``); each with the sizes it was judged at.
    A measurement that failed counts as not met."""
    if not sizes:
        return {}
    by_bytes = sorted(sizes, key=lambda label: sizes[label]["bytes"])
    prep_at = [s for s in by_bytes if sizes[s]["bytes"] >= TARGET_PREP_FROM_BYTES]
    prep_at = prep_at or by_bytes[-1:]  # a smaller run: judged at its largest size
    prep = {s: sizes[s]["preparation"].get("mb_per_s") for s in prep_at}
    start = {s: ((sizes[s]["start"].get("difference_s_paired") or {}).get("median"))
             for s in by_bytes}  # fmt: skip
    largest = by_bytes[-1]
    jobs = sizes[largest]["memory"]
    rss = {sampling: job.get("peak_vm_hwm_mb_per_rank") if job.get("ok") else None
           for sampling, job in jobs.items()}  # fmt: skip
    return {
        "prep_mb_per_s": {
            "least": TARGET_PREP_MB_PER_S, "judged_at": prep_at, "measured": prep,
            "met": all(v is not None and v >= TARGET_PREP_MB_PER_S for v in prep.values()),
        },
        "cached_start_minus_chapter_s": {
            "most": TARGET_START_S, "judged_at": by_bytes, "measured": start,
            "met": all(v is not None and v <= TARGET_START_S for v in start.values()),
        },
        "peak_rss_per_rank_mb": {
            "below": TARGET_RSS_MB, "judged_at": largest, "measured": rss,
            "met": bool(rss) and all(v is not None and v < TARGET_RSS_MB for v in rss.values()),
            # of it (the largest samples, over the ranks): the processes' own memory, and the
            # corpus's pages mapped from the page cache
            "anonymous_mb": {s: _largest(job, "rss_anon_mb_max") for s, job in jobs.items()},
            "corpus_mapped_mb": {s: _largest(job, "ids_mapped_mb_max")
                                 for s, job in jobs.items()},
        },
        "judged_at_the_issue_sizes": {"100MB", "1GB"} <= set(by_bytes),
    }  # fmt: skip


# ------------------------------------------------------------------------ markdown and plot ---


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _rss_cell(job: dict[str, Any] | None) -> str:
    if not job or not job.get("ok"):
        return "failed" if job else "—"
    worst = max(job["ranks"], key=lambda r: r["vm_hwm_mb"])
    return (f"{worst['vm_hwm_mb']:.0f} ({_fmt(worst.get('rss_anon_mb_max'), 0)} / "
            f"{_fmt(worst.get('rss_file_mb_max'), 0)}; "
            f"{_fmt(worst.get('ids_mapped_mb_max'), 0)})")  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The docs' tables of a report: per size, then the targets."""
    samplings = list(result["setup"]["samplings"])
    rss_heads = [f"peak RSS/rank MB, {s} (anon / file; corpus)" for s in samplings]
    head = ("| corpus | preparation s | MB/s | `jobs.prepare` s | start s (chapter's) | "
            "start - chapter s, paired | " + " | ".join(rss_heads) + " |")  # fmt: skip
    lines = [head, "|" + "---|" * (6 + len(samplings))]
    chapter = result["chapter"]
    rows = [(f"the chapter ({chapter['bytes'] / 1e3:,.0f} KB)", chapter, None)]
    rows += [(label, r, r["start"]) for label, r in result["sizes"].items()]
    for label, r, start in rows:
        prep = r["preparation"]
        if start:
            own, theirs = start["size_s"], start["chapter_s"]
            start_cell = (f"{_fmt(own and own['median'], 2)} "
                          f"({_fmt(theirs and theirs['median'], 2)})")  # fmt: skip
            diff = start["difference_s_paired"]
            diff_cell = _fmt(diff and diff["median"], 2)
        else:
            start_cell = diff_cell = ""
        memory = r.get("memory", {})
        lines.append(
            f"| {label} | {_fmt(prep.get('seconds'), 2)} | {_fmt(prep.get('mb_per_s'), 0)} | "
            f"{_fmt(prep.get('command_s'), 1)} | {start_cell} | {diff_cell} | "
            + " | ".join(_rss_cell(memory.get(s)) for s in samplings)
            + " |"
        )
    t = result["targets"]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    if t:

        def cells(measured: dict[str, float | None], digits: int) -> str:
            return ", ".join(f"{k} {_fmt(v, digits)}" for k, v in measured.items())

        p, s, m = t["prep_mb_per_s"], t["cached_start_minus_chapter_s"], t["peak_rss_per_rank_mb"]
        lines += [
            f"| preparation >= {p['least']:.0f} MB/s (at {', '.join(p['judged_at'])}) | "
            f"{cells(p['measured'], 0)} MB/s | {'yes' if p['met'] else '**no**'} |",
            f"| cached start within {s['most']:.0f} s of the chapter's (every size) | "
            f"{cells(s['measured'], 2)} s | {'yes' if s['met'] else '**no**'} |",
            f"| peak RSS per rank < {m['below']:.0f} MB at {m['judged_at']} "
            f"({', '.join(m['measured'])}) | {cells(m['measured'], 0)} MB | "
            f"{'yes' if m['met'] else '**no**'} |",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["sizes"])
    sizes = [result["sizes"][s] for s in labels]
    fig, (prep, start, rss) = plt.subplots(1, 3, figsize=(13, 3.8))
    prep.bar(labels, [r["preparation"].get("mb_per_s") or 0 for r in sizes], color="tab:blue")
    prep.axhline(TARGET_PREP_MB_PER_S, color="tab:red", ls="--", label="target")
    prep.set(title="first preparation", ylabel="MB/s")
    prep.legend()
    for offset, (name, key) in enumerate((("corpus", "size_s"), ("chapter", "chapter_s"))):
        values = [(r["start"][key] or {}).get("median", 0) for r in sizes]
        start.bar([i + 0.4 * offset for i in range(len(labels))], values, width=0.4, label=name)
    start.set_xticks([i + 0.2 for i in range(len(labels))], labels)
    start.set(title="cached start (median)", ylabel="s, command to first step")
    start.legend()
    samplings = list(result["setup"]["samplings"])
    width = 0.8 / max(len(samplings), 1)
    for offset, sampling in enumerate(samplings):
        jobs = [r["memory"].get(sampling) or {} for r in sizes]
        worst = [max(j["ranks"], key=lambda r: r["vm_hwm_mb"]) if j.get("ranks") else {}
                 for j in jobs]  # fmt: skip
        xs = [i + width * offset for i in range(len(labels))]
        rss.bar(xs, [w.get("vm_hwm_mb") or 0 for w in worst], width=width,
                label=f"{sampling} (VmHWM)", color=f"C{offset}", alpha=0.45)  # fmt: skip
        rss.bar(xs, [w.get("rss_anon_mb_max") or 0 for w in worst], width=width,
                label=f"{sampling}, anonymous", color=f"C{offset}")  # fmt: skip
    rss.set_xticks([i + width * (len(samplings) - 1) / 2 for i in range(len(labels))], labels)
    rss.axhline(TARGET_RSS_MB, color="tab:red", ls="--", label="target")
    tallest = max((bar.get_height() for bar in rss.patches), default=0.0)
    rss.set_ylim(0, max(TARGET_RSS_MB * 1.6, tallest * 1.4))  # room for the legend
    rss.set(title="peak RSS per rank, 2 ranks", ylabel="MB")
    rss.legend(fontsize="x-small", loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- the run ---


def measure_corpus(corpus: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Preparation into a fresh cache, sha1 timing and the memory jobs of one corpus (its
    cached starts are measured by the caller, next to the chapter's)."""
    cache = work / "cache"
    result: dict[str, Any] = {"bytes": corpus.stat().st_size}
    result["preparation"] = measure_preparation(corpus, cache, work / "prepare.log", args.timeout)
    result["sha1"] = time_sha1(corpus)
    prep = result["preparation"]
    print(f"  prepared in {_fmt(prep.get('seconds'), 2)} s ({_fmt(prep.get('mb_per_s'), 0)} "
          f"MB/s), command {prep['command_s']:.1f} s"
          + ("" if prep["ok"] else f" FAILED: {prep.get('error')}"), flush=True)  # fmt: skip
    result["memory"] = {}
    for sampling in args.samplings:
        job = measure_memory(corpus, cache, work, sampling, args.rss_steps, args.poll_ms / 1000,
                             args.timeout)  # fmt: skip
        result["memory"][sampling] = job
        peak = _fmt(job["peak_vm_hwm_mb_per_rank"], 0)
        failed = "" if job["ok"] else f" FAILED: {job.get('error')}"
        print(f"  2 ranks, {sampling}: peak RSS per rank {peak} MB{failed}", flush=True)
    return result


def paired_starts(size: tuple[Path, Path], chapter: tuple[Path, Path], work: Path,
                  repeats: int, timeout: float) -> dict[str, Any]:  # fmt: skip
    """``repeats`` interleaved cached starts of (corpus, cache) ``size`` and ``chapter``, after
    one unmeasured start of each."""
    sides = {"size": size, "chapter": chapter}
    for side in sides.values():
        measure_start(*side, work, timeout)
    runs: dict[str, list[dict[str, Any]]] = {"size": [], "chapter": []}
    for rep in range(repeats):
        for name in ("size", "chapter") if rep % 2 == 0 else ("chapter", "size"):
            runs[name].append(measure_start(*sides[name], work, timeout))
    return start_report(runs["size"], runs["chapter"])


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "data", "machine": machine(),
        "load_average_at_start": list(os.getloadavg()),
        "setup": {"sizes": [size_label(s) for s in args.sizes], "repeats": args.repeats,
                  "samplings": args.samplings, "rss_steps": args.rss_steps,
                  "poll_ms": args.poll_ms, "seed": args.seed, "corpus": str(args.corpus),
                  "job_flags": COMMON, "start_steps": 2, "units": "MB = 10**6 bytes",
                  "threads_per_process": 1},
    }  # fmt: skip
    chapter_work = work / "chapter"
    chapter_work.mkdir()
    print(f"chapter corpus {args.corpus}", flush=True)
    result["chapter"] = measure_corpus(args.corpus, chapter_work, args)
    chapter = (args.corpus, chapter_work / "cache")
    result["sizes"] = {}
    for size in args.sizes:
        label = size_label(size)
        size_work = work / label
        size_work.mkdir()
        corpus = size_work / f"synthetic-{label}.txt"
        print(f"{label}: writing {corpus}", flush=True)
        recipe = synthetic_corpus(args.corpus, corpus, size, args.seed)
        try:
            measured = measure_corpus(corpus, size_work, args)
            measured["corpus"] = recipe
            measured["start"] = paired_starts((corpus, size_work / "cache"), chapter, work,
                                              args.repeats, args.timeout)  # fmt: skip
            diff = measured["start"]["difference_s_paired"]
            print(f"  cached start - chapter's: {_fmt(diff and diff['median'], 2)} s", flush=True)
        finally:
            shutil.rmtree(size_work, ignore_errors=True)
        result["sizes"][label] = measured
    result["targets"] = targets(result["sizes"])
    result["load_average_at_end"] = list(os.getloadavg())
    result["seconds"] = time.time() - started
    return result


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes")
    return sizes


def _samplings(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    if not chosen or set(chosen) - {"sequential", "random"}:
        raise argparse.ArgumentTypeError("sequential and/or random, comma-separated")
    return list(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=_sizes(DEFAULT_SIZES),
        help=f"synthetic corpus sizes, KB/MB/GB decimal (default {DEFAULT_SIZES})",
    )
    parser.add_argument("--work", type=Path,
                        help="scratch directory (default: a temporary one); needs ~3x the largest "
                        "size free")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data.json",
                        help="the report (default benchmarks/results/data.json)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="cached starts per side and size")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="the chapter's text: the words of the synthetic corpora, and the "
                        "start to compare with")  # fmt: skip
    parser.add_argument(
        "--samplings",
        type=_samplings,
        default=["sequential", "random"],
        help="--sampling of the memory jobs (default sequential,random)",
    )
    parser.add_argument("--rss-steps", type=int, default=20, help="steps of each memory job")
    parser.add_argument("--poll-ms", type=float, default=20, help="memory sampling period")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic corpora's seed")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="REPORT",
        help="print the docs' tables of this report, and run nothing",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="draw the figures (of --markdown's report, else of this run)",
    )
    args = parser.parse_args(argv)
    if args.markdown:
        result = json.loads(args.markdown.read_text())
        print(markdown(result), end="")
        if args.plot:
            plot(result, args.plot)
        return
    if not args.corpus.is_file():
        parser.error(f"corpus not found: {args.corpus} (pass --corpus PATH)")
    args.corpus = args.corpus.resolve()
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rnnlm-bench-data-", dir=args.work) as tmp:
        result = run(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result), end="")
    if args.plot:
        plot(result, args.plot)
    print(f"written {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
