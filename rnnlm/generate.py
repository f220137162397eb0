"""Text generation: ``predict_ch8`` (greedy) and seeded sampling, batched over prefixes.

Runs on one process with the unwrapped module and never calls a collective, so rank 0 can
sample in the middle of a DDP job without the other ranks.

Text comes one character per step. For the chapter's model on the CPU (one ``rnn`` layer),
:class:`OneLayerTanhSteps` runs each step as the module's own operations on the same operands
-- ``addmm``, the row of the input table, ``tanh``, the head's ``addmm`` -- without the
module's per-call work (rebuilding the input table, the autograd function, stacking states),
which took most of a step's time; other models step through the module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rnnlm.model import RNNLM, State, input_table
from rnnlm.vocab import Vocab

# One step: ids (B, 1) and the state -> logits (B, V) and the next state.
Step = Callable[[Tensor, State], tuple[Tensor, State]]


class OneLayerTanhSteps:
    """One time step of the chapter's model, ``h = tanh(h W_hh^T + b_hh + (W_ih^T + b_ih)[x])``
    and ``logits = h W^T + b``: the operations :meth:`RNNLM.forward` runs for a one-step input on
    the CPU, in the same order on the same operands, so the same bits, with the input table
    built once rather than at every character."""

    def __init__(self, module: RNNLM) -> None:
        w_ih, b_ih, w_hh, b_hh = module.layer_weights(0)
        self.table = input_table(w_ih, b_ih)
        self.w_hh_t, self.b_hh = w_hh.t(), b_hh
        self.head_t, self.head_b = module.linear.weight.t(), module.linear.bias

    @staticmethod
    def applies(module: RNNLM, device: torch.device) -> bool:
        """The chapter's model on the CPU, as saved (float32: the module casts other inputs)."""
        return (
            module.fast_cpu
            and module.config.num_layers == 1
            and device.type == "cpu"
            and module.linear.weight.dtype == torch.float32
        )

    def __call__(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        assert isinstance(state, Tensor)  # an rnn cell's state: (1, B, H)
        h = torch.addmm(self.b_hh, state[0], self.w_hh_t)
        h.add_(self.table[x[:, 0]]).tanh_()
        return torch.addmm(self.head_b, h, self.head_t), h.unsqueeze(0)


def _warm_up(step: Step, module: RNNLM, prefix_ids: list[int], device: torch.device) -> State:
    """Feed all but the last prefix character one at a time, as ``predict_ch8`` does."""
    state = module.begin_state(1, device)
    for token in prefix_ids[:-1]:
        _, state = step(torch.tensor([[token]], device=device), state)
    return state


def _stack_states(states: Sequence[State]) -> State:
    if isinstance(states[0], tuple):
        pairs = [s for s in states if isinstance(s, tuple)]
        return (torch.cat([h for h, _ in pairs], dim=1), torch.cat([c for _, c in pairs], dim=1))
    return torch.cat([s for s in states if isinstance(s, Tensor)], dim=1)


def _pick(logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None):
    if temperature == 0:
        return logits.argmax(dim=1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[1]:
        kth = torch.topk(logits, top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


@torch.no_grad()
def generate(
    module: RNNLM,
    vocab: Vocab,
    prefixes: Sequence[str],
    num_chars: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Each prefix followed by ``num_chars`` generated characters.

    ``temperature`` 0 is greedy (``predict_ch8``); otherwise characters are drawn from the
    softmax of ``logits / temperature``, restricted to the ``top_k`` likeliest when given.
    Prefixes must be non-empty; characters outside the vocabulary map to ``<unk>``.
    """
    device = torch.device(device)
    was_training = module.training
    module.eval()
    try:
        step: Step = (
            OneLayerTanhSteps(module) if OneLayerTanhSteps.applies(module, device) else module
        )
        ids = [vocab.encode(p) for p in prefixes]
        state = _stack_states([_warm_up(step, module, p, device) for p in ids])
        x = torch.tensor([[p[-1]] for p in ids], device=device)  # (B, 1)
        gen = None
        if seed is not None and temperature > 0:
            gen = torch.Generator(device=device).manual_seed(seed)
        steps = []
        for _ in range(num_chars):
            logits, state = step(x, state)  # (B, V)
            nxt = _pick(logits, temperature, top_k, gen)
            steps.append(nxt)
            x = nxt.reshape(-1, 1)
        columns = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prefixes]
        return [p + vocab.decode(c) for p, c in zip(prefixes, columns, strict=True)]
    finally:
        module.train(was_training)
