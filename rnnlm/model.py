"""The chapter's RNN language model: one-hot characters -> recurrent layers -> linear head.

The model knows nothing of parallelism; DDP wraps it from outside.
Shape legend: ``B`` batch rows, ``T`` time steps, ``V`` vocabulary size, ``H`` hidden units,
``L`` layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnlm.config import ModelConfig

# A GRU/RNN state is one tensor (L, B, H); an LSTM state is the pair (h, c).
State = Tensor | tuple[Tensor, Tensor]

_CELLS: dict[str, type[nn.RNN] | type[nn.GRU] | type[nn.LSTM]] = {
    "rnn": nn.RNN,
    "gru": nn.GRU,
    "lstm": nn.LSTM,
}


class RNNLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built in the chapter's order (recurrent layer, then head) so that a seeded
        # initialisation gives the chapter's initial weights.
        self.rnn = _CELLS[config.cell](
            config.vocab_size,
            config.num_hiddens,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
        )
        self.linear = nn.Linear(config.num_hiddens, config.vocab_size)

    def forward(self, inputs: Tensor, state: State) -> tuple[Tensor, State]:
        """``inputs`` (B, T) token ids -> logits (T*B, V) in time-major order, new state."""
        x = F.one_hot(inputs.T.long(), self.config.vocab_size).to(torch.float32)  # (T, B, V)
        y, state = self.rnn(x, state)  # y: (T, B, H)
        return self.linear(y.reshape(-1, y.shape[-1])), state

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zeros of shape (L, B, H); a pair of them for an LSTM."""
        shape = (self.config.num_layers, batch_size, self.config.num_hiddens)
        if self.config.cell == "lstm":
            return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        return torch.zeros(shape, device=device)


def detach_state(state: State) -> State:
    if isinstance(state, tuple):
        return (state[0].detach(), state[1].detach())
    return state.detach()
