"""Distributed helpers that degrade to a single process.

``python run.py ...`` runs as one process without any process group; ``torchrun --nproc_per_node=N
run.py ...`` (one or several machines) initialises a process group from the ``env://`` variables torchrun
sets: NCCL on CUDA, gloo on CPU. Every helper below works in both cases, so the rest of the code never
calls ``torch.distributed`` directly.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from utils.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when the launcher set the ``env://`` rendezvous variables (torchrun, SLURM wrappers)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group when launched by torchrun; otherwise a single CPU/GPU process.

    Args:
        device: "cuda", "cpu" or None (CUDA when available).
        timeout_s: collective timeout; long enough for the first filtering scan on rank 0.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            store=_rendezvous_store(timeout),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
            **kwargs,
        )
    return DistInfo(get_rank(), get_world_size(), local_rank, dev)


def _rendezvous_store(timeout: datetime.timedelta) -> dist.Store:
    """The ``env://`` key-value store, namespaced by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts the workers, the store still holds the previous attempt's
    keys, and gloo would try to connect to the dead workers' addresses. A prefix per attempt keeps each
    attempt's process group to itself.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Under torchrun the agent hosts the store; launched otherwise, rank 0 hosts it.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=(rank == 0 and not agent_store),
        timeout=timeout,
        wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"lgkd/attempt_{attempt}", store)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper, else ``model`` itself.

    The reference's checkpoints, parameter names and regulariser states are those of the wrapped model
    (``module.`` prefix); code that reads or loads weights works on the unwrapped one.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (identity with one process) and return it."""
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank (identity with one process)."""
    if not is_dist_avail_and_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` with one process)."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; if it raises a UserError, every rank raises it (the others would otherwise
    wait in their next collective until the launcher kills them)."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except UserError as err:
            error = err
    if get_world_size() > 1:
        error = broadcast_object(error)
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Let rank 0 run the body first (e.g. write a cache) while the others wait, then the others run it."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def cleanup(synchronize: bool = False) -> None:
    """Destroy the process group.

    ``synchronize=True`` (every rank finished normally) first waits at a barrier: a gloo rank that tears
    its connections down while a peer is still inside its last collective makes that peer abort
    ("terminate called without an active exception", seen under CPU load). After a failure the peers
    may never arrive, so the barrier is skipped then.
    """
    if is_dist_avail_and_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
