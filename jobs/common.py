"""What every entry point shares: logging set-up and turning user errors into one line."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import click

from rnnlm.distributed import read_env
from rnnlm.errors import UserError

# Exit code for a user mistake; Kubernetes pod failure policies use it to fail a Job at once
# rather than retry a command that can never succeed.
EXIT_USER_ERROR = 2


class JobError(click.ClickException):
    exit_code = EXIT_USER_ERROR


def setup_logging(rank: int, is_main: bool) -> None:
    """Rank-prefixed log lines on stderr; ranks other than the main one only warn."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format=f"%(asctime)s.%(msecs)03d [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a user's mistake as ``Error: <one line>`` and exit 2, never as a traceback."""
    try:
        yield
    except UserError as exc:
        if read_env(os.environ).rank != 0:
            sys.exit(EXIT_USER_ERROR)  # every rank sees the same mistake: rank 0 says it once
        raise JobError(str(exc)) from None
