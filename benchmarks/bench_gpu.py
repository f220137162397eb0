"""GPU benchmark: the chapter's configuration on one CUDA device, next to the chapter's
published ``279664 tokens/sec on cuda:0``.

    PYTHONPATH=. python benchmarks/bench_gpu.py --out results/gpu.json   # ~1-3 minutes
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick --out /tmp/gpu.json

Needs only torch and this repository (no mlflow, click, requests or safetensors), so it runs in
a bare environment with a CUDA build of torch. Every configuration runs in its own ``try``: a
failure is recorded in the JSON (with its traceback) and the others still run.

Configurations, each timed over several repetitions (median, min, max of tokens/s):

- ``chapter``: the chapter's loop (:mod:`benchmarks.chapter_loop`: one-hot, ``nn.RNN`` on cuDNN,
  ``float()`` of the loss and a host-side clipping test at every step);
- ``ours_fp32``: the job's step (cuDNN ``nn.RNN``, state on the device, no host sync per step);
- ``ours_fp32_graphs``: the same step captured once as a CUDA graph (``--cuda-graphs``);
- ``ours_bf16`` / ``ours_bf16_graphs``: bf16 autocast (``--autocast bf16``), not exact fp32.

It also checks numerics (first 50 step losses of each configuration against the chapter's loop
on the same device, same seed) and, unless ``--quick``, times the chapter's whole result
(500 epochs) per configuration and reports the final perplexity.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import chapter_loop  # noqa: E402
from rnnlm.batching import epoch_batches  # noqa: E402
from rnnlm.config import ModelConfig  # noqa: E402
from rnnlm.distributed import DistInfo  # noqa: E402
from rnnlm.loop import Epoch, in_order, train_epoch  # noqa: E402
from rnnlm.model import RNNLM  # noqa: E402
from rnnlm.records import State  # noqa: E402
from rnnlm.steps import EagerStep, GraphedStep, Step  # noqa: E402
from rnnlm.vocab import Vocab  # noqa: E402

BOOK_TOKENS_PER_S = 279664.0  # the chapter's "perplexity 1.3, 279664.0 tokens/sec on cuda:0"
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "timemachine.txt"
BATCH, STEPS, MAX_TOKENS, LR, CLIP, SEED = 32, 35, 10_000, 1.0, 1.0, 0
CONFIGS = ("chapter", "ours_fp32", "ours_fp32_graphs", "ours_bf16", "ours_bf16_graphs")


def d2l_tokens(text: str) -> list[str]:
    """The chapter's preprocessing (as ``rnnlm.corpus.tokenize(text, "d2l")``, which this
    script does not import so that it needs no ``requests``): per line, runs of non-letters
    become one space, strip, lowercase; lines joined with no separator; characters."""
    lines = text.splitlines()
    return list("".join(re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines))


def load_corpus(path: Path) -> tuple[Vocab, list[int], str]:
    """The chapter's corpus when present; otherwise a seeded synthetic text of the same size
    and alphabet (throughput does not depend on the text; perplexities then mean nothing)."""
    if path.is_file():
        tokens = d2l_tokens(path.read_text())
        source = str(path)
    else:
        rng = random.Random(SEED)
        tokens = rng.choices(list(" etaoinshrdlcumwfgypbvkjxqz"), k=170_580)
        source = "synthetic (corpus file not found)"
    vocab = Vocab.build(tokens)
    return vocab, vocab.encode(tokens)[:MAX_TOKENS], source


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


class RecordingStep:
    """A step that keeps each minibatch's loss (on the device: no host sync per step). A copy,
    for a captured step returns the same output buffer at every replay."""

    def __init__(self, step: Step) -> None:
        self.step, self.module, self.optimizer = step, step.module, step.optimizer
        self.losses: list[torch.Tensor] = []

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        loss, norm, state = self.step(x, y, state)
        self.losses.append(loss.clone())
        return loss, norm, state


class Trainer:
    """One configuration: a fresh seeded model and optimizer, trained epoch by epoch."""

    def __init__(self, name: str, vocab_size: int, ids: list[int], device: torch.device):
        self.name, self.device = name, device
        self.corpus = torch.tensor(ids, device=device)
        self.ids = ids
        self.rng = random.Random(SEED)
        self.epoch = 0
        if name == "chapter":
            self.net = chapter_loop.build(vocab_size, seed=SEED).to(device)
            self.updater = torch.optim.SGD(self.net.parameters(), LR)
            return
        torch.manual_seed(SEED)
        self.module = RNNLM(ModelConfig(vocab_size)).to(device)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=LR)
        autocast = torch.bfloat16 if "bf16" in name else None
        eager = EagerStep(self.module, self.optimizer, CLIP, autocast)
        self.step: Step = eager
        if name.endswith("graphs"):
            self.step = GraphedStep(eager, BATCH, STEPS)

    def run_epoch(self, step_losses: list[float] | None = None) -> tuple[float, int]:
        """One epoch; returns (perplexity, tokens)."""
        self.epoch += 1
        if self.name == "chapter":
            batches = chapter_loop.seq_data_iter_sequential(self.ids, BATCH, STEPS, self.rng)
            ppl, _, tokens = chapter_loop.train_epoch_ch8(
                self.net, batches, nn.CrossEntropyLoss(), self.updater, self.device, step_losses
            )
            return ppl, int(tokens)
        batches = epoch_batches(self.corpus, BATCH, STEPS, "sequential", self.rng)
        step = self.step if step_losses is None else RecordingStep(self.step)
        epoch = Epoch(self.epoch, in_order(batches))
        stats = train_epoch(step, epoch, DistInfo(device=self.device))
        if isinstance(step, RecordingStep) and step_losses is not None:
            step_losses.extend(float(v) for v in step.losses)
        return stats.perplexity, stats.num_tokens

    def timed(self, epochs: int) -> tuple[float, float]:
        """(tokens/s, final perplexity) over ``epochs`` epochs, device work included."""
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        tokens, ppl = 0, float("nan")
        for _ in range(epochs):
            ppl, n = self.run_epoch()
            tokens += n
        torch.cuda.synchronize(self.device)
        return tokens / (time.perf_counter() - start), ppl


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values)}


def guarded(record: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on failure record the error under ``record[key]`` and return None."""
    try:
        return fn()
    except Exception as exc:  # a failing configuration must not end the benchmark
        record[key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"  {key}: FAILED {type(exc).__name__}: {exc}", flush=True)
        return None


def first_losses(name: str, vocab_size: int, ids: list[int], device: torch.device) -> list[float]:
    trainer = Trainer(name, vocab_size, ids, device)
    losses: list[float] = []
    while len(losses) < 50:
        trainer.run_epoch(losses)
    return losses[:50]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--device", default="cuda", help="a CUDA device (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repetitions")
    parser.add_argument("--reps", type=int, help="repetitions per configuration")
    parser.add_argument("--epochs", type=int, help="timed epochs per repetition")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {CONFIGS}"
    )
    args = parser.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {CONFIGS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.time()
    result: dict[str, Any] = {"benchmark": "gpu", "mode": "quick" if args.quick else "full"}
    result["book_tokens_per_s"] = BOOK_TOKENS_PER_S
    if device.type != "cuda" or not torch.cuda.is_available():
        available = torch.cuda.is_available()
        result["error"] = f"no CUDA device for --device {args.device} (CUDA available: {available})"
        result["machine"] = machine(torch.device("cpu"))
        _write(args.out, result)
        print(result["error"])
        return 1
    torch.backends.cudnn.benchmark = False  # the chapter's default; keeps runs comparable
    result["machine"] = machine(device)
    vocab, ids, source = load_corpus(args.corpus)
    result["corpus"] = source
    names = [n for n in CONFIGS if n in args.configs.split(",")]
    reps = args.reps or (2 if args.quick else 5)
    epochs = args.epochs or (10 if args.quick else 50)
    result["setup"] = {
        "cell": "rnn",
        "num_hiddens": 256,
        "batch": BATCH,
        "num_steps": STEPS,
        "max_tokens": MAX_TOKENS,
        "epochs_per_rep": epochs,
        "repetitions": reps,
    }
    print(f"{result['machine'].get('gpu')}, torch {torch.__version__}, corpus: {source}")

    print("numerics: first 50 step losses vs the chapter's loop on this device")
    numerics: dict[str, Any] = {}
    base = guarded(numerics, "chapter", lambda: first_losses("chapter", len(vocab), ids, device))
    for name in names:
        if name == "chapter" or base is None:
            continue
        losses = guarded(numerics, name, lambda n=name: first_losses(n, len(vocab), ids, device))
        if losses is not None:
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, base, strict=True))
            numerics[name] = {"max_rel_diff": rel, "within_1e-4": rel <= 1e-4}
            print(f"  {name:<18} max relative difference {rel:.2e}", flush=True)
    result["numerics_first_50_losses"] = numerics

    print(f"throughput: {epochs} epochs x {reps} repetitions, interleaved")
    trainers: dict[str, Trainer] = {}
    training: dict[str, Any] = {}
    for name in names:
        trainer = guarded(training, name, lambda n=name: Trainer(n, len(vocab), ids, device))
        if trainer is not None and guarded(training, name, lambda t=trainer: t.timed(2)):
            trainers[name] = trainer  # built, captured and warmed up
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    for rep in range(reps):
        for name, trainer in list(trainers.items()):
            timed = guarded(training, name, lambda t=trainer: t.timed(epochs))
            if timed is None:
                del trainers[name]
                continue
            rates[name].append(timed[0])
            print(f"  rep {rep + 1}/{reps} {name:<18} {timed[0]:>12,.0f} tokens/s", flush=True)
    for name, values in rates.items():
        if name in training:  # failed part-way: keep the error, add what was measured
            training[name]["tokens_per_s"] = summary(values)
            continue
        stats = summary(values)
        training[name] = {"tokens_per_s": stats}
        if stats:
            training[name]["x_book"] = stats["median"] / BOOK_TOKENS_PER_S
    chapter = (training.get("chapter") or {}).get("tokens_per_s")
    for entry in training.values():
        if entry.get("tokens_per_s") and chapter:
            entry["x_chapter_loop"] = entry["tokens_per_s"]["median"] / chapter["median"]
    result["training"] = training

    if not args.quick:
        print("time to the chapter's result: 500 epochs from a fresh model")
        to_result: dict[str, Any] = {}
        for name in names:

            def full_run(n: str = name) -> dict[str, Any]:
                start = time.perf_counter()
                trainer = Trainer(n, len(vocab), ids, device)
                _, ppl = trainer.timed(500)
                return {"seconds": time.perf_counter() - start, "final_perplexity": ppl}

            entry = guarded(to_result, name, full_run)
            if entry is not None:
                to_result[name] = entry
                shown = f"{entry['seconds']:.1f} s, perplexity {entry['final_perplexity']:.2f}"
                print(f"  {name:<18} {shown}", flush=True)
        result["time_to_result"] = to_result

    result["seconds"] = time.time() - started
    _write(args.out, result)
    print("\nconfiguration        tokens/s median      x book (279664)   x chapter loop")
    for name, entry in training.items():
        stats = entry.get("tokens_per_s")
        if stats:
            print(
                f"{name:<20} {stats['median']:>15,.0f} {entry.get('x_book', float('nan')):>15.1f}"
                f" {entry.get('x_chapter_loop', float('nan')):>15.2f}"
            )
        else:
            print(f"{name:<20} FAILED: {entry.get('error')}")
    print(f"written {args.out} in {result['seconds']:.0f} s")
    return 0


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
