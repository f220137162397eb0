"""What every entry point shares: logging set-up and turning user errors into one line."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator

import click

from rnnlm.distributed import read_env
from rnnlm.errors import UserError

# Exit code for a user mistake; Kubernetes pod failure policies use it to fail a Job at once
# rather than retry a command that can never succeed.
EXIT_USER_ERROR = 2
# How long a rank other than 0 waits, on a mistake, for the launcher to end the job once rank 0
# has reported it (the launcher checks its workers every 0.1 s by default).
PEER_REPORT_WAIT_S = 5.0


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
            # Every rank sees the same mistake and rank 0 says it once. Leaving first, this rank
            # could have the launcher stop rank 0 before it printed the line; so wait for the
            # launcher's stop (SIGTERM, its default action) and say it here only if the stop
            # never comes: a mistake on this rank alone.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(PEER_REPORT_WAIT_S)
        raise JobError(str(exc)) from None
