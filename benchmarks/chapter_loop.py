"""The chapter's own training code, written out from the classic d2l library (0.17.x) that the
chapter calls: ``RNNModel``, ``seq_data_iter_sequential``, ``grad_clipping``,
``train_epoch_ch8``, ``train_ch8`` and ``predict_ch8``.

It is the yardstick, not part of the job: the benchmarks time it as the baseline and
``tests/test_numerics.py`` checks that the job computes the same losses. It keeps
the chapter's habits on purpose -- one-hot inputs, ``float()`` of every loss and a Python-side
comparison of the gradient norm at every step, prediction with autograd on -- because those are
what the chapter's loop costs. Only two things differ: the offsets come from a seeded
``random.Random`` passed in (d2l uses the global ``random`` module), and nothing is plotted.

Run it as the benchmarks do::

    python benchmarks/chapter_loop.py --corpus timemachine.txt --epochs 500 --out r.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnlm.vocab import Vocab


def chapter_tokens(path: Path) -> list[str]:
    """The chapter's ``read_time_machine`` and character ``tokenize``: per line, runs of
    non-letters become one space, strip, lowercase; the lines' characters, one list."""
    with open(path) as f:
        lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in f.readlines()]
    return [ch for line in lines for ch in line]


class RNNModel(nn.Module):
    """The chapter's model: one-hot inputs -> ``rnn_layer`` -> linear head."""

    def __init__(self, rnn_layer: nn.RNN, vocab_size: int) -> None:
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = rnn_layer.hidden_size
        self.linear = nn.Linear(self.num_hiddens, self.vocab_size)

    def forward(self, inputs: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        x = F.one_hot(inputs.T.long(), self.vocab_size)
        x = x.to(torch.float32)
        y, state = self.rnn(x, state)
        output = self.linear(y.reshape((-1, y.shape[-1])))
        return output, state

    def begin_state(self, device: torch.device | str, batch_size: int = 1) -> Tensor:
        return torch.zeros((self.rnn.num_layers, batch_size, self.num_hiddens), device=device)


def seq_data_iter_sequential(
    corpus: Sequence[int], batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[tuple[Tensor, Tensor]]:
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = torch.tensor(corpus[offset : offset + num_tokens])
    ys = torch.tensor(corpus[offset + 1 : offset + 1 + num_tokens])
    xs, ys = xs.reshape(batch_size, -1), ys.reshape(batch_size, -1)
    num_batches = xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield xs[:, i : i + num_steps], ys[:, i : i + num_steps]


def grad_clipping(net: nn.Module, theta: float) -> None:
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(
        sum((torch.sum(p.grad**2) for p in params if p.grad is not None), torch.zeros(()))
    )
    if norm > theta:  # a host-side decision at every step, as in d2l
        for param in params:
            if param.grad is not None:
                param.grad[:] *= theta / norm


class Accumulator:
    """d2l's running sums: every value is turned into a Python float as it is added."""

    def __init__(self, n: int) -> None:
        self.data = [0.0] * n

    def add(self, *args: float | Tensor) -> None:
        self.data = [a + _float(b) for a, b in zip(self.data, args, strict=True)]


def _float(value: float | Tensor) -> float:
    # d2l calls float() on the loss tensor itself; detaching first gives the same number
    # without torch's warning about converting a tensor that requires grad.
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def train_epoch_ch8(
    net: RNNModel,
    train_iter: Iterator[tuple[Tensor, Tensor]],
    loss: nn.Module,
    updater: torch.optim.Optimizer,
    device: torch.device,
    step_losses: list[float] | None = None,
) -> tuple[float, float, float]:
    """One epoch; returns (perplexity, tokens/s) as d2l does, and the number of tokens.
    ``step_losses`` collects each step's loss."""
    state: Tensor | None = None
    start = time.perf_counter()
    metric = Accumulator(2)  # sum of training loss, number of tokens
    for x, y_rows in train_iter:
        if state is None:
            state = net.begin_state(batch_size=x.shape[0], device=device)
        else:
            state.detach_()
        y = y_rows.T.reshape(-1)
        x, y = x.to(device), y.to(device)
        y_hat, state = net(x, state)
        loss_value = loss(y_hat, y.long()).mean()
        updater.zero_grad()
        loss_value.backward()
        grad_clipping(net, 1)
        updater.step()
        metric.add(loss_value * y.numel(), y.numel())
        if step_losses is not None:
            step_losses.append(float(loss_value.detach()))
    seconds = time.perf_counter() - start
    return math.exp(metric.data[0] / metric.data[1]), metric.data[1] / seconds, metric.data[1]


def predict_ch8(
    prefix: str, num_preds: int, net: RNNModel, vocab: Vocab, device: torch.device
) -> str:
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab.encode(prefix[0])[0]]

    def get_input() -> Tensor:
        return torch.tensor([outputs[-1]], device=device).reshape((1, 1))

    for ch in prefix[1:]:
        _, state = net(get_input(), state)
        outputs.append(vocab.encode(ch)[0])
    for _ in range(num_preds):
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return vocab.decode(outputs)


def build(vocab_size: int, num_hiddens: int = 256, seed: int = 0) -> RNNModel:
    """The chapter's ``nn.RNN(len(vocab), num_hiddens)`` + ``RNNModel``, seeded."""
    torch.manual_seed(seed)
    return RNNModel(nn.RNN(vocab_size, num_hiddens), vocab_size)


def train_ch8(
    net: RNNModel,
    corpus: Sequence[int],
    vocab: Vocab,
    lr: float,
    num_epochs: int,
    device: torch.device,
    rng: random.Random,
    batch_size: int = 32,
    num_steps: int = 35,
    on_start: Callable[[], None] | None = None,
) -> list[tuple[float, float, float]]:
    """``train_ch8`` with sequential partitioning; returns (perplexity, tokens/s, tokens) per
    epoch. ``on_start`` is called right before the first training step."""
    loss = nn.CrossEntropyLoss()
    updater = torch.optim.SGD(net.parameters(), lr)
    history = []
    if on_start is not None:
        on_start()
    for epoch in range(num_epochs):
        batches = seq_data_iter_sequential(corpus, batch_size, num_steps, rng)
        ppl, speed, tokens = train_epoch_ch8(net, batches, loss, updater, device)
        history.append((ppl, speed, tokens))
        if (epoch + 1) % 10 == 0:
            predict_ch8("time traveller", 50, net, vocab, device)
    return history


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="local path of timemachine.txt")
    parser.add_argument("--epochs", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file for the per-epoch figures")
    args = parser.parse_args(argv)
    tokens = chapter_tokens(Path(args.corpus))
    vocab = Vocab.build(tokens)
    corpus = vocab.encode(tokens)[: args.max_tokens]
    device = torch.device("cpu")
    net = build(len(vocab), seed=args.seed)
    started: list[float] = []
    history = train_ch8(
        net,
        corpus,
        vocab,
        1.0,
        args.epochs,
        device,
        random.Random(args.seed),
        on_start=lambda: started.append(time.time()),
    )
    ppl, speed, _ = history[-1]
    print(f"perplexity {ppl:.1f}, {speed:.1f} tokens/sec on {device}")
    Path(args.out).write_text(
        json.dumps(
            {
                "first_step_time": started[0],
                "perplexity_by_epoch": [p for p, _, _ in history],
                "seconds_by_epoch": [n / s for _, s, n in history],
                "tokens_by_epoch": [n for _, _, n in history],
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
