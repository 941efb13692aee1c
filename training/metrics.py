"""Per-step figures: one console line, ``metrics.jsonl``, and TensorBoard when enabled."""

import contextlib
import functools
import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("train")

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


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """Written by rank 0 only; figures are already reduced across ranks."""

    def __init__(self, dump_folder: str, enable_tensorboard: bool, active: bool, append: bool):
        self.active = active
        self.writer = None
        if not active:
            return
        folder = Path(dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(folder / "metrics.jsonl", "a" if append else "w")  # a resumed run continues it
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, step: int, total_steps: int, figures: dict, eta_seconds: float, note: str = "") -> None:
        """One console line and one JSON line; the console line says which figures were non-finite and
        why (``note``)."""
        if not self.active:
            return
        note = self._write(step, figures, note)
        mfu = f"  mfu {figures['mfu_percent']:5.1f}%" if figures.get("mfu_percent") is not None else ""
        logger.info(
            f"step {step:>{len(str(total_steps))}}/{total_steps}  loss {figures['loss']:.4f}  lr {figures['lr']:.2e}"
            f"  grad_norm {figures['grad_norm']:.3f}  tok/s {figures['tokens_per_second']:,.0f}{mfu}"
            f"  mem {figures['peak_memory_gib']:.2f}GiB  eta {_duration(eta_seconds)}" + (f"  ({note})" if note else "")
        )

    def log_validation(self, step: int, total_steps: int, figures: dict) -> None:
        """``validation_loss`` and ``validation_perplexity``: a record and a console line of their own."""
        if not self.active:
            return
        note = self._write(step, figures, "")
        logger.info(
            f"step {step:>{len(str(total_steps))}}/{total_steps}  validation_loss "
            f"{figures['validation_loss']:.4f}  validation_perplexity {figures['validation_perplexity']:.2f}"
            + (f"  ({note})" if note else "")
        )

    def _write(self, step: int, figures: dict, note: str) -> str:
        """One JSON line and the TensorBoard scalars. A non-finite figure is written as JSON ``null``
        (strict parsers reject a bare NaN); returns ``note`` prefixed with the figures that were."""
        finite = {k: v if v is None or math.isfinite(v) else None for k, v in figures.items()}
        self.jsonl.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in finite.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)
        bad = [k for k, v in figures.items() if finite[k] is None and v is not None]
        return f"non-finite {', '.join(bad)}" + (f": {note}" if note else "") if bad else note

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
