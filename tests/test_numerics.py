"""The job computes what the chapter computes: on the core (``nn.RNN``, autograd,
``clip_grad_norm_``, ``torch.optim.SGD``) and on the CPU kernel extension.

The baseline is ``benchmarks/chapter_loop.py`` (the chapter's loop: one-hot inputs, ``nn.RNN``,
``train_epoch_ch8``, d2l's ``grad_clipping``), the same code the benchmarks time.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import chapter_loop
from rnnlm.batching import epoch_batches
from rnnlm.config import ModelConfig
from rnnlm.generate import generate
from rnnlm.model import RNNLM
from rnnlm.records import detach_state
from rnnlm.steps import TrainSpec
from rnnlm.vocab import Vocab

NUM_STEPS_COMPARED = 50  # 8 minibatches per epoch: 7 epochs, state carried and reset
PATHS = ["core", pytest.param("cpu_kernel", marks=pytest.mark.integration)]


@pytest.fixture
def spec(request: pytest.FixtureRequest) -> TrainSpec:
    """The core's parts, or the extension's (built once per session by ``kernel_spec``)."""
    if request.param == "core":
        return TrainSpec()
    return request.getfixturevalue("kernel_spec")


def _chapter_data(corpus_path: Path) -> tuple[Vocab, list[int]]:
    tokens = chapter_loop.chapter_tokens(corpus_path)
    vocab = Vocab.build(tokens)
    return vocab, vocab.encode(tokens)[:10_000]


def _baseline_losses(vocab: Vocab, ids: list[int], seed: int) -> list[float]:
    net = chapter_loop.build(len(vocab), seed=seed)
    updater = torch.optim.SGD(net.parameters(), lr=1.0)
    rng, losses = random.Random(seed), []
    while len(losses) < NUM_STEPS_COMPARED:
        batches = chapter_loop.seq_data_iter_sequential(ids, 32, 35, rng)
        chapter_loop.train_epoch_ch8(
            net, batches, nn.CrossEntropyLoss(), updater, torch.device("cpu"), losses
        )
    return losses[:NUM_STEPS_COMPARED]


def _job_losses(vocab: Vocab, ids: list[int], seed: int, spec: TrainSpec) -> list[float]:
    """The job's step (``spec``'s model and step, as the Trainer builds them) over the job's
    minibatches, the state reset at every epoch and carried, detached, in between."""
    torch.manual_seed(seed)
    module = spec.model_class(ModelConfig(len(vocab)))
    step = spec.step_class(module, torch.optim.SGD(module.parameters(), lr=1.0), 1.0)
    rng, corpus, losses = random.Random(seed), torch.tensor(ids), []
    while len(losses) < NUM_STEPS_COMPARED:
        state = None
        for x, y in epoch_batches(corpus, 32, 35, "sequential", rng):
            state = module.begin_state(32) if state is None else detach_state(state)
            loss, _, state = step(x, y, state)
            losses.append(float(loss))
    return losses[:NUM_STEPS_COMPARED]


@pytest.mark.parametrize("spec", PATHS, indirect=True)
def test_first_50_losses_equal_the_chapters_one_hot_loop(
    corpus_path: Path, spec: TrainSpec
) -> None:
    vocab, ids = _chapter_data(corpus_path)
    baseline = _baseline_losses(vocab, ids, seed=0)
    ours = _job_losses(vocab, ids, seed=0, spec=spec)
    assert baseline[0] == pytest.approx(3.33, abs=0.05)  # ln(28): an untrained model
    assert baseline[-1] < baseline[0] - 0.3  # it did learn: the comparison is not vacuous
    assert ours == pytest.approx(baseline, rel=1e-4)


def test_greedy_generation_equals_predict_ch8(corpus_path: Path) -> None:
    """The chapter's model after 56 training steps, its weights loaded into the job's model:
    greedy text from both default prefixes is the chapter's ``predict_ch8`` text, character for
    character. (Generation is the core's on every path: the extension changes training only.)"""
    vocab, ids = _chapter_data(corpus_path)
    net = chapter_loop.build(len(vocab), seed=0)
    updater = torch.optim.SGD(net.parameters(), lr=1.0)
    rng = random.Random(0)
    for _ in range(7):  # 8 minibatches an epoch: 56 steps
        batches = chapter_loop.seq_data_iter_sequential(ids, 32, 35, rng)
        chapter_loop.train_epoch_ch8(
            net, batches, nn.CrossEntropyLoss(), updater, torch.device("cpu")
        )
    module = RNNLM(ModelConfig(len(vocab)))
    module.load_state_dict(net.state_dict())
    prefixes = ["time traveller", "traveller"]
    ours = generate(module, vocab, prefixes, 100)
    chapter = [chapter_loop.predict_ch8(p, 100, net, vocab, torch.device("cpu")) for p in prefixes]
    assert ours == chapter
    assert len(set(ours[0][len(prefixes[0]) :])) >= 3  # words, not one repeated character


def test_state_dict_layout_is_nn_rnns() -> None:
    model = RNNLM(ModelConfig(28, num_hiddens=16))
    assert list(model.state_dict()) == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.bias_ih_l0",
        "rnn.bias_hh_l0",
        "linear.weight",
        "linear.bias",
    ]
