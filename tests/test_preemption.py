"""A signal (Slurm preemption: SIGTERM, or SIGUSR1 with --signal) ends the step, checkpoints, exits 0."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_utils import train_command
from training.metrics.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


def _command(folder, nproc):
    return train_command(
        nproc, folder, "--training.steps", str(STEPS), "--checkpoint.enable", "--checkpoint.interval", "1000"
    )


def _losses(folder):
    return {r["step"]: r["loss"] for r in read_metrics(Path(folder) / "metrics.jsonl")}


def _signal_after_step_2(proc, folder, signum, nproc):
    metrics = Path(folder) / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.exists() and len(read_metrics(metrics)) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    if nproc == 1:
        proc.send_signal(signum)
    else:  # what the batch script's trap does: signal the training processes, not torchrun
        workers = subprocess.run(["pgrep", "-f", f"train.py.*{folder}"], capture_output=True, text=True).stdout.split()
        for pid in workers:
            if int(pid) != proc.pid:
                os.kill(int(pid), signum)


@pytest.mark.multiprocess
@pytest.mark.parametrize("nproc, signum", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_signal_checkpoints_and_the_rerun_continues_exactly(tmp_path, nproc, signum):
    straight = subprocess.run(
        _command(tmp_path / "straight", nproc), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert straight.returncode == 0, straight.stderr[-2000:]

    folder = tmp_path / "preempted"
    proc = subprocess.Popen(
        _command(folder, nproc), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _signal_after_step_2(proc, folder, signum, nproc)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopping after step" in out + err
    saved = [p.name for p in (folder / "checkpoint").iterdir()]
    assert len(saved) == 1 and saved[0] != f"step-{STEPS}", saved
    assert not (folder / "run.lock").exists()  # released on the way out

    rerun = subprocess.run(_command(folder, nproc), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _losses(folder) == _losses(tmp_path / "straight")
