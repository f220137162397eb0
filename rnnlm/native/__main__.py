"""``python -m rnnlm.native``: build the compiled recurrence next to its source, so that an
installation (the container image) ships it and needs no compiler at run time."""

from __future__ import annotations

import sys

from rnnlm import native


def main() -> int:
    # Only the target matters at build time: an image built on a host without AVX2 still runs
    # on hosts with it (the job checks the CPU when it loads the library).
    wrong_target = native.wrong_platform()
    if wrong_target:
        print(
            f"rnnlm.native: not built, {wrong_target}; jobs use the framework's operations.",
            file=sys.stderr,
        )
        return 0
    try:
        print(native.build(native.SOURCE.parent))
    except native.KernelUnavailable as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
