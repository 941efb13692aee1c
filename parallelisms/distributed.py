"""Process-group start-up: NCCL on CUDA, gloo on CPU, one code path for one or many ranks."""

import datetime
import os
import socket

import torch
import torch.distributed as dist

from training.errors import ConfigError


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


def init_distributed(device: torch.device, timeout_seconds: int = 600) -> tuple[int, int]:
    """Start (or join) the default process group; returns (rank, world_size).

    A plain ``python train.py`` becomes a world of one so that FSDP's mixed
    precision and every other code path are the same as under ``torchrun``.
    """
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds),
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size()
