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
from array import array
from collections.abc import Sequence
from typing import overload

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


class _Batches(Sequence[Minibatch]):
    """An epoch's minibatches for one rank, each made when asked for by :meth:`batch`."""

    def batch(self, i: int) -> Minibatch:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> Minibatch: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Minibatch]: ...
    def __getitem__(self, i: int | slice) -> Minibatch | Sequence[Minibatch]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.batch(i)


class SequentialBatches(_Batches):
    """One epoch of sequential minibatches for ``rank`` (d2l ``seq_data_iter_sequential``),
    made on demand as views of the corpus (no copy, nothing per minibatch kept).

    ``corpus`` is batched as ``B`` contiguous rows (the global layout)::

        row 0: t0   t1   t2   ... | minibatch 0 | minibatch 1 | ...
        row 1: tL   tL+1 ...      |   T columns |   T columns |
        ...                       (rank r keeps rows r*B/W .. (r+1)*B/W - 1)
    """

    def __init__(self, corpus: Tensor, batch_size: int, num_steps: int, rng: random.Random,
                 rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        offset = rng.randint(0, num_steps)  # inclusive, as random.randint in d2l
        num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
        rows = rows_of_rank(rank, world_size, batch_size)
        self.xs = corpus[offset : offset + num_tokens].reshape(batch_size, -1)[rows]
        self.ys = corpus[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)[rows]
        self.num_steps = num_steps

    def __len__(self) -> int:
        return self.xs.shape[1] // self.num_steps

    def batch(self, i: int) -> Minibatch:
        columns = slice(i * self.num_steps, (i + 1) * self.num_steps)
        return self.xs[:, columns], self.ys[:, columns]


class RandomBatches(_Batches):
    """One epoch of randomly sampled minibatches for ``rank`` (d2l ``seq_data_iter_random``),
    made on demand. The shuffled window starts are the one thing that grows with the corpus:
    four bytes per window (``num_steps`` tokens), shuffled exactly as d2l's list would be."""

    def __init__(self, corpus: Tensor, batch_size: int, num_steps: int, rng: random.Random,
                 rank: int = 0, world_size: int = 1) -> None:  # fmt: skip
        first = rng.randint(0, num_steps - 1)
        self.corpus = corpus[first:]
        num_subseqs = (len(self.corpus) - 1) // num_steps
        wide = num_subseqs * num_steps > 2**31  # "i" holds starts up to 2**31
        self.starts = array("q" if wide else "i", range(0, num_subseqs * num_steps, num_steps))
        rng.shuffle(self.starts)  # exactly as d2l's list: any mutable sequence will do
        self.batch_size, self.num_steps = batch_size, num_steps
        self.rows = rows_of_rank(rank, world_size, batch_size)

    def __len__(self) -> int:
        return len(self.starts) // self.batch_size

    def batch(self, i: int) -> Minibatch:
        batch = self.starts[i * self.batch_size : (i + 1) * self.batch_size]
        mine = torch.tensor(batch[self.rows], dtype=torch.long)
        window = mine[:, None] + torch.arange(self.num_steps)  # (B/W, T) corpus positions
        return self.corpus[window], self.corpus[window + 1]


def epoch_batches(
    corpus: Tensor,
    batch_size: int,
    num_steps: int,
    sampling: str,
    rng: random.Random,
    rank: int = 0,
    world_size: int = 1,
) -> Sequence[Minibatch]:
    make = SequentialBatches if sampling == "sequential" else RandomBatches
    return make(corpus, batch_size, num_steps, rng, rank, world_size)
