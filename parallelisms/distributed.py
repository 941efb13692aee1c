"""Process-group start-up: NCCL on CUDA, gloo on CPU, one code path for one or many ranks."""

import datetime
import gc
import os
import socket
import weakref
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from config.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(choice: str) -> torch.device:
    """``auto`` means the local GPU under torchrun when CUDA exists, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device", "'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_seconds: int) -> tuple[int, int]:
    """Start (or join) the default process group; returns (rank, world_size).

    A plain ``python train.py`` becomes a world of one so that FSDP's mixed
    precision and every other code path are the same as under ``torchrun``.
    ``timeout_seconds`` (``comm.init_timeout_seconds``) bounds every collective
    until ``set_pg_timeouts`` replaces it.
    """
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(
                RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=datetime.timedelta(seconds=timeout_seconds),
            device_id=device if device.type == "cuda" else None,
        )
    return dist.get_rank(), dist.get_world_size()


# Every root mesh this process built: DTensor's caches keep meshes alive after the run, and a root
# mesh keeps its dimensions' process groups; close_distributed takes those groups from them.
_ROOT_MESHES: "weakref.WeakSet[DeviceMesh]" = weakref.WeakSet()


def init_mesh(device_type: str, shape: tuple[int, ...], dim_names: tuple[str, ...]) -> DeviceMesh:
    """``init_device_mesh``, remembered so that ``close_distributed`` can let go of its groups."""
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=dim_names)
    _ROOT_MESHES.add(mesh)
    return mesh


def close_distributed() -> None:
    """Destroy every process group and let go of them, so each one's worker threads end now.

    A gloo worker frees the collective it has just run, output tensors included, and freeing a tensor
    that Python has dropped takes the GIL. If the interpreter is already shutting down by then, the
    thread is killed inside a C++ destructor and the process aborts ("terminate called without an
    active exception") after a run that succeeded. A group joins its workers when its last reference
    goes, and destroy_process_group drops only c10d's own: the meshes (kept alive by DTensor's caches),
    FSDP states and pipeline stages hold the others. Call this last, once nothing uses a group.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    for mesh in list(_ROOT_MESHES):
        getattr(mesh, "_pg_registry", {}).clear()  # where torch keeps them: a root mesh's groups by name
    _ROOT_MESHES.clear()
    gc.collect()  # FSDP states and pipeline stages hold groups inside reference cycles


def set_pg_timeouts(timeout_seconds: int, device: torch.device, exclude: tuple = ()) -> None:
    """Give every process group this rank belongs to a new collective timeout (TorchTitan's ``set_pg_timeouts``).

    Groups made after ``init_process_group`` (the mesh's, the tied-embedding pairs)
    start with the backend's default (30 min for gloo), so all of them are set but
    ``exclude`` (``None`` entries ignored): an async checkpoint's group runs a whole
    save in the background and keeps its long default. The barrier first: a rank
    still in a slow start-up collective must not be held to the new, shorter limit
    by a faster peer.
    """
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
        torch.cuda.synchronize(device)
    else:
        dist.barrier()
    timeout = datetime.timedelta(seconds=timeout_seconds)
    for group in list(c10d._world.pg_map):
        if group not in exclude:
            c10d._set_pg_timeout(timeout, group)


def on_rank0(action: Callable[[], None]) -> Optional[OSError]:
    """Run the file operation ``action`` on rank 0 and give every rank its error (None: done), so that every
    rank raises the same error rather than the others waiting for rank 0 in the next collective."""
    failure = [None]
    if dist.get_rank() == 0:
        try:
            action()
        except OSError as err:
            failure[0] = err
    dist.broadcast_object_list(failure, src=0)
    return failure[0]
