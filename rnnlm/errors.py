"""Errors a user can fix (the CLI prints them as one line and exits non-zero), outages that
outlasted their retries, and :func:`redact` for every message or record that may quote a URL."""

import logging
import re
import time

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


def is_refusal(http_status: int) -> bool:
    """A 4xx that the same request would get again (bad input, a missing permission), unlike
    408, 409 and 429 (the server's timing) or a 5xx (an outage): never worth a retry."""
    return 400 <= http_status < 500 and http_status not in (408, 409, 429)


class Outage:
    """One outage, waited out with backoff (1, 2, 4 ... 15 s) for at most ``seconds``: call
    :meth:`wait` after each failed try."""

    def __init__(self, seconds: float, log: logging.Logger) -> None:
        self.seconds, self.log = seconds, log
        self.deadline = time.monotonic() + seconds
        self.next_wait, self.said = 1.0, False

    def wait(self, failure: str, gave_up: str) -> None:
        """Sleep before the next try, saying ``failure`` once; raise :class:`Transient` with
        ``gave_up`` when the next try would start past the deadline."""
        if time.monotonic() + self.next_wait > self.deadline:
            raise Transient(gave_up)
        if not self.said:
            self.log.warning("%s; retrying for up to %.0f s (--outage-timeout)",
                             failure, self.seconds)  # fmt: skip
            self.said = True
        time.sleep(self.next_wait)
        self.next_wait = min(self.next_wait * 2, 15.0)
