"""Text generation: ``predict_ch8`` (greedy) and seeded sampling, batched over prefixes.

Runs on one process with the unwrapped module and never calls a collective, so rank 0 can
sample in the middle of a DDP job without the other ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rnnlm.model import RNNLM
from rnnlm.records import State
from rnnlm.vocab import Vocab


def _warm_up(module: RNNLM, prefix_ids: list[int], device: torch.device) -> State:
    """Feed all but the last prefix character one at a time, as ``predict_ch8`` does."""
    state = module.begin_state(1, device)
    for token in prefix_ids[:-1]:
        _, state = module(torch.tensor([[token]], device=device), state)
    return state


def _stack_states(states: Sequence[State]) -> State:
    """One state for several prefixes: their rows side by side (the batch is dim 1)."""
    if isinstance(states[0], tuple):
        pairs = [s for s in states if isinstance(s, tuple)]
        return (torch.cat([h for h, _ in pairs], dim=1), torch.cat([c for _, c in pairs], dim=1))
    return torch.cat([s for s in states if isinstance(s, Tensor)], dim=1)


def _pick(
    logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> Tensor:
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
) -> list[str]:
    """Each prefix followed by ``num_chars`` generated characters.

    ``temperature`` 0 is greedy (``predict_ch8``); otherwise characters are drawn from the
    softmax of ``logits / temperature``, restricted to the ``top_k`` likeliest when given.
    Prefixes must be non-empty; characters outside the vocabulary map to ``<unk>``. Runs where
    the module's parameters are.
    """
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    try:
        ids = [vocab.encode(p) for p in prefixes]
        state = _stack_states([_warm_up(module, p, device) for p in ids])
        x = torch.tensor([[p[-1]] for p in ids], device=device)  # (B, 1)
        gen = None
        if seed is not None and temperature > 0:
            gen = torch.Generator(device=device).manual_seed(seed)
        steps = []
        for _ in range(num_chars):
            logits, state = module(x, state)  # (B, V): one time step
            nxt = _pick(logits, temperature, top_k, gen)
            steps.append(nxt)
            x = nxt.reshape(-1, 1)
        columns = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prefixes]
        return [p + vocab.decode(c) for p, c in zip(prefixes, columns, strict=True)]
    finally:
        module.train(was_training)
