"""``python -m rnnlm.native``: build the compiled recurrence next to its source, so that an
installation (the container image) ships it and needs no compiler at run time."""

from __future__ import annotations

import sys

from rnnlm import native


def main() -> int:
    # Only the target matters at build time: every instruction set is built, and the job loads
    # the one its CPU has (an image built on one host runs on others).
    wrong_target = native.wrong_platform()
    if wrong_target:
        print(
            f"rnnlm.native: not built, {wrong_target}; jobs use the framework's operations.",
            file=sys.stderr,
        )
        return 0
    try:
        for isa in native.ISAS:
            print(native.build(native.SOURCE.parent, isa))
    except native.KernelUnavailable as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
