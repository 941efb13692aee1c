"""``benchmarks/loss_bench.py`` still runs, so a GPU call does not find it broken: its CPU smoke case, and
the per-chunk phases it prints on CUDA, here in Triton's interpreter (set before triton is imported, hence
subprocesses)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PHASES = r"""
import time, torch
from benchmarks.chunk_phases import print_phases

def bench_ms(fn, params, device):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3

gen = torch.Generator().manual_seed(0)
hidden, weight = torch.randn(64, 32, generator=gen), torch.randn(5000, 32, generator=gen) / 32**0.5
print_phases(hidden, weight, torch.randint(0, 5000, (64,), generator=gen), -100, bench_ms, torch.device("cpu"))
"""


def _run(args, **env):
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_smoke_case_times_and_checks_each_loss():
    out = _run(["benchmarks/loss_bench.py", "--smoke", "--losses", "chunked,chunked_filter,materialized_eager"])
    table = out.split("\nshape ")[-1].splitlines()[1:]  # the final table, after its header
    rows = [line for line in table if line.startswith("tiny")]
    assert len(rows) == 6 and all(row.split()[-1] == "ok" for row in rows), out


def test_chunk_phases_time_every_phase():
    pytest.importorskip("triton")
    out = _run(["-c", PHASES], TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    names = [
        "logits GEMM",
        "row statistics pass",
        "logit gradient pass",
        "dH GEMM",
        "dW GEMM adding",
        "dW GEMM writing",
        "sum",
    ]
    assert [name for name in names if name in out] == names, out
