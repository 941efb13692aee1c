"""A rank that died or hung: the other ranks name it and exit 1, instead of waiting forever or
printing only a stack trace.

A collective fails at once when a peer died (gloo: its connection is reset) and after the group's
timeout when a peer hangs (``comm.train_timeout_seconds``; gloo raises, NCCL raises a
``DistBackendError`` where the error reaches Python). The first rank to see such an error raises a
flag on the c10d store and wakes every rank's watcher thread (each waits on a key of its own, so it
wakes even while its main thread is stuck in another collective); each rank checks in, and who has not
checked in after ``CHECK_IN_SECONDS`` is dead or hung (a stopped process's threads stop with it).

A run that ends, well or not, calls ``stop``: the rank wakes its own watcher, joins it and drops its
store clients, so no thread of ours is left blocked in C++ when the interpreter shuts down.
"""

import datetime
import os
import re
import sys
import threading
import time
from typing import NoReturn, Optional

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

CHECK_IN_SECONDS = 5.0
_RAISED, _ALIVE = "fault/raised", "fault/alive"
_STOP = "stop"  # the value a rank writes to its own wake key to end its watcher


def _wake_key(rank: int) -> str:
    return f"fault/wake/{rank}"


# gloo's messages for a lost or silent peer: its transport's own (they name their source file), and the
# one a timed-out receive leaves, without a source, on every other operation of the context.
_GLOO_FAILURES = ("gloo/transport", "Application timeout caused pair closure")


def is_collective_failure(err: BaseException) -> bool:
    """gloo reports a lost or silent peer as a plain RuntimeError from its transport, NCCL and the
    store as a DistError. Anything else is this rank's own error and keeps its traceback."""
    for _ in range(8):  # the exception and what it was raised from
        if err is None:
            return False
        if isinstance(err, dist.DistError) or any(marker in str(err) for marker in _GLOO_FAILURES):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    line = re.sub(r"^\[[^\]]*\] ", "", line)  # gloo's "[.../pair.cc:537] " source location
    return line.split(". ")[0][:200]  # gloo and NCCL follow the what with generic advice


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class FaultWatch:
    """Started by ``train`` once the process group is up; the loop reports each step with ``at_step``."""

    def __init__(self):
        self._step = 0  # the step this rank is in; 0 during start-up
        self._first_step = 0  # this run's first; until it is done the init timeout holds
        self._store = None
        self._rank = 0
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    def at_step(self, step: int) -> None:
        self._first_step = self._first_step or step
        self._step = step

    @property
    def started(self) -> bool:
        return self._store is not None

    def start(self) -> None:
        if dist.get_world_size() == 1:
            return
        store = _get_default_store()
        self._rank = dist.get_rank()
        self._store = store.clone()  # one store client per thread: they are not shared across threads
        self._store.delete_key(_wake_key(self._rank))  # left by an earlier watcher in this process
        self._thread = threading.Thread(
            target=self._watch, args=(store.clone(), self._rank), name="fault-watch", daemon=True
        )
        self._thread.start()

    def _watch(self, store, rank: int) -> None:
        try:
            store.wait([_wake_key(rank)], datetime.timedelta(days=365))
            woken_by = store.get(_wake_key(rank)).decode()
        except Exception:  # the store closed: its host died (the main thread says so)
            return
        if woken_by != _STOP:
            self.report_and_exit()

    def stop(self) -> None:
        """End the watcher thread and drop the store clients; the run is over on this rank.

        Touches only this rank's wake key, so a peer still running keeps its watcher.
        """
        if self._thread is not None:
            try:
                self._store.set(_wake_key(self._rank), _STOP)
            except Exception:  # the store's host is gone: the watcher's wait has failed and returns
                pass
            self._thread.join()
            self._thread = None
        self._store = None

    def report_and_exit(self, cause: Optional[BaseException] = None) -> NoReturn:
        """Raise the flag (``cause``: this rank's failed collective), check in, name who did not, exit 1.

        ``os._exit``: a group with a dead peer cannot be torn down cleanly, and a main thread stuck in a
        collective would never get to exit otherwise.
        """
        with self._lock:  # the main thread and the watcher may both get here; the first one ends the process
            print(self._report(cause), file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)

    def _report(self, cause: Optional[BaseException]) -> str:
        rank, world = dist.get_rank(), dist.get_world_size()
        where = f"at step {self._step}" if self._step else "during start-up"
        try:
            self._store.set_timeout(datetime.timedelta(seconds=CHECK_IN_SECONDS))
            if cause is not None:  # the first error is the one everyone quotes
                self._store.compare_set(_RAISED, "", f"rank {rank}: {_first_line(cause)}")
            self._store.multi_set([_wake_key(r) for r in range(world)], ["raised"] * world)
            self._store.append(_ALIVE, f"{rank},")
            time.sleep(CHECK_IN_SECONDS)
            alive = {int(r) for r in self._store.get(_ALIVE).decode().split(",") if r}
            first = self._store.get(_RAISED).decode()
        except Exception:
            return (
                f"rank {rank}: a collective failed {where} ({_first_line(cause) if cause else 'seen by a peer'}) "
                "and the c10d store does not answer either, so the failed rank is unknown: the store's host "
                "(torchrun's rendezvous node, or rank 0 without torchrun) may be the one that died; exiting"
            )
        missing = sorted(set(range(world)) - alive)
        if not missing:
            return f"a collective failed {where} although every rank answered (first error: {first}); exiting"
        key, what = (
            ("comm.train_timeout_seconds", "a step")
            if self._step > self._first_step
            else ("comm.init_timeout_seconds", "start-up or the first step")
        )
        return (
            f"{_ranks(missing)} stopped answering (died or hung) {where}; the other ranks exit. "
            f"Check the log of {_ranks(missing)}; raise {key} if {what} legitimately takes longer "
            f"(first error: {first})"
        )
