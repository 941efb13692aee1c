"""Every way out of a run closes in order: no thread of ours outlives it, nothing written is lost.

The gloo-thread check itself runs after every multi-process test (tests/dist_utils.py); these tests
cover the paths that end with an error, under torchrun as a user runs them.
"""

import subprocess
import threading
from pathlib import Path

import pytest

from tests.dist_utils import gloo_worker_threads, run_distributed, train_command
from train import train
from training.recipe import load_recipe

pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]


def _torchrun(folder: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = train_command(2, folder, "--training.local_batch_size", "2", *overrides)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_non_finite_stop_publishes_the_save_in_flight_and_exits_1_cleanly(tmp_path):
    """Step 1's async save is still being written when step 2 stops the run: it is published, and
    the ranks exit 1 with the one-line reason, no traceback and no abort."""
    result = _torchrun(
        tmp_path,
        "--training.steps",
        "5",
        "--optimizer.lr",
        "1e30",
        "--training.max_norm",
        "0",
        "--checkpoint.enable",
        "--checkpoint.interval",
        "1",
        "--checkpoint.async_mode",
        "async",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "stopped: loss" in output and "optimizer.lr" in output
    # torchrun prints a traceback of its own when a worker exits non-zero; ours would name train.py
    assert "terminate called" not in output and 'train.py", line' not in output, output[-3000:]
    assert (tmp_path / "checkpoint" / "step-1" / ".metadata").is_file()


def _threads_after_train(rank, world_size, folder):
    train(
        load_recipe(
            [
                "--config",
                "configs/debug.toml",
                "--training.steps",
                "2",
                "--training.seq_len",
                "32",
                "--training.local_batch_size",
                "2",
                "--job.dump_folder",
                str(folder / str(rank)),
                "--checkpoint.enable",
                "--checkpoint.async_mode",
                "async",
                "--metrics.enable_tensorboard",
            ]
        )
    )
    return sorted(t.name for t in threading.enumerate()), gloo_worker_threads()


def test_after_a_run_only_the_groups_remain_and_closing_them_ends_every_worker(tmp_path):
    """train() leaves no thread of its own (TensorBoard's writer, the async save's executor) behind;
    the gloo workers it leaves belong to the process group, which the harness then closes and checks."""
    for names, gloo in run_distributed(_threads_after_train, 2, tmp_path, timeout_s=300):
        assert names == ["MainThread"], names
        assert gloo > 0  # without close_distributed they would live on into interpreter shutdown
