"""A rank that dies or hangs: the others name it and exit non-zero within about the timeout; and the
[comm] timeouts behind that (training/faults.py, parallelisms/distributed.py)."""

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from config.errors import ConfigError
from config.loader import dump_config, load_config
from parallelisms.distributed import set_pg_timeouts
from tests.dist_utils import run_distributed, train_command
from training.faults import CHECK_IN_SECONDS, is_collective_failure
from training.metrics.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TIMEOUT = 5


def test_comm_timeouts_are_positive_integers_and_round_trip(tmp_path):
    cfg = load_config(["--comm.init_timeout_seconds", "60", "--comm.train_timeout_seconds", "7"])
    assert (cfg.comm.init_timeout_seconds, cfg.comm.train_timeout_seconds) == (60, 7)
    for value, message in [
        ("0", "must be a positive number of seconds"),
        ("-5", "must be a positive number"),
        ("1.5", "expected an integer"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(["--comm.train_timeout_seconds", value])
        assert str(err.value).startswith(f"config error: comm.train_timeout_seconds: {message}")
    recipe = tmp_path / "r.toml"
    recipe.write_text(dump_config(cfg))
    assert load_config(["--config", str(recipe)]).comm == cfg.comm


def test_a_failed_collective_is_told_from_this_ranks_own_errors():
    gloo_reset = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
        "[127.0.0.1]:46299: Connection reset by peer"
    )
    assert is_collective_failure(gloo_reset)
    # what the other operations of a gloo context raise once one of its receives timed out (no source file)
    assert is_collective_failure(RuntimeError("Application timeout caused pair closure"))
    assert is_collective_failure(dist.DistBackendError("NCCL communicator was aborted on rank 3"))
    try:
        try:
            raise gloo_reset
        except RuntimeError as err:
            raise RuntimeError("pipeline schedule failed") from err
    except RuntimeError as wrapped:
        assert is_collective_failure(wrapped)
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("gloo"))


def _collective_against_an_absent_peer(rank, world_size):
    """Every group, the default one and one made later (which starts with gloo's 30 min), gets the timeout."""
    pair = dist.new_group([0, 1])
    set_pg_timeouts(2, torch.device("cpu"))
    waited = {}
    for name, group in (("default", None), ("new_group", pair)):
        if rank == 0:
            start = time.monotonic()
            with pytest.raises(RuntimeError, match="Timed out"):
                dist.all_reduce(torch.ones(1), group=group)
            waited[name] = time.monotonic() - start
        else:  # rank 1 never joins; it waits until rank 0 has given up
            time.sleep(3.5)
    return waited


@pytest.mark.multiprocess
def test_set_pg_timeouts_bounds_every_group():
    waited = run_distributed(_collective_against_an_absent_peer, 2)[0]
    assert all(1.5 < seconds < 3.0 for seconds in waited.values()), waited


def _start_run(folder: Path, log: Path, nproc: int = 2) -> subprocess.Popen:
    """A long run under torchrun; the log goes to a file (a pipe would fill up and block rank 0)."""
    cmd = train_command(
        nproc,
        folder,
        "--training.steps",
        "100000",
        "--training.local_batch_size",
        "2",
        "--comm.train_timeout_seconds",
        str(TRAIN_TIMEOUT),
    )
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _workers_after_step_3(proc: subprocess.Popen, folder: Path, log: Path) -> dict[int, int]:
    """{rank: pid} of torchrun's workers, once step 3 is logged (the train timeout holds from step 2)."""
    metrics, deadline = folder / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and len(read_metrics(metrics)) >= 3):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 3"
        time.sleep(0.1)
    workers = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
        workers[rank] = int(pid)
    return workers


def _ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_until_ended(pids: list[int], limit: float) -> float:
    start = time.monotonic()
    while not all(_ended(pid) for pid in pids):
        assert time.monotonic() - start < limit, f"ranks {pids} still running after {limit} s"
        time.sleep(0.1)
    return time.monotonic() - start


def _named(log: Path, rank: int) -> int:
    """The step at which the survivors' one line names ``rank``; no stack trace from train.py."""
    text = log.read_text()
    match = re.search(
        rf"^rank {rank} stopped answering \(died or hung\) at step (\d+); the other ranks exit\. "
        rf"Check the log of rank {rank}; raise comm\.train_timeout_seconds",
        text,
        re.MULTILINE,
    )
    assert match, text[-4000:]
    assert 'train.py", line' not in text, text[-4000:]
    return int(match.group(1))


@pytest.mark.multiprocess
def test_a_killed_rank_is_named_and_the_others_exit_at_once(tmp_path):
    log = tmp_path / "log"
    proc = _start_run(tmp_path / "run", log)
    try:
        workers = _workers_after_step_3(proc, tmp_path / "run", log)
        os.kill(workers[1], signal.SIGKILL)
        # A dead peer's connection resets at once: only the check-in window remains.
        elapsed = _wait_until_ended([workers[0]], CHECK_IN_SECONDS + 15)
        assert proc.wait(timeout=60) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert _named(log, 1) >= 3
    assert elapsed < CHECK_IN_SECONDS + 10


@pytest.mark.multiprocess
def test_a_hung_rank_is_named_within_the_train_timeout(tmp_path):
    log = tmp_path / "log"
    proc = _start_run(tmp_path / "run", log)
    try:
        workers = _workers_after_step_3(proc, tmp_path / "run", log)
        os.kill(workers[1], signal.SIGSTOP)  # alive, connections open, never answering
        elapsed = _wait_until_ended([workers[0]], TRAIN_TIMEOUT + CHECK_IN_SECONDS + 20)
        assert not _ended(workers[1])
        os.kill(workers[1], signal.SIGKILL)  # else torchrun waits 30 s for it to take its SIGTERM
        assert proc.wait(timeout=60) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert _named(log, 1) >= 3
    # gloo's own timeout, or what it leaves on the operations queued behind a timed-out one (the preemption
    # check's all-reduce runs asynchronously, so the main thread's collective may be either)
    text = log.read_text()
    first = re.search(r"\(first error: rank 0: (.*)\)$", text, re.MULTILINE)
    timed_out = rf"Timed out waiting {TRAIN_TIMEOUT * 1000}ms for (recv|send) operation to complete"
    assert first and re.fullmatch(rf"{timed_out}|Application timeout caused pair closure", first.group(1)), text[-4000:]
    assert TRAIN_TIMEOUT <= elapsed < TRAIN_TIMEOUT + CHECK_IN_SECONDS + 10
