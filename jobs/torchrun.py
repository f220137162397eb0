"""``torchrun`` that keeps a user's mistake recognisable by its exit code.

Same arguments as ``torchrun`` (it *is* torchrun, called in-process)::

    rnnlm-torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 -m jobs.train --corpus ...

Why it exists: ``torchrun`` exits 1 whenever a worker fails, whatever the worker's own exit code
(torch 2.13: workers exiting 2 on a bad flag leave torchrun with exit 1, the same as a crash).
A Kubernetes ``podFailurePolicy`` sees only the container's exit code, so it could not tell a
command that can never succeed (retrying it wastes the whole backoff budget) from a crash worth
retrying. This launcher changes only the exit code:

- the first worker to fail exited 2 (``Error: --flag: ...``): exit 2;
- the first worker to fail exited 203 (an MLflow server or corpus host down for longer than
  ``--outage-timeout``): exit 203, which the manifests retry;
- another worker failure: exit 1, as torchrun does;
- torchrun itself was signalled (SIGTERM on preemption or pod deletion): exit 128 + the signal
  number, the shell's convention, so operators that retry only signal exits (Kubeflow's
  ``restartPolicy: ExitCode``) see a disruption, not an error.
"""

from __future__ import annotations

import sys

from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from jobs.common import EXIT_TRANSIENT, EXIT_USER_ERROR


def exit_code(error: ChildFailedError) -> int:
    """The launcher's exit code for a failed worker group: the first failed worker's where it
    was a user error (2) or an outage (203), else 1. Workers the launcher itself stopped (a
    signal: it stops the rest once one fails) are not candidates: a rank that waited for that
    stop may have written its error file before the rank that failed first."""
    exited = [f for f in error.failures.values() if f.exitcode > 0] or [
        error.get_first_failure()[1]
    ]
    first = min(exited, key=lambda failure: failure.timestamp)
    return first.exitcode if first.exitcode in (EXIT_USER_ERROR, EXIT_TRANSIENT) else 1


def main(argv: list[str] | None = None) -> None:
    try:
        torch_run.main(argv)
    except ChildFailedError as error:
        # torchrun's own summary (which rank failed, with what exit code), minus the traceback.
        print(error.format_msg(), file=sys.stderr)
        sys.exit(exit_code(error))
    except SignalException as signalled:
        sys.exit(128 + int(signalled.sigval))


if __name__ == "__main__":
    main()
