"""What every entry point shares: logging set-up and turning user errors into one line."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import click

from rnnlm.distributed import read_env
from rnnlm.errors import Transient, UserError, redact

# Exit code for a user mistake; Kubernetes pod failure policies use it to fail a Job at once
# rather than retry a command that can never succeed.
EXIT_USER_ERROR = 2
# Exit code for an outage that outlasted --outage-timeout (MLflow or the corpus host down): the
# same command may succeed later. sysexits' EX_TEMPFAIL (75) lifted above 128, because the
# Kubeflow training operator restarts only exit codes 128-255 (restartPolicy: ExitCode).
EXIT_TRANSIENT = 128 + 75
# How long another rank on rank 0's node waits, on a mistake, for the launcher to end the job
# once rank 0 has reported it (the launcher checks its workers every 0.1 s by default).
PEER_REPORT_WAIT_S = 5.0


class JobError(click.ClickException):
    exit_code = EXIT_USER_ERROR


class OutageError(click.ClickException):
    exit_code = EXIT_TRANSIENT


class RedactingFormatter(logging.Formatter):
    """Every log line, third-party ones and tracebacks included, without URL credentials."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(rank: int, is_main: bool) -> None:
    """Rank-prefixed log lines on stderr; ranks other than the main one only warn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        RedactingFormatter(
            f"%(asctime)s.%(msecs)03d [rank{rank}] %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, handlers=[handler], force=True
    )


@contextlib.contextmanager
def user_errors(ranked: bool = True) -> Iterator[None]:
    """Show a user's mistake as ``Error: <one line>`` and exit 2, an outage that outlasted its
    retries the same way with exit 203; never a traceback. ``ranked``: the command runs as one
    of torchrun's ranks (see :func:`_leave_it_to_rank_0`)."""
    try:
        yield
    except (UserError, Transient) as exc:
        error = OutageError if isinstance(exc, Transient) else JobError
        if ranked:
            _leave_it_to_rank_0(error.exit_code)
        raise error(redact(str(exc))) from None


def _leave_it_to_rank_0(code: int) -> None:
    """Every rank sees the same mistake, and rank 0 says it once. Another rank on rank 0's node
    must not leave first: its launcher could then stop rank 0 before it printed the line. So it
    waits for that launcher's stop (SIGTERM, its default action) and says the mistake itself
    only if the stop never comes (a mistake on this rank alone). A rank on another node leaves
    at once, with ``code``: its launcher hears of rank 0's exit only through the rendezvous, which
    ends with rank 0's node."""
    info = read_env(os.environ)
    if info.rank == 0:
        return
    if info.rank != info.local_rank:  # another node
        sys.exit(code)
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(PEER_REPORT_WAIT_S)
