"""The epoch's one collective: what every rank learns from it.

A stand-in for rank 1 adds its column to the sum (rank 0 runs here in-process); the real
exchange between processes is tested in tests/test_shm_allreduce.py.
"""

from __future__ import annotations

import pytest
import torch

from rnnlm.config import ModelConfig
from rnnlm.distributed import DistInfo
from rnnlm.loop import SGD, EpochStats, NonFiniteLoss, train_epoch
from rnnlm.model import RNNLM

RANK0 = DistInfo(rank=0, world_size=2)
# totals: loss sum, tokens, tokens this run, tokens/s of ranks 0 and 1, bad step + 1 of ranks 0, 1
PEER_RATE, PEER_BAD = 4, 6


def _epoch(peer_column: dict[int, float]) -> tuple[torch.Tensor, EpochStats]:
    torch.manual_seed(0)
    module = RNNLM(ModelConfig(28, num_hiddens=16))
    batches = [(torch.randint(0, 28, (4, 5)), torch.randint(0, 28, (4, 5))) for _ in range(3)]
    seen: list[torch.Tensor] = []

    def sum_with_peer(totals: torch.Tensor) -> torch.Tensor:
        seen.append(totals.clone())
        for index, value in peer_column.items():
            totals[index] += value
        return totals

    stats = train_epoch(module, module, batches, SGD(module.parameters(), 0.1), 1.0, False,
                        RANK0, 1, sum_over_ranks=sum_with_peer)  # fmt: skip
    return seen[0], stats


def test_every_ranks_tokens_per_s_is_gathered() -> None:
    mine, stats = _epoch({PEER_RATE: 1234.5})
    assert len(mine) == 7 and mine[PEER_RATE] == 0 and mine[PEER_BAD] == 0
    assert stats.tokens_per_s_by_rank == (pytest.approx(float(mine[3])), 1234.5)


def test_a_non_finite_loss_on_another_rank_stops_this_one_too() -> None:
    with pytest.raises(NonFiniteLoss, match="epoch 1, step 2"):
        _epoch({PEER_BAD: 2 + 1})  # rank 1's loss became NaN at step 2
