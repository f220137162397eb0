"""Text generation: ``predict_ch8`` (greedy) and seeded sampling, batched over prefixes.

Runs on one process with the unwrapped module and never calls a collective, so rank 0 can
sample in the middle of a DDP job without the other ranks.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rnnlm.errors import UserError
from rnnlm.model import RNNLM
from rnnlm.records import State
from rnnlm.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request (the sampling job's, the served model's) may ask for; the variables
    RNNLM_MAX_NUM_CHARS, RNNLM_MAX_PREFIXES and RNNLM_MAX_PREFIX_CHARS change them."""

    num_chars: int = 10_000
    prefixes: int = 256
    prefix_chars: int = 1_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Limits:
        values = {}
        for field in dataclasses.fields(cls):
            name = f"RNNLM_MAX_{field.name.upper()}"
            text = env.get(name, str(field.default))
            if not text.isdigit() or int(text) < 1:
                raise UserError(f"{name}: got {text!r}; set a whole number, 1 or more.")
            values[field.name] = int(text)
        return cls(**values)


class RequestError(UserError):
    """A generation request out of bounds; ``param`` is the parameter to change."""

    def __init__(self, param: str, fix: str) -> None:
        self.param, self.fix = param, fix
        super().__init__(f"{param}: {fix}")


def check_request(
    prefixes: Sequence[str], num_chars: int, temperature: float, top_k: int, limits: Limits
) -> None:
    """Refuse a request out of bounds, naming the parameter and the fix."""
    if not 1 <= len(prefixes) <= limits.prefixes:
        fix = f"got {len(prefixes)}; pass 1 to {limits.prefixes} (RNNLM_MAX_PREFIXES)"
        raise RequestError("prefix", fix)
    if not all(prefixes):
        raise RequestError("prefix", "got an empty one; each needs one character or more")
    if max(map(len, prefixes)) > limits.prefix_chars:
        fix = f"one is longer than {limits.prefix_chars} characters (RNNLM_MAX_PREFIX_CHARS)"
        raise RequestError("prefix", fix)
    if not 0 <= num_chars <= limits.num_chars:
        fix = f"got {num_chars}; pass 0 to {limits.num_chars} (RNNLM_MAX_NUM_CHARS)"
        raise RequestError("num_chars", fix)
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RequestError("temperature", f"got {temperature}; pass 0 (greedy) or more")
    if top_k < 0:
        raise RequestError("top_k", f"got {top_k}; pass 0 (all characters) or more")


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
