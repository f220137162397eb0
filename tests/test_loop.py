"""The epoch's one collective: what every rank learns from it.

Rank 0 trains here in-process; a stand-in for rank 1 adds its column to the epoch's sum (the
one call of ``rnnlm.loop.all_reduce_sum``). The real exchange between processes is what the
2-rank jobs of tests/test_train_job.py and tests/test_fault_tolerance.py go through.
"""

from __future__ import annotations

import pytest
import torch

import rnnlm.loop
from rnnlm.config import ModelConfig
from rnnlm.distributed import DistInfo
from rnnlm.errors import NonFiniteLoss
from rnnlm.loop import Epoch, in_order, train_epoch
from rnnlm.model import RNNLM
from rnnlm.records import EpochStats
from rnnlm.steps import EagerStep

RANK0 = DistInfo(rank=0, world_size=2)
# totals: loss sum, tokens, tokens this run, tokens/s of ranks 0 and 1, bad step + 1 of ranks 0, 1
MY_RATE, PEER_RATE, MY_BAD, PEER_BAD = 3, 4, 5, 6


def _epoch(
    monkeypatch: pytest.MonkeyPatch, peer_column: dict[int, float]
) -> tuple[list[torch.Tensor], EpochStats]:
    """Train rank 0's epoch of 3 minibatches; returns what it put into each collective (before
    rank 1's share was added) and its figures."""
    torch.manual_seed(0)
    module = RNNLM(ModelConfig(28, num_hiddens=16))
    step = EagerStep(module, torch.optim.SGD(module.parameters(), lr=0.1), clip=1.0)
    batches = [(torch.randint(0, 28, (4, 5)), torch.randint(0, 28, (4, 5))) for _ in range(3)]
    seen: list[torch.Tensor] = []

    def sum_with_peer(totals: torch.Tensor, info: DistInfo) -> torch.Tensor:
        assert info is RANK0
        seen.append(totals.clone())
        for index, value in peer_column.items():
            totals[index] += value
        return totals

    monkeypatch.setattr(rnnlm.loop, "all_reduce_sum", sum_with_peer)
    stats = train_epoch(step, Epoch(1, in_order(batches)), RANK0)
    return seen, stats


def test_every_ranks_tokens_per_s_is_gathered(monkeypatch: pytest.MonkeyPatch) -> None:
    seen, stats = _epoch(monkeypatch, {PEER_RATE: 1234.5})
    (mine,) = seen  # one collective for the whole epoch
    assert len(mine) == 7 and mine[MY_RATE] > 0 and mine[PEER_RATE] == 0
    assert mine[MY_BAD] == 0 and mine[PEER_BAD] == 0  # no NaN here
    assert stats.tokens_per_s_by_rank == (pytest.approx(float(mine[MY_RATE])), 1234.5)
    assert stats.rank_tokens_per_s == pytest.approx(float(mine[MY_RATE]))


def test_a_non_finite_loss_on_another_rank_stops_this_one_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(NonFiniteLoss, match="epoch 1, step 2"):
        _epoch(monkeypatch, {PEER_BAD: 2 + 1})  # rank 1's loss became NaN at step 2
