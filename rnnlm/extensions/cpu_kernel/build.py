"""Building and loading the operator library: ``kernel.c`` (plain C, AVX2 or AVX-512) and
``ops.cpp`` (its PyTorch bindings) compiled into one shared library per source version,
instruction set and torch version.

Where it is looked for, in order: beside this file (an installation that built it ahead of
time, as the container image does with ``python -m rnnlm.extensions.cpu_kernel``), then the
user's cache (``<cache dir>/cpu_kernel``), where it is built on first use. A library is code
this process will run, so nothing is loaded from a file or folder that another user could have
written: each must belong to this user (or to root, for an installation) and be writable by
no one else; a cache folder that fails this is refused, not repaired.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "kernel.c", HERE / "ops.cpp", HERE / "kernel.h")
ISA_ENV = "RNNLM_CPU_CAPABILITY"
# -ffp-contract=off: no multiply-add the source does not spell out, so the elementwise steps
# round as the framework's do, and a row's bits do not depend on where a split puts it.
C_FLAGS = ("-O2", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-fopenmp")
# Instruction set -> (extra compiler flags, the /proc/cpuinfo flags it needs), widest first.
ISAS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "avx512": (("-mavx512f", "-mavx512dq", "-DRNNLM_AVX512"), frozenset({"avx512f", "avx512dq"})),
    "avx2": ((), frozenset({"avx2", "fma"})),
}


class Unavailable(RuntimeError):
    """The extension cannot run here; the message says why in a few words."""


class UnsupportedCapability(ValueError):
    """$RNNLM_CPU_CAPABILITY names an instruction set this CPU does not have."""


def wrong_platform() -> str | None:
    """Why this operating system or architecture is not the kernel's, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for Linux x86-64, not {sys.platform} {platform.machine()}"
    return None


def why_unavailable() -> str | None:
    """Why the kernel cannot run on this machine (platform, CPU), or None; compiles nothing."""
    return wrong_platform() or (None if supported_isas() else "this CPU lacks AVX2/FMA")


def supported_isas() -> list[str]:
    """The instruction sets of :data:`ISAS` this CPU has, widest first."""
    flags = _cpu_flags()
    return [isa for isa, (_, needs) in ISAS.items() if needs <= flags]


def chosen_isa() -> str:
    """$RNNLM_CPU_CAPABILITY where set, else the widest instruction set this CPU has."""
    supported = supported_isas()
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if wanted and wanted not in supported:
        why = "is not one of" if wanted not in ISAS else "is not supported by this CPU, which has"
        raise UnsupportedCapability(f"{wanted!r} {why}: {', '.join(supported) or 'none'}")
    if not supported:
        raise Unavailable("this CPU lacks AVX2/FMA")
    return wanted or supported[0]


def library_name(isa: str) -> str:
    """One file per version of the sources, flags and torch, so an edit or an upgrade never
    loads a stale build."""
    digest = hashlib.sha256(torch.__version__.encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join(_c_flags(isa)).encode())
    return f"rnnlm_cpu_kernel-{isa}-{digest.hexdigest()[:16]}.so"


def load(cache_dir: Path, isa: str | None = None) -> str:
    """Build (once) and load the operators for ``isa`` (default: :func:`chosen_isa`); returns
    the instruction set loaded. Raises :class:`Unavailable` saying why it cannot."""
    why = why_unavailable()
    if why:
        raise Unavailable(why)
    isa = isa or chosen_isa()
    if isa not in supported_isas():
        raise Unavailable(f"this CPU lacks {isa.upper()}")
    _load_library(_library_for(isa, cache_dir))
    return isa


@cache
def _load_library(path: Path) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as exc:  # e.g. a noexec mount, or a damaged file
        raise Unavailable(f"cannot load {path}: {exc}") from None


def _library_for(isa: str, cache_dir: Path) -> Path:
    shipped = HERE / library_name(isa)
    if shipped.is_file():
        check_private(shipped, allow_root=True)
        return shipped
    directory = private_dir(cache_dir / "cpu_kernel")
    cached = directory / library_name(isa)
    if cached.is_file():
        check_private(cached)
        return cached
    return build(directory, isa)


def private_dir(path: Path) -> Path:
    """``path``, created for this user alone (mode 0700) if missing; refused if it exists and
    another user owns it or could write in it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise Unavailable(f"cannot create {path} ({exc.strerror})") from None
    check_private(path)
    return path


def check_private(path: Path, allow_root: bool = False) -> None:
    """Refuse a file or folder (a symbolic link is judged by what it points to) that belongs
    to another user, or that its group or others may write."""
    info = path.stat()
    owners = {os.getuid(), 0} if allow_root else {os.getuid()}
    if info.st_uid not in owners:
        raise Unavailable(f"{path} belongs to user {info.st_uid}, not to this user; not loaded")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise Unavailable(f"{path} is writable by other users; not loaded")


def build(directory: Path, isa: str, mode: int = 0o700) -> Path:
    """Compile the library for ``isa`` into ``directory`` (atomically: ranks that build at once
    each rename a complete file into place); ``mode``: the file's, readable by its user only
    unless the build is an installation's."""
    target = directory / library_name(isa)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        work = Path(tmp)
        _run([*_compiler("CC", "cc", "gcc"), *_c_flags(isa), "-c", str(SOURCES[0]),
              "-o", str(work / "kernel.o")])  # fmt: skip
        _run([*_compiler("CXX", "c++", "g++"), *_cxx_flags(), str(SOURCES[1]),
              str(work / "kernel.o"), *_link_flags(), "-o", str(work / target.name)])  # fmt: skip
        os.chmod(work / target.name, mode)
        os.replace(work / target.name, target)
    return target


def _c_flags(isa: str) -> tuple[str, ...]:
    return C_FLAGS + ISAS[isa][0]


def _cxx_flags() -> list[str]:
    from torch.utils import cpp_extension  # only to build: it imports setuptools

    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    return ["-O2", "-std=c++20", "-fPIC", "-shared", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes]


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    return [*(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu",
            "-fopenmp", "-lm"]  # fmt: skip


def _compiler(env: str, *defaults: str) -> list[str]:
    """``$CC``/``$CXX`` (which may carry a wrapper: "ccache gcc"), else the first default on
    PATH."""
    if os.environ.get(env):
        wanted = shlex.split(os.environ[env])
        found = shutil.which(wanted[0])
        if found is None:
            raise Unavailable(f"${env} names {wanted[0]}, which is not on PATH")
        return [found, *wanted[1:]]
    for name in defaults:
        if found := shutil.which(name):
            return [found]
    raise Unavailable(f"no compiler ({' or '.join(defaults)}) on PATH")


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{command[0]} took over 600 s") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        raise Unavailable(f"{Path(command[0]).name} failed: {(errors or ['no output'])[0]}")


@cache  # read once: every load asks what the CPU has
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
