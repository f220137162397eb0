"""Rank 0's view of training: a progress bar on a terminal, log lines otherwise; nothing on
the other ranks."""

from __future__ import annotations

import logging
import sys

from rnnlm.records import EpochStats

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, epochs: int, log_every: int, enabled: bool, done: int = 0) -> None:
        self.log_every = log_every
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=epochs, initial=done, unit="epoch", dynamic_ncols=True)

    def update(self, stats: EpochStats) -> None:
        if self.bar is not None:
            self.bar.set_postfix(ppl=f"{stats.perplexity:.3f}", tok_s=f"{stats.tokens_per_s:.0f}")
            self.bar.update(1)
        elif self.enabled and (stats.epoch % self.log_every == 0 or stats.epoch == 1):
            log.info(
                "epoch %d: perplexity %.3f, %.0f tokens/s",
                stats.epoch,
                stats.perplexity,
                stats.tokens_per_s,
            )

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
