"""The GPU a run is planned for: its memory, and the table of rates its pieces achieve.

The run plans for its own GPU (``for_device``: the table whose kind the device's name holds,
the smallest memory of the job's GPUs); ``--dry_run --gpu h100|h200`` plans for a kind on a
CPU (``of_kind``). A GPU with no table of its own, and a run with no GPU (the CPU), are planned
with the ``DEFAULT_GPU`` table, and the plan says so: its stage times are then that GPU's,
which changes the balance of the split and the schedule's ranking little, the step's
prediction more.
"""

import re
from dataclasses import dataclass
from typing import Optional

from planning.cost import DEFAULT_GPU, RATES, AchievedRates


@dataclass(frozen=True)
class GPU:
    kind: str  # the rate table's: a file of planning/rates/
    memory_gib: Optional[float]  # what every rank's memory is held to; None: no size (a CPU run)
    rates: AchievedRates
    note: str = ""  # how the table was picked when it is not the device's own

    def describe(self) -> str:
        size = f"{self.memory_gib:g} GiB" if self.memory_gib is not None else "no memory limit"
        return f"{self.kind.upper()} rates ({self.rates.gpu}), {size}" + (f"; {self.note}" if self.note else "")


def gpu_kind(name: str) -> str:
    """The rate table's name for the GPU torch calls ``name``: its model, "NVIDIA H100 80GB HBM3" -> "h100"."""
    model = re.search(r"\b[A-Z]+\d+[A-Z]*\b", name.upper())
    return model.group(0).lower() if model else re.sub(r"\W+", "_", name.lower())


def of_kind(kind: str, memory_gib: Optional[float] = None) -> GPU:
    """``kind``'s table, held to ``memory_gib`` (None: the table's own GPU's memory)."""
    rates = RATES[kind]
    return GPU(kind, rates.memory_gib if memory_gib is None else memory_gib, rates)


def for_device(name: Optional[str], memory_gib: Optional[float]) -> GPU:
    """The table of the GPU named ``name`` (as torch names it; None: no GPU), held to ``memory_gib``."""
    if name is None:
        return GPU(DEFAULT_GPU, None, RATES[DEFAULT_GPU], f"no GPU: planned with the {DEFAULT_GPU.upper()} table")
    kind = gpu_kind(name)
    if kind in RATES:
        return GPU(kind, memory_gib, RATES[kind])
    measured = ", ".join(k.upper() for k in RATES)
    note = (
        f"no rate table for {name} (measured: {measured}): planned with the {DEFAULT_GPU.upper()} table; "
        "write one with benchmarks/stage_cost_bench.py --write"
    )
    return GPU(DEFAULT_GPU, memory_gib, RATES[DEFAULT_GPU], note)
