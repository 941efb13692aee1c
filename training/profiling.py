"""``[profiling]``: torch.profiler traces of every N-th step, one file per rank (TorchTitan's layout).

Open a trace in https://ui.perfetto.dev or chrome://tracing; ``scripts/trace_summary.py``
prints where a traced step's GPU time went.
"""

import logging
import os
from typing import Optional

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from config.job_config import Profiling

logger = logging.getLogger("train")


def start_profiler(
    cfg: Profiling, dump_folder: str, rank: int, start_step: int, last_step: int
) -> Optional[torch.profiler.profile]:
    """A started profiler to ``step()`` after each training step and ``stop()`` after the loop,
    or None when profiling is off.

    Steps are numbered as the run numbers them (a resumed run continues the count), and
    ``<dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json`` holds step ``step``.
    """
    if not cfg.enable_profiling:
        return None
    folder = os.path.join(dump_folder, cfg.save_traces_folder)

    def save(prof: torch.profiler.profile) -> None:
        out = os.path.join(folder, f"iteration_{prof.step_num}")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"rank{rank}_trace.json")
        prof.export_chrome_trace(path)
        logger.info(f"profiler trace of step {prof.step_num}: {path}")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    # wait, warm up one step, record one: the recorded step is the profile_freq-th of each cycle.
    cycle = torch.profiler.schedule(wait=cfg.profile_freq - 2, warmup=1, active=1)

    def schedule(done: int) -> ProfilerAction:
        """The action for step ``done + 1``: nothing past the last step, nor a warm-up for it."""
        action = cycle(done)
        return ProfilerAction.NONE if done + (action == ProfilerAction.WARMUP) >= last_step else action

    prof = torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=save)
    prof.step_num = start_step  # step() follows each training step, so step_num is the step last done
    prof.start()
    return prof
