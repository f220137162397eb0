"""Errors a user can fix (the CLI prints them as one line and exits non-zero), outages that
outlasted their retries, and :func:`redact` for every message or record that may quote a URL."""

import re
import time
from collections.abc import Iterator

_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://***@host/...``."""
    return _URL_CREDENTIALS.sub("***@", text)


class UserError(Exception):
    """A mistake in the job's input: a flag, a file, a corpus. Its message says how to fix it."""


class FlagError(UserError):
    """A bad value for one command-line flag; the message names the flag."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")


class NonFiniteLoss(UserError):
    """Training diverged; the message names where, and no checkpoint is written after it."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(
            f"--lr: the loss became NaN/inf at epoch {epoch}, step {step}; training stopped "
            "and the last good checkpoint is kept. Lower --lr or --clip, or check the data."
        )


class Transient(Exception):
    """A server (MLflow, the corpus host) stayed unreachable or kept answering 5xx for the whole
    ``--outage-timeout``: the same command may succeed later, so the launcher should retry it."""


def backoff(seconds: float, first: float = 1.0, most: float = 15.0) -> Iterator[float]:
    """The waits between tries (1, 2, 4 ... ``most`` s) for as long as the next one would end
    within ``seconds`` of the first call; the caller sleeps them."""
    deadline, wait = time.monotonic() + seconds, first
    while time.monotonic() + wait <= deadline:
        yield wait
        wait = min(wait * 2, most)
