"""DDP's gradient all-reduce through shared memory, for CPU ranks on one host.

Why: on CPU, gloo sends the gradients between two processes on the same host over loopback
TCP. For the chapter's model (~80k gradients) that took 4.8 ms of a 12.2 ms 2-rank step,
measured side by side with the same step without any exchange (7.3 ms). Through a shared
memory segment the exchange is two copies and a sum: tens of microseconds.

The protocol, for the k-th call of the hook (one call per DDP bucket, in the same bucket order
on every rank): rank r writes its gradients, pre-divided by the world size as DDP's own hook
does, into slot ``[k % 2][r]``, and its stop flag beside them, then announces ``arrived[r] = k``
and waits until every rank has announced k. Each rank then sums the slots in rank order, so
every replica computes the same bits. Double buffering by the parity of k is what makes one
counter per rank enough: a rank overwrites parity ``k % 2`` only at call k + 2, which it reaches
only after every peer announced k + 1, which a peer does only after it finished reading call k.

The stop flags ride along, so agreeing on a SIGTERM costs no extra collective per step.

The compiled training step (:class:`rnnlm.loop.CompiledStep`) runs no DDP hook: its kernel writes
the rank's gradients, undivided, straight into its slot (:meth:`SharedMemoryAllReduce.own_slot`),
and after :meth:`SharedMemoryAllReduce.gather` one C call divides, sums in rank order, clips and
steps: the same bits without the division's pass into the slot and the sum's call.

The epoch's totals (a few float64 sums: loss, tokens, each rank's rate) take the same route,
:meth:`SharedMemoryAllReduce.sum_float64`, as one more call in the same sequence: through gloo,
a collective issued while both cores are busy training waited ~3 ms (median) for gloo's
threads to be scheduled, ~10% of an 8-step epoch of the chapter's setup on two ranks.

Ordering relies on x86-64's total store order (stores are seen in program order), so the
segment is used only there, on Linux; elsewhere, across hosts and on CUDA the process group's
backend all-reduces as usual.
"""

# No "from __future__ import annotations": DDP compares the hook's annotations with the real
# types (dist.GradBucket, Future[Tensor]), which strings would fail.

import logging
import mmap
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rnnlm.distributed import DistInfo
from rnnlm.errors import FlagError

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_LIVENESS_EVERY_S = 0.2  # how often a waiting rank checks that its missing peers still exist
# Waiting for peers: busy polls first (a peer in the same step arrives within microseconds),
# then polls that yield the core, then, after a while, naps between polls: a peer sampling text
# or writing a checkpoint can take seconds, and a spinning rank would keep a core from it.
_SPINS_BEFORE_YIELD = 200
_YIELD_FOR_S = 0.002
_NAP_S = 0.0001
SUM_CAPACITY = 64  # float64 values per rank for sum_float64; more go through the backend


class SharedMemoryAllReduce:
    """The segment, this rank's views of it, and the hook state. Build it with :func:`attach`."""

    def __init__(
        self,
        segment: mmap.mmap,
        info: DistInfo,
        slot_floats: int,
        timeout_s: float,
        stop_requested: Callable[[], bool],
    ) -> None:
        world = info.world_size
        self.segment, self.rank, self.world = segment, info.rank, world
        self.timeout_s, self.stop_requested = timeout_s, stop_requested
        counters = np.frombuffer(segment, dtype=np.int64, count=world * 4)
        self.arrived = counters[:world]  # the last call each rank has written
        self.flags = counters[world : 3 * world].reshape(2, world)  # stop flags per parity
        self.pids = counters[3 * world :]  # for the liveness check of a waiting rank
        self.pids[self.rank] = os.getpid()
        self.slots = torch.frombuffer(
            segment, dtype=torch.float32, count=2 * world * slot_floats, offset=counters.nbytes
        ).view(2, world, slot_floats)
        self.sums = torch.frombuffer(
            segment,
            dtype=torch.float64,
            count=2 * world * SUM_CAPACITY,
            offset=counters.nbytes + self.slots.numel() * 4,
        ).view(2, world, SUM_CAPACITY)
        self.calls = 0
        self.stop_agreed = False  # whether any rank's stop flag was set at the last call

    @staticmethod
    def segment_bytes(world: int, slot_floats: int) -> int:
        return world * 4 * 8 + 2 * world * (slot_floats * 4 + SUM_CAPACITY * 8)

    def all_reduce(self, grads: torch.Tensor) -> torch.Tensor:
        """Average ``grads`` (this rank's, one bucket) over the ranks, in place."""
        torch.div(grads, self.world, out=self.own_slot(grads.numel()))
        _sum_in_rank_order(self.gather(grads.numel()), out=grads)
        return grads

    def own_slot(self, numel: int) -> torch.Tensor:
        """This rank's slot for the next :meth:`gather` (its first ``numel`` floats): a caller
        that averages the gathered gradients itself writes its own straight into it."""
        return self.slots[(self.calls + 1) % 2, self.rank, :numel]

    def gather(self, numel: int) -> torch.Tensor:
        """Collective: once every rank has filled its :meth:`own_slot`, all of them, (world,
        numel) in rank order, as a view of the segment that stays valid until this rank's next
        call (a peer overwrites it only after this rank has announced the call after next)."""
        self.calls += 1
        parity = self.calls % 2
        self.flags[parity, self.rank] = int(self.stop_requested())
        self._publish_and_wait()
        self.stop_agreed = bool(self.flags[parity].any())
        return self.slots[parity, :, :numel]

    def sum_float64(self, values: torch.Tensor) -> torch.Tensor:
        """Collective: sum a few float64 ``values`` over the ranks, in place; every rank gets
        the same bits. Longer tensors than :data:`SUM_CAPACITY` go through the backend."""
        if values.dtype != torch.float64 or values.device.type != "cpu":
            raise ValueError(
                f"sum_float64 takes float64 CPU tensors, got {values.dtype} on {values.device}"
            )
        if values.numel() > SUM_CAPACITY:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            return values
        self.calls += 1
        slots = self.sums[self.calls % 2, :, : values.numel()]
        slots[self.rank].copy_(values.reshape(-1))
        self._publish_and_wait()
        _sum_in_rank_order(slots, out=values.view(-1))
        return values

    def _publish_and_wait(self) -> None:
        self.arrived[self.rank] = self.calls  # published after the data (x86-64 store order)
        self._wait_for_peers()

    def _wait_for_peers(self) -> None:
        spins = 0
        started = next_check = time.monotonic()
        while (self.arrived < self.calls).any():
            spins += 1
            if spins < _SPINS_BEFORE_YIELD:
                continue
            now = time.monotonic()
            if now - started < _YIELD_FOR_S:
                os.sched_yield()  # more ranks than cores must not starve the peer we wait for
            else:
                time.sleep(_NAP_S)
            if now < next_check:
                continue
            next_check = now + _LIVENESS_EVERY_S
            missing = [r for r in range(self.world) if self.arrived[r] < self.calls]
            dead = [r for r in missing if not _alive(int(self.pids[r]))]
            if dead:
                raise RuntimeError(
                    f"rank {self.rank}: rank(s) {dead} exited before their part of exchange "
                    f"{self.calls} (gradients or epoch sums)"
                )
            if now - started > self.timeout_s:
                raise RuntimeError(
                    f"rank {self.rank}: timed out after {self.timeout_s:g} s (--dist-timeout) "
                    f"waiting for rank(s) {missing} (gradients or epoch sums)"
                )


def _sum_in_rank_order(slots: torch.Tensor, out: torch.Tensor) -> None:
    """``out = slots[0] + slots[1] + ...``: the same additions in the same order on every rank."""
    torch.add(slots[0], slots[1], out=out)
    for other in range(2, slots.shape[0]):
        out.add_(slots[other])


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by torchrun, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _hook(
    state: SharedMemoryAllReduce, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(state.all_reduce(bucket.buffer()))
    return done


def attach(
    ddp: DistributedDataParallel,
    module: nn.Module,
    info: DistInfo,
    mode: str,
    timeout_s: float,
    stop_requested: Callable[[], bool],
) -> SharedMemoryAllReduce | None:
    """Collective. Route ``ddp``'s gradient all-reduce through shared memory when ``mode`` is
    ``shm``, or ``auto`` and every rank runs on this host's CPU; None when the backend keeps it.
    """
    if mode == "backend" or not info.is_distributed:
        return None
    params = [p for p in module.parameters() if p.requires_grad]
    why_not = _ineligible(info, params)
    if why_not is not None:
        if mode == "shm":
            raise FlagError("--allreduce", f"shm {why_not}; use --allreduce auto or backend.")
        log.info("gradients all-reduced by %s: %s", info.backend, why_not)
        return None
    slot_floats = sum(p.numel() for p in params)  # no bucket is larger than all gradients
    segment = _open_segment(info, SharedMemoryAllReduce.segment_bytes(info.world_size, slot_floats))
    if segment is None:
        if mode == "shm":
            raise FlagError("--allreduce", f"no room for gradients in {SHM_DIR}; use auto.")
        return None
    exchange = SharedMemoryAllReduce(segment, info, slot_floats, timeout_s, stop_requested)
    dist.barrier()  # every pid is written before anyone may check it
    ddp.register_comm_hook(exchange, _hook)
    log.info("gradients all-reduced through shared memory (%d ranks)", info.world_size)
    return exchange


def _ineligible(info: DistInfo, params: list[nn.Parameter]) -> str | None:
    """Collective: why the shared segment cannot serve this job (the same answer on every
    rank), or None."""
    hosts: list[tuple[str, ...] | None] = [None] * info.world_size
    dist.all_gather_object(hosts, host_identity(info.device.type))
    return why_not_shared([h for h in hosts if h is not None], params)


def host_identity(device_type: str) -> tuple[str, ...]:
    """What ranks sharing a segment must have in common. Containers of one node share the
    boot id but not their hostname (nor, in Kubernetes, their /dev/shm)."""
    return (socket.gethostname(), _boot_id(), sys.platform, platform.machine().lower(), device_type)


def why_not_shared(identities: list[tuple[str, ...]], params: list[nn.Parameter]) -> str | None:
    """Why ranks with these :func:`host_identity` values cannot average ``params``' gradients
    through shared memory, or None when they can."""
    if len(set(identities)) != 1:
        return "needs every rank on one host"
    _host, _boot, system, machine, device_type = identities[0]
    if device_type != "cpu":
        return "is for CPU ranks"
    if system != "linux" or machine not in ("x86_64", "amd64"):
        return "needs Linux on x86-64"
    if any(p.dtype != torch.float32 for p in params):
        return "needs float32 gradients"
    return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _open_segment(info: DistInfo, size: int) -> mmap.mmap | None:
    """Collective. Rank 0 creates a file in /dev/shm with every page reserved (a full tmpfs
    fails here, not with SIGBUS mid-training); all ranks map it; it is unlinked as soon as all
    have, so nothing is left behind however the job ends."""
    path: str | None = None
    if info.is_main:
        try:
            fd, path = tempfile.mkstemp(prefix="rnnlm-grads-", dir=SHM_DIR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("no shared memory for gradients (%s): using %s", exc, info.backend)
            if path is not None:
                os.unlink(path)
            path = None
    shared = [path]
    dist.broadcast_object_list(shared, src=0)
    path = shared[0]
    segment = None
    if path is not None:
        try:
            with open(path, "r+b") as handle:
                segment = mmap.mmap(handle.fileno(), size)
        except OSError as exc:
            log.warning("cannot map %s (%s): using %s", path, exc, info.backend)
    mapped: list[bool | None] = [None] * info.world_size
    dist.all_gather_object(mapped, segment is not None)
    if info.is_main and path is not None:
        os.unlink(path)
    return segment if all(mapped) else None
