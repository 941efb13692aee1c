"""What ``metrics.jsonl`` holds, and how a reader gets the curves of the run that continued.

One JSON object per line, appended by every run into the folder (a rerun, a resume, a rollback):

- a run record first, ``{"event": "start" | "resume", "step": N, "time", "host", "pid"}``: the run continues
  after step N (0: from scratch), and ``"rolled_back_from": M`` when the file already holds steps up to M > N;
- a step record per logged step, ``{"step", "loss", "lr", ...}``, and a validation record per validation,
  ``{"step", "validation_loss", "validation_perplexity"}``.

Records of steps > N written before a run record of step N belong to a branch that did not continue (a
rollback, or steps logged after the last checkpoint before a crash): ``continued_branch`` drops them. No
torch here: ``scripts/plot_metrics.py`` reads the file through this module.
"""

import json
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

_TAIL_BYTES = 1 << 16  # enough for the last few records of any run


def run_record(step: int, last_step: Optional[int]) -> dict:
    """The record a run starts its part of the file with; ``last_step``: the file's last step, if any."""
    record = {
        "event": "resume" if step > 0 else "start",
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if last_step is not None and last_step > step:
        record["rolled_back_from"] = last_step
    return record


def _record(line: str) -> Optional[dict]:
    """A line's record: a JSON object with an integer ``step``; None for anything else."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, int) and not isinstance(step, bool) else None


def last_step(path: Path) -> Optional[int]:
    """The step of the last record in ``path`` (None: no file, or no record), read from its end."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    if size > _TAIL_BYTES:
        lines = lines[1:]  # the first one is cut
    for line in reversed(lines):
        record = _record(line)
        if record is not None:
            return record["step"]
    return None


def parse(lines: Iterable[str]) -> tuple[list[dict], list[int]]:
    """Every record, in file order, and the numbers (from 1) of the non-blank lines that are not records."""
    records, bad = [], []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            record = _record(line)
            if record is None:
                bad.append(number)
            else:
                records.append(record)
    return records, bad


def continued_branch(records: list[dict]) -> list[dict]:
    """The step and validation records of the branch that continued, in file order: a run record of step N
    drops the records of steps > N written before it."""
    kept = []
    for record in records:
        if "event" in record:
            kept = [r for r in kept if r["step"] <= record["step"]]
        else:
            kept.append(record)
    return kept


def read_metrics(path: Path) -> list[dict]:
    """The continued branch's records of ``path`` (a metrics.jsonl); lines that are not records are skipped."""
    with open(path) as f:
        return continued_branch(parse(f)[0])
