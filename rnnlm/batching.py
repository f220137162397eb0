"""Minibatches of the global batch, split by rows across ranks.

The corpus is laid out exactly as the chapter lays it out for the GLOBAL batch of ``B`` rows;
with ``W`` ranks, rank ``r`` owns rows ``[r*B/W, (r+1)*B/W)``. In sequential partitioning each
row is one contiguous stretch of text, so row ``b`` of minibatch ``i+1`` continues row ``b`` of
minibatch ``i`` and a rank can carry the hidden state of its own rows from one minibatch to the
next. Every rank draws offsets and shuffles from the same seeded generator, so all ranks agree
on the layout and yield the same number of minibatches (uneven counts would hang DDP).

Shapes: ``X``, ``Y``: ``(B/W, T)`` token ids, ``Y`` is ``X`` shifted one token to the left.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from rnnlm.errors import FlagError

Minibatch = tuple[Tensor, Tensor]


def min_corpus_tokens(batch_size: int, num_steps: int) -> int:
    """Fewest tokens that give one full minibatch whatever offset is drawn."""
    return batch_size * num_steps + num_steps + 1


def check_corpus_length(num_tokens: int, batch_size: int, num_steps: int, world_size: int) -> None:
    need = min_corpus_tokens(batch_size, num_steps)
    if num_tokens < need:
        raise FlagError(
            "--max-tokens",
            f"the training text has {num_tokens} tokens, but one minibatch of the global batch "
            f"{batch_size} (over {world_size} processes) x {num_steps} steps needs at least "
            f"{need}; use more text (--max-tokens -1 for the whole corpus) or a smaller "
            "--batch-size / --num-steps.",
        )


def rows_of_rank(rank: int, world_size: int, batch_size: int) -> slice:
    per_rank = batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def sequential_batches(
    corpus: Tensor,
    batch_size: int,
    num_steps: int,
    rng: random.Random,
    rank: int = 0,
    world_size: int = 1,
) -> list[Minibatch]:
    """One epoch of sequential minibatches for ``rank`` (d2l ``seq_data_iter_sequential``).

    ``corpus`` is batched as ``B`` contiguous rows (the global layout)::

        row 0: t0   t1   t2   ... | minibatch 0 | minibatch 1 | ...
        row 1: tL   tL+1 ...      |   T columns |   T columns |
        ...                       (rank r keeps rows r*B/W .. (r+1)*B/W - 1)
    """
    offset = rng.randint(0, num_steps)  # inclusive, as random.randint in d2l
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    xs = corpus[offset : offset + num_tokens].reshape(batch_size, -1)
    ys = corpus[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)
    rows = rows_of_rank(rank, world_size, batch_size)
    xs, ys = xs[rows], ys[rows]
    num_batches = xs.shape[1] // num_steps
    return [
        (xs[:, i * num_steps : (i + 1) * num_steps], ys[:, i * num_steps : (i + 1) * num_steps])
        for i in range(num_batches)
    ]


def random_batches(
    corpus: Tensor,
    batch_size: int,
    num_steps: int,
    rng: random.Random,
    rank: int = 0,
    world_size: int = 1,
) -> list[Minibatch]:
    """One epoch of randomly sampled minibatches for ``rank`` (d2l ``seq_data_iter_random``)."""
    corpus = corpus[rng.randint(0, num_steps - 1) :]
    num_subseqs = (len(corpus) - 1) // num_steps
    starts = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(starts)
    num_batches = num_subseqs // batch_size
    rows = rows_of_rank(rank, world_size, batch_size)
    batches = []
    for i in range(num_batches):
        mine = torch.tensor(starts[i * batch_size : (i + 1) * batch_size][rows])
        window = mine[:, None] + torch.arange(num_steps)  # (B/W, T) corpus positions
        batches.append((corpus[window], corpus[window + 1]))
    return batches


def epoch_batches(
    corpus: Tensor,
    batch_size: int,
    num_steps: int,
    sampling: str,
    rng: random.Random,
    rank: int = 0,
    world_size: int = 1,
) -> list[Minibatch]:
    make = sequential_batches if sampling == "sequential" else random_batches
    return make(corpus, batch_size, num_steps, rng, rank, world_size)
