"""The job's fast CPU path computes what the chapter computes.

The baseline is :mod:`rnnlm.reference` (the chapter's loop: one-hot inputs, ``nn.RNN``,
``train_epoch_ch8``, d2l's ``grad_clipping``), the same code the benchmarks time.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rnnlm import native, reference
from rnnlm.batching import epoch_batches
from rnnlm.config import ModelConfig
from rnnlm.corpus import load_tokens
from rnnlm.distributed import DistInfo
from rnnlm.generate import OneLayerTanhSteps, generate
from rnnlm.loop import SGD, train_epoch
from rnnlm.model import RNNLM
from rnnlm.vocab import Vocab

NUM_STEPS_COMPARED = 50  # 8 minibatches per epoch: 7 epochs, state carried and reset
KERNEL_MISSING = native.why_unavailable()
compiled_kernel = pytest.mark.skipif(
    KERNEL_MISSING is not None, reason=f"compiled kernel: {KERNEL_MISSING}"
)
KERNELS = ["torch", pytest.param("compiled", marks=compiled_kernel)]


def _kernel(name: str, tmp_path: Path) -> native.TanhRecurrenceKernel | None:
    return native.load(tmp_path) if name == "compiled" else None


def _chapter_data(corpus_path: Path) -> tuple[Vocab, list[int]]:
    tokens = load_tokens(corpus_path, "d2l")
    vocab = Vocab.build(tokens)
    return vocab, vocab.encode(tokens)[:10_000]


def _baseline_losses(vocab: Vocab, ids: list[int], seed: int) -> list[float]:
    net = reference.build(len(vocab), seed=seed)
    updater = torch.optim.SGD(net.parameters(), lr=1.0)
    rng, losses = random.Random(seed), []
    while len(losses) < NUM_STEPS_COMPARED:
        batches = reference.seq_data_iter_sequential(ids, 32, 35, rng)
        reference.train_epoch_ch8(
            net, batches, nn.CrossEntropyLoss(), updater, torch.device("cpu"), losses
        )
    return losses[:NUM_STEPS_COMPARED]


def _job_losses(
    vocab: Vocab, ids: list[int], seed: int, kernel: native.TanhRecurrenceKernel | None
) -> list[float]:
    torch.manual_seed(seed)  # as pipeline.build_model does
    module = RNNLM(ModelConfig(len(vocab)))
    assert module.fast_cpu
    module.kernel = kernel
    optimizer = SGD(module.parameters(), lr=1.0)  # the job's optimiser
    rng, corpus = random.Random(seed), torch.tensor(ids)
    losses: list[torch.Tensor] = []
    epoch = 0
    while len(losses) < NUM_STEPS_COMPARED:
        epoch += 1
        batches = epoch_batches(corpus, 32, 35, "sequential", rng)
        train_epoch(module, module, batches, optimizer, 1.0, False, DistInfo(), epoch, None, losses)
    return [float(loss) for loss in losses[:NUM_STEPS_COMPARED]]


@pytest.mark.parametrize("kernel", KERNELS)
def test_first_50_losses_equal_the_chapters_one_hot_loop(
    corpus_path: Path, tmp_path: Path, kernel: str
) -> None:
    vocab, ids = _chapter_data(corpus_path)
    baseline = _baseline_losses(vocab, ids, seed=0)
    ours = _job_losses(vocab, ids, seed=0, kernel=_kernel(kernel, tmp_path))
    assert baseline[0] == pytest.approx(3.33, abs=0.05)  # ln(28): an untrained model
    assert baseline[-1] < baseline[0] - 0.3  # it did learn: the comparison is not vacuous
    assert ours == pytest.approx(baseline, rel=1e-4)


def _outputs_and_grads(model: RNNLM, hidden: int, layers: int) -> list[tuple]:
    """Logits, new state, parameter gradients and the incoming state's gradient, once on
    ``nn.RNN`` and once on the model's fast path (whichever recurrence it is set to)."""
    vocab_size, batch, steps = model.config.vocab_size, 6, 9
    x = torch.randint(0, vocab_size, (batch, steps))
    y = torch.randint(0, vocab_size, (batch, steps))
    h0 = torch.randn(layers, batch, hidden) * 0.5
    results = []
    for fast in (False, True):
        model.fast_cpu = fast
        model.zero_grad(set_to_none=True)
        state = h0.clone().requires_grad_(True)
        logits, new_state = model(x, state)
        assert isinstance(new_state, torch.Tensor)
        # A loss on the new state too, so its gradient path is exercised.
        loss = F.cross_entropy(logits, y.T.reshape(-1)) + new_state.square().mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), new_state.detach(), grads, state.grad))
    return results


@pytest.mark.parametrize("layers", [1, 2])
def test_hand_written_backward_matches_nn_rnn(layers: int) -> None:
    """Outputs, new state and every gradient (weights, biases and the incoming state) of the
    fast path equal those of ``nn.RNN`` on one-hot inputs."""
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(28, num_hiddens=32, num_layers=layers))
    (l0, s0, g0, h0_grad0), (l1, s1, g1, h0_grad1) = _outputs_and_grads(model, 32, layers)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)  # the forward pass is the same ops
    torch.testing.assert_close(s1, s0, rtol=0, atol=0)
    assert g1.keys() == g0.keys() == {name for name, _ in model.named_parameters()}
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(h0_grad1, h0_grad0, rtol=1e-5, atol=1e-7)


@compiled_kernel
@pytest.mark.parametrize(("layers", "hidden"), [(1, 32), (2, 32), (1, 13)])
def test_compiled_kernel_matches_nn_rnn(tmp_path: Path, layers: int, hidden: int) -> None:
    """The compiled recurrence against ``nn.RNN``: its own tanh (within 2 ulp) makes it equal
    to round-off, not bit for bit. 13 hidden units exercise the kernel's partial vectors and
    panels."""
    torch.manual_seed(1)
    model = RNNLM(ModelConfig(28, num_hiddens=hidden, num_layers=layers))
    model.kernel = native.load(tmp_path)
    (l0, s0, g0, h0_grad0), (l1, s1, g1, h0_grad1) = _outputs_and_grads(model, hidden, layers)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() == {name for name, _ in model.named_parameters()}
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(h0_grad1, h0_grad0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_greedy_generation_equals_predict_ch8(
    corpus_path: Path, tmp_path: Path, kernel: str
) -> None:
    """The chapter's model after 56 training steps, its weights loaded into the job's model:
    greedy text from both default prefixes is the chapter's ``predict_ch8`` text, character for
    character. Generation feeds one character per call, which takes the framework's operations
    even with the compiled kernel loaded (the ``compiled`` case checks that it stays so)."""
    vocab, ids = _chapter_data(corpus_path)
    net = reference.build(len(vocab), seed=0)
    updater = torch.optim.SGD(net.parameters(), lr=1.0)
    rng = random.Random(0)
    for _ in range(7):  # 8 minibatches an epoch: 56 steps
        batches = reference.seq_data_iter_sequential(ids, 32, 35, rng)
        reference.train_epoch_ch8(net, batches, nn.CrossEntropyLoss(), updater, torch.device("cpu"))
    module = RNNLM(ModelConfig(len(vocab)))
    module.load_state_dict(net.state_dict())
    module.kernel = _kernel(kernel, tmp_path)
    prefixes = ["time traveller", "traveller"]
    ours = generate(module, vocab, prefixes, 100)
    chapter = [reference.predict_ch8(p, 100, net, vocab, torch.device("cpu")) for p in prefixes]
    assert ours == chapter
    assert len(set(ours[0][len(prefixes[0]) :])) >= 3  # words, not one repeated character


@pytest.mark.parametrize("batch", [1, 64])
def test_generation_steps_compute_the_modules_bits(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation's own step for the chapter's model gives the logits and state of the module's
    one-step forward, bit for bit, character after character (weights scaled up so that the
    state leaves tanh's linear range); so greedy and seeded sampled text are the texts of
    stepping the module."""
    torch.manual_seed(4)
    module = RNNLM(ModelConfig(28))
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(3)
    assert OneLayerTanhSteps.applies(module, torch.device("cpu"))  # generate() takes it
    step = OneLayerTanhSteps(module)
    ours = theirs = torch.randn(1, batch, 256) * 0.5
    x = torch.randint(0, 28, (batch, 1))
    with torch.no_grad():
        for _ in range(40):
            logits, ours = step(x, ours)
            expected, theirs = module(x, theirs)
            assert torch.equal(logits, expected) and torch.equal(ours, theirs)
            x = logits.argmax(dim=1).reshape(-1, 1)

    vocab = Vocab.build(list("abcdefghijklmnopqrstuvwxyz "))
    prefixes = ["the time machine"[: 1 + i % 16] for i in range(batch)]
    kinds: list[dict[str, Any]] = [{}, {"temperature": 0.8, "top_k": 5, "seed": 3}]
    texts = [generate(module, vocab, prefixes, 60, **kind) for kind in kinds]
    monkeypatch.setattr(OneLayerTanhSteps, "applies", staticmethod(lambda *_: False))
    assert texts == [generate(module, vocab, prefixes, 60, **kind) for kind in kinds]


@pytest.mark.parametrize("config", [ModelConfig(28, cell="gru"), ModelConfig(28, cell="lstm")])
def test_other_cells_keep_the_framework_layer(config: ModelConfig) -> None:
    assert not RNNLM(config).fast_cpu


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
