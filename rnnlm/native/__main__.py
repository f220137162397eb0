"""``python -m rnnlm.native``: build the compiled recurrence next to its source, so that an
installation (the container image) ships it and needs no compiler at run time."""

from __future__ import annotations

import sys

from rnnlm import native


def main() -> int:
    why = native.why_unavailable()
    if why:
        print(f"Error: the compiled recurrence cannot run here: {why}.", file=sys.stderr)
        return 1
    try:
        print(native.build(native.SOURCE.parent))
    except native.KernelUnavailable as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
