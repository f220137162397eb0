"""Model: output and state shapes for every cell, the LSTM (h, c) pair, and clipping."""

from __future__ import annotations

import pytest
import torch

from rnnlm.config import ModelConfig, TrainConfig
from rnnlm.errors import FlagError
from rnnlm.loop import clip_gradients
from rnnlm.model import RNNLM, detach_state

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
    else:
        assert isinstance(new_state, torch.Tensor)
        assert new_state.shape == (layers, B, H)
    assert not detach_state(new_state)[0].requires_grad


def test_logits_are_time_major() -> None:
    model = RNNLM(ModelConfig(V, num_hiddens=H))
    x = torch.randint(0, V, (B, T))
    logits, _ = model(x, model.begin_state(B))
    first_row, _ = model(x[:1], model.begin_state(1))
    # row 0's prediction at step t sits at index t*B
    assert torch.allclose(logits[::B], first_row, atol=1e-6)


def test_bidirectional_is_refused_with_a_reason() -> None:
    with pytest.raises(FlagError, match=r"--bidirectional: .* cannot train a left-to-right"):
        TrainConfig(bidirectional=True).validate()


def _model_with_grads(scale: float) -> RNNLM:
    model = RNNLM(ModelConfig(V, num_hiddens=H))
    for p in model.parameters():
        p.grad = torch.full_like(p, scale)
    return model


def test_clipping_scales_to_the_threshold() -> None:
    params = list(_model_with_grads(1.0).parameters())
    count = sum(p.numel() for p in params)
    norm = clip_gradients(params, 1.0)
    assert norm.item() == pytest.approx(count**0.5)
    new_norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert new_norm.item() == pytest.approx(1.0, rel=1e-5)


def test_clipping_leaves_small_gradients_alone() -> None:
    params = list(_model_with_grads(1e-4).parameters())
    before = [p.grad.clone() for p in params]
    clip_gradients(params, 1.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
