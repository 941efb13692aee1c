"""A logged step's device figures: the peak FLOPs behind MFU, peak memory (every pipeline rank's), tokens/s."""

import contextlib
import functools
import resource
import time
from typing import Optional

import torch
import torch.distributed as dist

# Dense bf16 peak of the GPUs we run on, for MFU.
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


@functools.cache
def peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak (None off CUDA or for an unknown GPU); asked once per device."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """GPU: peak allocated by PyTorch. CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def gather_peak_memory_gib(device: torch.device, group: Optional[dist.ProcessGroup] = None) -> list[float]:
    """Every rank's ``peak_memory_gib`` in the order of ``group`` (default: the world)."""
    mine = torch.tensor([peak_memory_gib(device)], dtype=torch.float64, device=device)
    peaks = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(peaks, mine, group=group)
    return [peak.item() for peak in peaks]


def pipeline_peak_memory(device: torch.device, pp_group: dist.ProcessGroup) -> dict[str, float]:
    """``peak_memory_gib/pp_rank_<r>`` for every pipeline rank: its stages hold different layers (the
    first the embedding, the last the head and loss), so rank 0's figure alone misleads."""
    peaks = gather_peak_memory_gib(device, pp_group)
    return {f"peak_memory_gib/pp_rank_{r}": peak for r, peak in enumerate(peaks)}


class Throughput:
    """Tokens per second per rank over the steps since the last ``read``; time spent ``paused()``
    (validation) is left out."""

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the steps' kernels are done, not just queued
        rate = self.tokens / (time.perf_counter() - self.start) / self.world_size
        self.start, self.tokens = time.perf_counter(), 0
        return rate

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        yield
        self.start += time.perf_counter() - began
