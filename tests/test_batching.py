"""Minibatches: the chapter's layout, and the per-rank split of the global batch."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from rnnlm.batching import check_corpus_length, epoch_batches
from rnnlm.errors import FlagError

B, T = 32, 35
# Token ids equal to their corpus positions make contiguity visible.
CORPUS = torch.arange(10_000)


def batches(sampling: str, rank: int, world_size: int, seed: int = 0):
    return epoch_batches(CORPUS, B, T, sampling, random.Random(seed), rank, world_size)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_shapes_and_targets(sampling: str) -> None:
    epoch = batches(sampling, 0, 1)
    assert len(epoch) >= 8
    for x, y in epoch:
        assert x.shape == y.shape == (B, T)
        assert torch.equal(y, x + 1)  # targets are the next tokens


def test_sequential_defaults_give_eight_minibatches() -> None:
    # d2l with 10,000 tokens, batch 32, 35 steps: 8 minibatches whatever the offset.
    for seed in range(20):
        assert len(batches("sequential", 0, 1, seed)) == 8


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_rows_are_contiguous_across_minibatches(world_size: int) -> None:
    for rank in range(world_size):
        epoch = batches("sequential", rank, world_size)
        for (x0, _), (x1, _) in itertools.pairwise(epoch):
            assert x0.shape == (B // world_size, T)
            # row b of minibatch i+1 continues row b of minibatch i: the carried state is valid
            assert torch.equal(x1[:, 0], x0[:, -1] + 1)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_union_of_ranks_is_the_single_process_batch(sampling: str, world_size: int) -> None:
    single = batches(sampling, 0, 1)
    per_rank = [batches(sampling, r, world_size) for r in range(world_size)]
    assert {len(e) for e in per_rank} == {len(single)}  # equal counts on every rank
    for i, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([e[i][0] for e in per_rank]), x)
        assert torch.equal(torch.cat([e[i][1] for e in per_rank]), y)


def test_shared_generator_draws_new_offsets_each_epoch() -> None:
    rng = random.Random(0)
    firsts = {epoch_batches(CORPUS, B, T, "sequential", rng)[0][0][0, 0].item() for _ in range(20)}
    assert len(firsts) > 1  # the offset is drawn anew each epoch


def test_corpus_too_short_states_the_numbers() -> None:
    check_corpus_length(B * T + T + 1, B, T, 2)
    with pytest.raises(FlagError, match=r"--max-tokens: .* has 1000 tokens.* at least 1156"):
        check_corpus_length(1000, B, T, 2)
