"""``python -m rnnlm.extensions.cpu_kernel``: build the operator library beside its sources, for
every instruction set, so that an installation (the container image) ships it and needs no
compiler at run time; the job loads the build its CPU can run."""

from __future__ import annotations

import sys

from rnnlm.extensions.cpu_kernel import build


def main() -> int:
    why = build.wrong_platform()  # the target decides what can be built, not this CPU
    if why:
        print(f"cpu_kernel: not built, {why}; jobs train on the core.", file=sys.stderr)
        return 0
    try:
        for isa in build.ISAS:
            print(build.build(build.HERE, isa, mode=0o755))
    except build.Unavailable as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
