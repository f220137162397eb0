"""The compiled CPU kernel of the chapter's recurrence (``tanh_recurrence.c``), built on first use,
and its matrix product for the model's other products.

The C source needs no torch headers and no BLAS: the system C compiler builds it in well under
a second, once per source version and instruction set, into ``<cache dir>/native`` (a build
already next to this file, as in the container image, is used first), and it is loaded with
ctypes. Its threads are torch's own OpenMP pool. Where any of this is missing, :func:`load` says
why and the job keeps the framework's operations (``--cpu-kernel auto``).

The instruction set is the widest the CPU has (AVX-512, else AVX2); both builds compute the
same bits. ``RNNLM_CPU_CAPABILITY=avx2`` picks the narrower one, as torch's
``ATEN_CPU_CAPABILITY`` does for its own kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

SOURCE = Path(__file__).with_name("tanh_recurrence.c")
# -ffp-contract=off: no multiply-add the source does not spell out, so the elementwise steps
# round as the framework's do, and a row's bits do not depend on where a split puts it.
CFLAGS = ("-O2", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp")
LIBS = ("-lm",)  # log and sqrt; after the source: a linker that drops unneeded libraries keeps it
# Instruction set -> (extra compiler flags, the /proc/cpuinfo flags it needs), widest first.
ISAS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "avx512": (("-mavx512f", "-mavx512dq", "-DRNNLM_AVX512"), frozenset({"avx512f", "avx512dq"})),
    "avx2": ((), frozenset({"avx2", "fma"})),
}
ISA_ENV = "RNNLM_CPU_CAPABILITY"


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why in a few words."""


class UnsupportedCapability(ValueError):
    """$RNNLM_CPU_CAPABILITY names an instruction set this build or CPU does not have."""


class TanhRecurrenceKernel:
    """The loaded library: the recurrence fills tensors in place (float32, contiguous, CPU),
    :meth:`matmul` multiplies float32 matrices of any strides.

    The work is split over torch's intra-op threads (``torch.get_num_threads``): the recurrence
    by batch rows, each thread running its rows' time steps, the product by blocks of its
    output; the split changes no bit.
    """

    def __init__(self, library: ctypes.CDLL, isa: str) -> None:
        self._lib = library
        self.isa = isa
        self.threads: int | None = None  # None: torch.get_num_threads() at each call
        ints, ptrs = [ctypes.c_int] * 3, [ctypes.c_void_p]
        library.tanh_recurrence_forward.argtypes = [
            *ints,
            *ptrs * 2,  # pre, ids
            ctypes.c_int,  # table rows
            *ptrs * 3,
            ctypes.c_int,
        ]
        library.tanh_recurrence_backward.argtypes = [
            *ints,
            *ptrs * 7,  # outs, grad_out, w_hh, dh, dz, scratch, ids
            ctypes.c_int,  # table rows
            *ptrs * 2,  # grad_b, grad_table
            ctypes.c_int,
        ]
        strided: list[type[ctypes.c_void_p] | type[ctypes.c_int64]]
        strided = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]  # a pointer and 2 strides
        library.rnnlm_matmul.argtypes = [*ints, *strided * 2, ctypes.c_void_p, ctypes.c_int]
        library.rnnlm_linear_cross_entropy.argtypes = [*ints, *ptrs * 9, ctypes.c_int]
        library.rnnlm_linear_cross_entropy.restype = ctypes.c_int
        library.rnnlm_clip_sgd.argtypes = [ctypes.c_int, *ptrs * 4, ctypes.c_float, ctypes.c_float]
        library.rnnlm_clip_sgd.restype = None
        library.rnnlm_average_clip_sgd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
        library.rnnlm_average_clip_sgd.argtypes += [ctypes.c_int, *ptrs * 4]
        library.rnnlm_average_clip_sgd.argtypes += [ctypes.c_float, ctypes.c_float]
        library.rnnlm_average_clip_sgd.restype = None
        library.rnnlm_rnn_train_step.argtypes = [*ints, ctypes.c_int, ctypes.c_int]
        library.rnnlm_rnn_train_step.argtypes += [*ptrs * 17, ctypes.c_int]
        library.rnnlm_rnn_train_step.restype = ctypes.c_int
        library.tanh_recurrence_forward.restype = ctypes.c_int
        library.tanh_recurrence_backward.restype = ctypes.c_int
        library.rnnlm_matmul.restype = ctypes.c_int

    def forward(
        self, pre: Tensor, w_hh: Tensor, b_hh: Tensor, hs: Tensor, ids: Tensor | None = None
    ) -> None:
        """Fill ``hs[1:]`` (T+1, B, H) from ``hs[0]`` and the inputs: ``pre`` (T, B, H), or with
        ``ids`` (T, B) int64 the rows of the table ``pre`` (V, H) they pick."""
        steps, batch, hidden = hs.shape[0] - 1, hs.shape[1], hs.shape[-1]
        table_rows = pre.shape[0]
        weights = (w_hh, b_hh, hs)
        shapes = [(hidden, hidden), (hidden,), (steps + 1, batch, hidden)]
        if ids is None:
            _check_shapes((pre, *weights), [(steps, batch, hidden), *shapes])
        else:
            _check_shapes((pre, *weights), [(table_rows, hidden), *shapes])
            _check_indices("ids", ids, (steps, batch))
        status = self._lib.tanh_recurrence_forward(
            steps,
            batch,
            hidden,
            _ptr(pre),
            _ptr(ids),
            table_rows,
            *map(_ptr, weights),
            self._threads(),
        )
        if status == -2:
            raise IndexError(f"an id is outside [0, {table_rows})")
        _check(status)

    def backward(
        self,
        outs: Tensor,
        grad_out: Tensor | None,
        w_hh: Tensor,
        dh: Tensor,
        dz: Tensor,
        grad_b: Tensor | None = None,
        ids: Tensor | None = None,
        grad_table: Tensor | None = None,
    ) -> None:
        """``dz`` (T, B, H) := dL/dpre; ``dh`` (B, H): dL/dh_T in, dL/dh_0 out. Given, ``grad_b``
        (H,) := the sum of ``dz``'s rows, and ``grad_table`` (V, H) := ``dz``'s rows added up
        by ``ids`` (T, B), the first layer's lookups."""
        steps, batch, hidden = outs.shape
        shapes = [(steps, batch, hidden), (hidden, hidden), (batch, hidden), (steps, batch, hidden)]
        _check_shapes((outs, w_hh, dh, dz), shapes)
        if grad_out is not None:
            _check_shapes((grad_out,), shapes[:1])
        if grad_b is not None:
            _check_shapes((grad_b,), [(hidden,)])
        table_rows = 0
        if grad_table is not None:
            table_rows = grad_table.shape[0]
            _check_shapes((grad_table,), [(table_rows, hidden)])
            if ids is None or ids.dtype != torch.int64 or ids.shape != (steps, batch):
                raise ValueError(f"a table gradient needs int64 ids of shape {(steps, batch)}")
            if not ids.is_contiguous():
                raise ValueError("ids must be contiguous")
        scratch = torch.empty_like(dh)
        args = (outs, grad_out, w_hh, dh, dz, scratch, ids if grad_table is not None else None)
        status = self._lib.tanh_recurrence_backward(
            steps,
            batch,
            hidden,
            *map(_ptr, args),
            table_rows,
            _ptr(grad_b),
            _ptr(grad_table),
            self._threads(),
        )
        if status == -2:
            raise IndexError(f"an id is outside [0, {table_rows})")
        _check(status)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        """``a @ b`` for float32 CPU matrices of any strides (``x.t()`` costs nothing), each
        element one chain of fused multiply-adds over the inner dimension in order, so the
        result does not depend on the thread count."""
        (m, k_dim), n = a.shape, b.shape[-1]
        _check_matrices(a, b, (k_dim, n))
        out = a.new_empty(m, n)
        status = self._lib.rnnlm_matmul(
            m, n, k_dim, _ptr(a), *a.stride(), _ptr(b), *b.stride(), _ptr(out), self._threads()
        )
        _check(status)
        return out

    def linear_cross_entropy(
        self, x: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, gradients: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """The mean cross-entropy of the logits ``x @ weight^T + bias`` against ``targets``
        (N,) int64, and with ``gradients`` its gradients for ``x``, ``weight`` and ``bias``."""
        (rows, hidden), classes = x.shape, weight.shape[0]
        _check_shapes((x, weight, bias), [(rows, hidden), (classes, hidden), (classes,)])
        _check_indices("targets", targets, (rows,))
        mean, scratch = x.new_empty(()), x.new_empty(rows, classes)  # alive until the call ends
        grads = None
        if gradients:
            grads = (torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias))
        status = self._lib.rnnlm_linear_cross_entropy(
            rows,
            hidden,
            classes,
            *map(_ptr, (x, weight, bias, targets, scratch, mean)),
            *(map(_ptr, grads) if grads else (None,) * 3),
            self._threads(),
        )
        if status == -2:
            raise IndexError(f"a target is outside [0, {classes})")
        _check(status)
        return mean, grads

    def rnn_train_step(
        self,
        ids: Tensor,
        targets: Tensor,
        h0: Tensor,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        h_last: Tensor,
    ) -> Tensor:
        """One training step of the chapter's model in one call, forward and backward: ``ids``
        and ``targets`` (B, T) int64, ``h0`` (B, H); ``params`` are W_ih, b_ih, W_hh, b_hh (a
        one-layer ``nn.RNN``'s) and the output layer's W, b, and ``grads`` receives their
        gradients of the mean cross-entropy; ``h_last`` (B, H) receives h_T. Returns the loss
        (a 0-dim tensor). Computes what the model's compiled path and autograd compute, bit for
        bit. (:class:`TrainStepCall` makes the same call for fixed parameters.)"""
        call = TrainStepCall(self, params)
        return call(ids, targets, h0, h_last, call.add_gradients(grads))

    def clip_sgd(self, params: Sequence[Tensor], max_norm: float, lr: float) -> Tensor | None:
        """d2l's gradient clipping (to the global L2 norm ``max_norm``), then the SGD step
        ``p -= lr * grad``, in one call; returns the norm before clipping (a 0-dim tensor).
        None, with nothing changed, unless every parameter and its gradient are contiguous
        float32 CPU tensors of the same size (the caller then takes the framework's way)."""
        call = ClipSGDCall.of(self, [p for p in params if p.grad is not None])
        return None if call is None else call.clip_sgd(max_norm, lr)

    def average_clip_sgd(
        self, slots: Tensor, params: Sequence[Tensor], max_norm: float, lr: float
    ) -> Tensor:
        """:meth:`clip_sgd` on the average over ranks of the gradients in ``slots`` (world, n):
        row r holds rank r's gradients of ``params``, one after another, as a flat gradient
        buffer does. Every ``p.grad`` is first set to the average, summed in rank order (so
        every rank gets the same bits), then clipped; the parameters take the step."""
        call = ClipSGDCall.of(self, params)
        if call is None:
            raise ValueError("average_clip_sgd needs contiguous float32 CPU parameters and grads")
        return call.average_clip_sgd(slots, max_norm, lr)

    def _threads(self) -> int:
        return self.threads or torch.get_num_threads()


class TrainStepCall:
    """:meth:`TanhRecurrenceKernel.rnn_train_step` for fixed parameters (and gradient buffers
    registered with :meth:`add_gradients`): their checks and pointers done once, not every
    step, where they were ~0.05 ms of Python of a 2.5-5 ms step. The parameters must keep their
    storage: a moved one is refused rather than written through a stale pointer."""

    def __init__(self, kernel: TanhRecurrenceKernel, params: Sequence[Tensor]) -> None:
        w_ih, _, _, _, w_out, _ = params
        (hidden, vocab), classes = w_ih.shape, w_out.shape[0]
        self.shapes = [(hidden, vocab), (hidden,), (hidden, hidden), (hidden,), (classes, hidden)]
        self.shapes.append((classes,))
        _check_shapes(tuple(params), self.shapes)
        self.kernel, self.params = kernel, list(params)
        self.hidden, self.vocab, self.classes = hidden, vocab, classes
        self.pointers = [p.data_ptr() for p in params]
        self.grad_table = w_ih.new_empty(vocab, hidden)  # b_ih's gradient is summed from it
        self.gradients: list[tuple[list[Tensor], list[int]]] = []

    def add_gradients(self, grads: Sequence[Tensor]) -> int:
        """Check a set of gradient buffers (the parameters' order and shapes); its handle."""
        _check_shapes(tuple(grads), self.shapes)
        self.gradients.append((list(grads), [g.data_ptr() for g in grads]))
        return len(self.gradients) - 1

    def __call__(
        self, ids: Tensor, targets: Tensor, h0: Tensor, h_last: Tensor, grads: int
    ) -> Tensor:
        """The step with the gradients into set ``grads``; returns the loss."""
        batch, steps = ids.shape
        _check_shapes((h0, h_last), [(batch, self.hidden)] * 2)
        _check_indices("ids", ids, (batch, steps))
        _check_indices("targets", targets, (batch, steps))
        buffers, grad_pointers = self.gradients[grads]
        if [p.data_ptr() for p in self.params] != self.pointers:
            raise ValueError("a parameter's storage moved since the step was set up")
        mean = h0.new_empty(())
        status = self.kernel._lib.rnnlm_rnn_train_step(
            steps,
            batch,
            self.hidden,
            self.vocab,
            self.classes,
            ids.data_ptr(),
            targets.data_ptr(),
            h0.data_ptr(),
            *self.pointers,
            h_last.data_ptr(),
            mean.data_ptr(),
            self.grad_table.data_ptr(),
            grad_pointers[0],
            *grad_pointers[2:],
            self.kernel._threads(),
        )
        if status == -2:
            raise IndexError(f"an id is outside [0, {self.vocab})")
        if status == -3:
            raise IndexError(f"a target is outside [0, {self.classes})")
        _check(status)
        # b_ih's gradient as autograd sums it from the table's (the order sets the bits)
        torch.sum(self.grad_table, dim=0, out=buffers[1])
        return mean


class ClipSGDCall:
    """The clipping and SGD calls for fixed parameters and their (fixed) ``.grad`` tensors,
    checked and gathered once; a parameter or gradient whose storage moved is refused."""

    @staticmethod
    def of(kernel: TanhRecurrenceKernel, params: Sequence[Tensor]) -> ClipSGDCall | None:
        """The call for ``params``, or None unless every one and its gradient are contiguous
        float32 CPU tensors of the same shape."""
        if all(_steppable(p, p.grad) for p in params):
            return ClipSGDCall(kernel, params)
        return None

    def __init__(self, kernel: TanhRecurrenceKernel, params: Sequence[Tensor]) -> None:
        """Takes steppable parameters (see :meth:`of`)."""
        self.kernel, self.params = kernel, list(params)
        self.grads = [p.grad for p in params]
        self.total = sum(p.numel() for p in params)
        self.pointers = self._pointers()
        count = len(self.params)
        pointer_array = ctypes.c_void_p * count
        self.arguments = (
            count,
            pointer_array(*self.pointers[:count]),
            pointer_array(*self.pointers[count:]),
            (ctypes.c_int64 * count)(*(p.numel() for p in self.params)),
        )
        self.touched = [*self.params, *(g for g in self.grads if g is not None)]

    def _pointers(self) -> list[int | None]:
        return [*(p.data_ptr() for p in self.params), *(_ptr(p.grad) for p in self.params)]

    def _checked(self) -> None:
        if self._pointers() != self.pointers:
            raise ValueError("a parameter's or gradient's storage moved since the call was set up")

    def clip_sgd(self, max_norm: float, lr: float) -> Tensor:
        """:meth:`TanhRecurrenceKernel.clip_sgd`."""
        self._checked()
        norm = torch.empty(())
        self.kernel._lib.rnnlm_clip_sgd(*self.arguments, norm.data_ptr(), max_norm, lr)
        increment_version(self.touched)  # written in place behind autograd's back
        return norm

    def average_clip_sgd(self, slots: Tensor, max_norm: float, lr: float) -> Tensor:
        """:meth:`TanhRecurrenceKernel.average_clip_sgd`."""
        ok = slots.dtype == torch.float32 and slots.device.type == "cpu" and slots.dim() == 2
        if not (ok and slots.stride(1) == 1 and slots.shape[1] >= self.total):
            raise ValueError(f"slots must be float32 CPU rows of at least {self.total} values")
        self._checked()
        norm = torch.empty(())
        world, stride = slots.shape[0], slots.stride(0)
        self.kernel._lib.rnnlm_average_clip_sgd(
            world, slots.data_ptr(), stride, *self.arguments, norm.data_ptr(), max_norm, lr
        )
        increment_version(self.touched)
        return norm


def wrong_platform() -> str | None:
    """Why the kernel is not built for this OS/architecture, or None (Linux x86-64)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it is built for Linux x86-64, not {sys.platform} {platform.machine()}"
    return None


def why_unavailable() -> str | None:
    """Why the kernel cannot run on this machine, or None if it can (no compiling here)."""
    wrong_target = wrong_platform()
    if wrong_target:
        return wrong_target
    if not supported_isas():
        return "this CPU lacks AVX2/FMA"
    return None


def supported_isas() -> list[str]:
    """The instruction sets of :data:`ISAS` this CPU has, widest first."""
    flags = _cpu_flags()
    return [isa for isa, (_, needs) in ISAS.items() if needs <= flags]


def chosen_isa() -> str:
    """$RNNLM_CPU_CAPABILITY where set, else the widest instruction set this CPU has. Raises
    :class:`UnsupportedCapability` for a value that cannot run here, :class:`KernelUnavailable`
    when the CPU has none of them."""
    supported = supported_isas()
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    if wanted and wanted not in supported:
        why = "is not one of" if wanted not in ISAS else "is not supported by this CPU, which has"
        raise UnsupportedCapability(f"{wanted!r} {why}: {', '.join(supported) or 'none'}")
    if not supported:
        raise KernelUnavailable("this CPU lacks AVX2/FMA")
    return wanted or supported[0]


def load(cache_dir: Path, isa: str | None = None) -> TanhRecurrenceKernel:
    """Build (once) and load the kernel for ``isa`` (default :func:`chosen_isa`, which may raise
    :class:`UnsupportedCapability`); raise :class:`KernelUnavailable` saying why it cannot."""
    why = why_unavailable()
    if why:
        raise KernelUnavailable(why)
    return _load(cache_dir, isa or chosen_isa())


@functools.cache
def _load(cache_dir: Path, isa: str) -> TanhRecurrenceKernel:
    if isa not in supported_isas():
        raise KernelUnavailable(f"this CPU lacks {isa.upper()}")
    path = _built(cache_dir, isa)
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:  # e.g. a noexec temp dir, or a damaged file
        raise KernelUnavailable(f"cannot load {path}: {exc}") from None
    return TanhRecurrenceKernel(library, isa)


def build(directory: Path, isa: str) -> Path:
    """Compile the source for ``isa`` into ``directory`` (atomically: concurrent ranks may
    race)."""
    wanted = shlex.split(os.environ.get("CC") or "cc")  # CC may carry a wrapper: "ccache gcc"
    found = shutil.which(wanted[0]) if wanted else None
    if found is None and "CC" not in os.environ:
        found = shutil.which("gcc")
    if found is None:
        raise KernelUnavailable(f"no C compiler ({' '.join(wanted)}) on PATH")
    compiler = [found, *wanted[1:]]
    target = directory / library_name(isa)
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=directory, prefix=target.stem, suffix=".partial")
    os.close(fd)
    try:
        try:
            done = subprocess.run(
                [*compiler, *_flags(isa), str(SOURCE), *LIBS, "-o", partial],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            raise KernelUnavailable(f"{found} took over 300 s") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise KernelUnavailable(f"{found} failed: {first}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def library_name(isa: str) -> str:
    """One file per version of the source and flags, so an edit never loads a stale build."""
    flags = " ".join((*_flags(isa), *LIBS)).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + flags).hexdigest()
    return f"tanh_recurrence-{isa}-{digest[:16]}.so"


def _flags(isa: str) -> tuple[str, ...]:
    return CFLAGS + ISAS[isa][0]


def _built(cache_dir: Path, isa: str) -> Path:
    shipped = SOURCE.with_name(library_name(isa))
    if shipped.exists():
        return shipped
    cached = cache_dir / "native" / library_name(isa)
    if cached.exists():
        return cached
    try:
        return build(cached.parent, isa)
    except OSError as exc:  # an unwritable cache: build where this process may write
        try:
            return build(_private_temp_dir(), isa)
        except OSError:
            raise KernelUnavailable(f"cannot write the build ({exc.strerror})") from None


def _private_temp_dir() -> Path:
    """A per-user directory in the temp dir that only this user can write: a library loaded
    from a place others could write would run their code."""
    path = Path(tempfile.gettempdir()) / f"rnnlm-native-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not path.is_dir() or path.is_symlink():
        raise PermissionError(13, "not a private directory", str(path))
    return path


@functools.cache  # read once: every load asks what the CPU has
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _steppable(param: Tensor, grad: Tensor | None) -> bool:
    """Whether the clipping and SGD step can write ``param`` and its ``grad`` in place."""
    if grad is None or param.dtype != torch.float32 or grad.dtype != torch.float32:
        return False
    on_cpu = param.device.type == grad.device.type == "cpu"
    return on_cpu and param.is_contiguous() and grad.is_contiguous() and param.shape == grad.shape


def _check_shapes(tensors: tuple[Tensor, ...], shapes: list[tuple[int, ...]]) -> None:
    """The C code trusts its pointers: refuse what it would read or write out of bounds."""
    for tensor, shape in zip(tensors, shapes, strict=True):
        ok = tensor.dtype == torch.float32 and tensor.device.type == "cpu"
        if not (ok and tensor.is_contiguous() and tuple(tensor.shape) == shape):
            raise ValueError(
                f"the kernel needs contiguous float32 CPU tensors of shape {shape}, got "
                f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
            )


def _check_indices(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    """Ids or targets the C code indexes with: contiguous int64 of ``shape``."""
    if tensor.dtype != torch.int64 or not tensor.is_contiguous() or tensor.shape != shape:
        raise ValueError(f"{name} must be contiguous int64 of shape {shape}")


def _check_matrices(a: Tensor, b: Tensor, b_shape: tuple[int, int]) -> None:
    """Two float32 CPU matrices that can be multiplied; their strides describe memory torch
    owns, so the C code stays within it."""
    for matrix in (a, b):
        if matrix.dtype != torch.float32 or matrix.device.type != "cpu" or matrix.dim() != 2:
            raise ValueError(
                f"the kernel multiplies float32 CPU matrices, got {tuple(matrix.shape)} "
                f"{matrix.dtype} on {matrix.device}"
            )
    if tuple(b.shape) != b_shape:
        raise ValueError(f"cannot multiply {tuple(a.shape)} by {tuple(b.shape)}")


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the compiled kernel could not allocate its packed blocks")
