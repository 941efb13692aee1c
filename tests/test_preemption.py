"""A signal (Slurm preemption: SIGTERM, or SIGUSR1 with --signal) ends the step, checkpoints, exits 0: sent to
train.py itself, or to the launcher that run_train.sh and slurm_launch.sh start (scripts/torchrun.py)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.dist_utils import Launched, train_command
from training.metrics.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60


def _command(folder, nproc, launcher=False):
    """train.py under torchrun (plain python for 1 process), or with ``launcher`` as run_train.sh starts it."""
    command = train_command(
        nproc, folder, "--training.steps", str(STEPS), "--checkpoint.enable", "--checkpoint.interval", "1000"
    )
    # run_train.sh's recipe is configs/debug.toml too; its other arguments go to train.py
    return ["./run_train.sh", *command[command.index("configs/debug.toml") + 1 :]] if launcher else command


def _losses(folder):
    return {r["step"]: r["loss"] for r in read_metrics(Path(folder) / "metrics.jsonl")}


def _signal_after_step_2(proc, folder, signum):
    metrics = Path(folder) / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if metrics.exists() and len(read_metrics(metrics)) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "nproc, signum, to",
    [(1, signal.SIGUSR1, "train.py"), (2, signal.SIGTERM, "the launcher")],  # the ranks get it from the launcher
)
def test_signal_checkpoints_and_the_rerun_continues_exactly(tmp_path, nproc, signum, to):
    """The straight run, the reference, goes on beside the preempted one and its rerun: they share only the
    cores, and its start-up overlaps theirs."""
    straight = Launched(_command(tmp_path / "straight", nproc), tmp_path / "straight")
    try:
        folder = tmp_path / "preempted"
        proc = subprocess.Popen(
            _command(folder, nproc, launcher=to == "the launcher"),
            cwd=ROOT,
            env={**os.environ, "NGPU": str(nproc)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _signal_after_step_2(proc, folder, signum)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert "stopping after step" in out + err
        assert "Traceback" not in out + err and "SignalException" not in out + err
        saved = [p.name for p in (folder / "checkpoint").iterdir()]
        assert len(saved) == 1 and saved[0] != f"step-{STEPS}", saved
        assert not (folder / "run.lock").exists()  # released on the way out

        rerun = subprocess.run(_command(folder, nproc), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        finished = straight.result()
        assert finished.returncode == 0, finished.stderr[-2000:]
    finally:
        straight.stop()
    assert _losses(folder) == _losses(tmp_path / "straight")
