"""The chapter's RNN language model: one-hot characters -> recurrent layers -> linear head.

Built from the framework's layers (``nn.RNN``/``nn.GRU``/``nn.LSTM`` and ``nn.Linear``), so its
state_dict is theirs. The model knows nothing of parallelism; DDP wraps it from outside.

Shape legend: ``B`` batch rows, ``T`` time steps, ``V`` vocabulary size, ``H`` hidden units,
``L`` layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnnlm.config import ModelConfig
from rnnlm.records import State

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

    def forward(
        self, inputs: Tensor, state: State, targets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """``inputs`` (B, T) token ids -> logits (T*B, V) in time-major order, and the new
        state. Given ``targets`` (B, T), the mean cross-entropy of those logits takes their
        place: the training loss, which a subclass may compute without the logits."""
        x = F.one_hot(inputs.T.long(), self.config.vocab_size).to(torch.float32)  # (T, B, V)
        y, state = self.rnn(x, state)  # (T, B, H)
        logits = self.linear(y.reshape(-1, y.shape[-1]))  # (T*B, V)
        if targets is None:
            return logits, state
        labels = targets.T.reshape(-1).long()  # time-major, as the logits
        return F.cross_entropy(logits.float(), labels), state

    def begin_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """Zeros of shape (L, B, H); a pair of them for an LSTM."""
        shape = (self.config.num_layers, batch_size, self.config.num_hiddens)
        if self.config.cell == "lstm":
            return (torch.zeros(shape, device=device), torch.zeros(shape, device=device))
        return torch.zeros(shape, device=device)
