"""Model: output and state shapes for every cell, the LSTM (h, c) pair, time-major logits, its
training loss, and the step's gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch

from rnnlm.config import ModelConfig, TrainConfig
from rnnlm.errors import FlagError
from rnnlm.model import RNNLM
from rnnlm.records import detach_state
from rnnlm.steps import EagerStep

V, H, B, T = 28, 16, 4, 5


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
def test_shapes(cell: str, layers: int) -> None:
    model = RNNLM(ModelConfig(V, cell=cell, num_hiddens=H, num_layers=layers))
    state = model.begin_state(B)
    x = torch.randint(0, V, (B, T))
    logits, new_state = model(x, state)
    assert logits.shape == (T * B, V)
    if cell == "lstm":
        assert isinstance(state, tuple) and isinstance(new_state, tuple)
        assert [s.shape for s in new_state] == [(layers, B, H)] * 2
        assert not any(s.requires_grad for s in detach_state(new_state))
    else:
        assert isinstance(new_state, torch.Tensor)
        assert new_state.shape == (layers, B, H)
        assert new_state.requires_grad and not detach_state(new_state).requires_grad


def test_logits_are_time_major() -> None:
    model = RNNLM(ModelConfig(V, num_hiddens=H))
    x = torch.randint(0, V, (B, T))
    logits, _ = model(x, model.begin_state(B))
    first_row, _ = model(x[:1], model.begin_state(1))
    # row 0's prediction at step t sits at index t*B
    assert torch.allclose(logits[::B], first_row, atol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_with_targets_the_model_returns_the_mean_cross_entropy_of_its_logits(cell: str) -> None:
    """The training loss is the chapter's: the mean over all B*T targets, each matched to its
    own (time-major) logits row."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(V, cell=cell, num_hiddens=H))
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    logits, state = model(x, model.begin_state(B))
    loss, loss_state = model(x, model.begin_state(B), y)
    labels = torch.tensor([int(y[b, t]) for t in range(T) for b in range(B)])  # time-major
    log_probs = torch.log_softmax(logits, dim=1)
    expected = -log_probs[torch.arange(T * B), labels].mean()
    assert loss.shape == () and torch.allclose(loss, expected, rtol=1e-6)
    states = zip(*(s if isinstance(s, tuple) else (s,) for s in (state, loss_state)), strict=True)
    assert all(torch.equal(a, b) for a, b in states)


def test_bidirectional_is_refused_with_a_reason() -> None:
    reason = r"--bidirectional: .* cannot train a left-to-right"
    with pytest.raises(FlagError, match=reason):
        ModelConfig(V, bidirectional=True).check(1)
    with pytest.raises(FlagError, match=reason):
        TrainConfig.from_flat({"bidirectional": True}).validate()


def _step_on_one_batch(clip: float) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """One real training step (lr 1) on a fresh model; returns the norm the step reports, the
    gradient computed independently on a copy of the model, and the update the step applied."""
    torch.manual_seed(0)
    model = RNNLM(ModelConfig(V, num_hiddens=H))
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    reference = copy.deepcopy(model)
    loss, _ = reference(x, reference.begin_state(B), y)
    loss.backward()
    raw = [p.grad.clone() for p in reference.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    step = EagerStep(model, torch.optim.SGD(model.parameters(), lr=1.0), clip)
    _, norm, _ = step(x, y, model.begin_state(B))
    update = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    return float(norm), raw, update


def _global_norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def test_the_step_clips_the_gradient_to_the_global_norm() -> None:
    """Above --clip, the whole gradient is scaled (one factor for all parameters) to norm --clip
    before the update; the step reports the norm before clipping."""
    clip = 0.02
    norm, raw, update = _step_on_one_batch(clip)
    raw_norm = _global_norm(raw)
    assert raw_norm > 10 * clip  # the gradient really is clipped here
    assert norm == pytest.approx(raw_norm, rel=1e-5)
    assert _global_norm(update) == pytest.approx(clip, rel=1e-4)
    for u, g in zip(update, raw, strict=True):  # same direction: one global factor
        torch.testing.assert_close(u, g * (clip / raw_norm), rtol=1e-3, atol=1e-7)


def test_the_step_leaves_gradients_below_the_clip_alone() -> None:
    norm, raw, update = _step_on_one_batch(clip=1e6)
    assert norm == pytest.approx(_global_norm(raw), rel=1e-5)
    for u, g in zip(update, raw, strict=True):
        torch.testing.assert_close(u, g, rtol=1e-4, atol=1e-7)
