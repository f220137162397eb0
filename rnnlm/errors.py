"""Errors a user can fix (the CLI prints them as one line and exits non-zero), and
:func:`redact` for every message or record that may quote a URL."""

import re

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
