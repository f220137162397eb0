"""The one place that knows about the process group.

It alone reads torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ...), picks
gloo on CPU and nccl on CUDA, sets a finite timeout so a lost peer fails the job in minutes, and
tears the group down in ``finally``. Everyone else receives an immutable :class:`DistInfo`.
Without torchrun the same code runs as one process with no group at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from rnnlm.errors import FlagError

log = logging.getLogger(__name__)


_CPU = torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    restart_count: int = 0
    device: torch.device = _CPU
    backend: str | None = None  # None: a single process, no group
    node: int = 0  # torchrun's agent (node) of this rank
    nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def read_env(env: Mapping[str, str]) -> DistInfo:
    """Ranks and sizes as torchrun exports them (a single process when absent)."""
    return DistInfo(
        rank=int(env.get("RANK", 0)),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        world_size=int(env.get("WORLD_SIZE", 1)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        node=int(env.get("GROUP_RANK", 0)),
        nodes=int(env.get("GROUP_WORLD_SIZE", 1)),
    )


def resolve_device(flag: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU where CUDA is present, else the CPU."""
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except RuntimeError as exc:
        raise FlagError("--device", f"unknown device {flag!r}; use auto, cpu or cuda.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FlagError("--device", "CUDA is not available here; use --device cpu.")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise FlagError("--device", f"unsupported device {flag!r}; use auto, cpu or cuda.")
    return device


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit), which affinity does not show."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota here
    return cores


def share_cores(info: DistInfo) -> None:
    """Give each rank of this node its share of the cores, whatever its device: a GPU rank's
    CPU work (data, clipping, the launcher's OMP_NUM_THREADS taken from the pod's CPU limit)
    would otherwise run every core's worth of threads in every rank."""
    if info.local_world_size > 1:
        torch.set_num_threads(threads_per_rank(info.local_world_size))


def threads_per_rank(local_world_size: int) -> int:
    """Share the cores among the ranks of this node: with more OpenMP threads than cores, the
    threads of an RNN's small matrix products wait on one another far longer than they
    compute."""
    return max(1, available_cores() // local_world_size)


@contextlib.contextmanager
def process_group(device_flag: str = "auto", timeout_s: float = 300.0) -> Iterator[DistInfo]:
    """Join the torchrun job this process belongs to (if any) and leave it on the way out."""
    info = read_env(os.environ)
    device = resolve_device(device_flag, info.local_rank)
    share_cores(info)
    backend = None
    if info.world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        _init_group(info, backend, timedelta(seconds=timeout_s))
    info = dataclasses.replace(info, device=device, backend=backend)
    try:
        yield info
        _leave_together()
    finally:
        if dist.is_initialized():
            # A DDP module (it holds the group) may sit in a reference cycle: freed only at
            # interpreter exit, gloo's teardown now and then aborts (pytorch/pytorch#190489).
            gc.collect()
            dist.destroy_process_group()


def _leave_together() -> None:
    """No rank destroys its group while a peer may still be in a collective with it. Best
    effort: the job's work is done, so a failed wait is only a warning."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except Exception as exc:
        log.warning("ranks did not meet before teardown: %s", str(exc).splitlines()[0][:200])


def _init_group(info: DistInfo, backend: str, timeout: timedelta) -> None:
    # Under torchrun the launcher hosts the rendezvous store. A prefix with the restart count
    # keeps a restarted group from reading the peer addresses the previous group left there
    # (gloo then refuses the connection or hangs after --max-restarts).
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        info.world_size,
        is_master=not agent_store and info.rank == 0,
        timeout=timeout,
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"rnnlm/restart{info.restart_count}", store),
        rank=info.rank,
        world_size=info.world_size,
        timeout=timeout,
    )
    log.info("joined %s group: rank %d of %d", backend, info.rank, info.world_size)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (a no-op in one process)."""
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def from_main(value: Any, info: DistInfo) -> Any:
    """``value`` as the main rank has it, on every rank (pickled: small objects only)."""
    box = [value]
    if info.is_distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


class StopVote:
    """Whether any rank wants to stop, agreed by all ranks at the same step.

    Every rank must leave at the same minibatch (one that stops alone leaves the others in a
    collective). The flag rides on DDP's gradient all-reduce (see :func:`wrap_model`).
    """

    def __init__(self, local: Callable[[], bool]) -> None:
        self.local = local
        self.stopping = False
        self.summed: torch.Tensor | None = None  # ranks that want to stop, from the last step

    def decide(self, distributed: bool) -> bool:
        """After a step: whether every rank stops now (read on the host once per step)."""
        if not distributed:
            self.stopping = self.stopping or self.local()
        elif self.summed is not None:
            self.stopping = self.stopping or bool(self.summed.item() > 0)
        return self.stopping


def wrap_model(module: nn.Module, info: DistInfo, vote: StopVote) -> nn.Module:
    """The module itself in one process; across ranks its DDP wrapper, whose gradient
    all-reduce also carries every rank's stop flag."""
    if not info.is_distributed:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Gradients as views of DDP's bucket: the averaged bucket is not copied back into them.
    ddp = DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
    ddp.register_comm_hook(vote, _average_with_stop_flag)
    return ddp


# No annotations on the hook: DDP checks them against its own types, and this module's
# postponed (string) annotations would fail that check.
def _average_with_stop_flag(vote, bucket):
    """DDP's own averaging (``allreduce_hook``: divide by the world size, sum over the ranks)
    for every bucket, except that the first carries one more element: this rank's stop flag,
    which the same sum turns into the number of ranks that want to stop."""
    if bucket.index() != 0:
        world = dist.group.WORLD
        assert world is not None  # the hook runs inside the job's process group
        return default_hooks.allreduce_hook(world, bucket)
    grads = bucket.buffer()
    flat = torch.empty(grads.numel() + 1, dtype=grads.dtype, device=grads.device)
    torch.div(grads, dist.get_world_size(), out=flat[:-1])
    flat[-1] = float(vote.local())
    done = dist.all_reduce(flat, async_op=True).get_future()

    def unpack(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        summed = fut.value()[0]
        vote.summed = summed[-1]
        grads.copy_(summed[:-1])
        return grads

    return done.then(unpack)
