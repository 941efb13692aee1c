"""Run a function in N gloo processes on the CPU, for tests of distributed code.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, joins
them into one gloo process group over 127.0.0.1, calls ``fn(rank, world_size,
*args)`` in each and returns the ranks' return values, in rank order. A failing
rank fails the caller with that rank's traceback; a hang fails it after
``timeout_s``. ``fn`` and ``args`` must be picklable (``fn`` defined at module
level) and so must what ``fn`` returns; tensors come back through ``torch.save``.

Each rank then shuts down as ``train.py`` does (``close_distributed``) and fails
if a gloo worker thread outlives it: such a thread can abort the process at exit.

The ranks are forked from a fork server that imported torch and ``train`` once per test
session: a freshly spawned rank spent about 5 s of CPU on those imports, more than most
tests' training, and on 2 cores 4 ranks wait for each other's. A forked rank is still a
new process with nothing of another test's: it gets the caller's environment, standard
output and error, and working directory, as a spawned one would.
"""

import datetime
import glob
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing import reduction
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallelisms.distributed import close_distributed

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (rank 0 binds it next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Imported by the fork server before it forks any rank (an import that fails there is made by the rank).
multiprocessing.set_forkserver_preload(["train"])


class _CallersStreams:
    """The caller's standard output and error, for a forked rank to write to as a spawned one would (the fork
    server's own are those of whichever test started it)."""

    def __init__(self, fds: tuple = ()):
        self.fds = fds

    def __reduce__(self):  # the rank receives duplicates of the caller's descriptors
        return _CallersStreams, ((reduction.DupFd(1), reduction.DupFd(2)),)

    def adopt(self) -> None:
        for target, inherited in zip((1, 2), self.fds):
            fd = inherited.detach()
            os.dup2(fd, target)
            os.close(fd)


def _run_rank(
    rank: int,
    world_size: int,
    port: int,
    result_dir: str,
    timeout_s: float,
    environment: dict[str, str],
    streams: _CallersStreams,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    streams.adopt()
    os.environ.clear()
    os.environ.update(environment)
    # N processes share the test machine's cores; one thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    failure = None
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(result_dir, f"rank{rank}.pt"))
    except BaseException:  # kept as text: the exception's frames would keep the run's groups alive
        failure = traceback.format_exc()
    close_distributed()
    if failure is not None:
        raise RuntimeError(f"rank {rank} failed:\n{failure}")
    left = gloo_worker_threads()
    if left:
        raise RuntimeError(f"rank {rank}: {left} gloo worker threads outlived close_distributed()")


def gloo_worker_threads() -> int:
    """This process's gloo worker threads (Linux names them pt_gloo_runloop)."""
    names = []
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return names.count("pt_gloo_runloop")


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """Return ``[fn(rank, world_size, *args) for each rank]``, each run in its own process."""
    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(
            _run_rank,
            args=(world_size, free_port(), result_dir, timeout_s, dict(os.environ), _CallersStreams(), fn, args),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout_s
        # join() re-raises a failed rank's exception with its traceback.
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                name = getattr(fn, "__name__", repr(fn))
                raise TimeoutError(f"{name} did not finish on {world_size} ranks within {timeout_s} s")
        return [
            torch.load(os.path.join(result_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)
        ]


def train_command(nproc: int, folder, *overrides: str) -> list[str]:
    """``train.py`` on ``configs/debug.toml`` at seq_len 32, as a user launches it: under torchrun (a free
    rendezvous port) for ``nproc`` > 1, plain ``python`` for 1; its outputs go to ``folder``."""
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            "localhost:0",
        ]
        if nproc > 1
        else [sys.executable]
    )
    recipe = ["--config", "configs/debug.toml", "--training.seq_len", "32", "--job.dump_folder", str(folder)]
    return [*launcher, "train.py", *recipe, *overrides]


def _descendants(pid: int) -> list[int]:
    """The processes that ``pid`` started, and theirs (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (command)": state, parent
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Launched:
    """``command`` started now from the repository root, its output going to ``logs``.out and .err (a pipe
    that nobody reads until the end could fill and stall it): several can go on at once, each start-up
    (~5 s of imports on one core) beside the others' work. ``result()`` waits for it; ``stop()`` ends what
    is left of it and of the processes it started."""

    def __init__(self, command: list[str], logs: Path, env: dict[str, str] | None = None):
        self.out, self.err = logs.with_name(logs.name + ".out"), logs.with_name(logs.name + ".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            self.stop()
        return subprocess.CompletedProcess(self.process.args, code, self.out.read_text(), self.err.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            for pid in [self.process.pid, *_descendants(self.process.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait()
