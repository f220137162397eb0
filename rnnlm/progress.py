"""Rank 0's view of training: a progress bar on a terminal, log lines otherwise; nothing on
the other ranks."""

from __future__ import annotations

import logging
import math
import sys

from rnnlm.records import EpochStats

log = logging.getLogger(__name__)


class Progress:
    def __init__(
        self, total: int, log_every: int, enabled: bool, done: int = 0, unit: str = "epoch"
    ) -> None:
        """``total`` epochs, or steps (``unit``) with --max-steps; each report moves it on."""
        self.log_every, self.enabled, self.unit, self.done = log_every, enabled, unit, done
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit=unit, dynamic_ncols=True)

    def update(self, stats: EpochStats) -> None:
        """``stats.epoch``: the epoch, or the step its report ends at."""
        moved, self.done = stats.epoch - self.done, stats.epoch
        if self.bar is not None:
            self.bar.set_postfix(ppl=f"{stats.perplexity:.3f}", tok_s=f"{stats.tokens_per_s:.0f}")
            self.bar.update(moved)
        elif self.enabled and (stats.epoch % self.log_every == 0 or stats.epoch == 1):
            log.info(
                "%s %d: perplexity %.3f (%.3f bits per character), %.0f tokens/s",
                self.unit,
                stats.epoch,
                stats.perplexity,
                math.log2(stats.perplexity),
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
