"""Where a job reports what happened. Chosen once per process: the main rank gets a real
tracker, every other rank a do-nothing one, so call sites stay unconditional."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from rnnlm.loop import EpochStats


class Tracker(Protocol):
    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None: ...
    def log_epoch(self, stats: EpochStats) -> None: ...
    def log_sample(self, epoch: int, prefix: str, text: str) -> None: ...
    def log_model(self, model_dir: Path, summary: dict[str, float]) -> None: ...
    def close(self, ok: bool) -> None: ...


class NullTracker:
    """Records nothing: non-main ranks, and jobs run without tracking."""

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def log_epoch(self, stats: EpochStats) -> None:
        pass

    def log_sample(self, epoch: int, prefix: str, text: str) -> None:
        pass

    def log_model(self, model_dir: Path, summary: dict[str, float]) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass
