"""One writer per dump folder: ``<dump_folder>/run.lock``, taken before anything is written into the folder.

Two runs writing one folder interleave their ``metrics.jsonl``, overwrite each other's ``config.toml`` and race
on the same checkpoint names. So rank 0 creates ``run.lock`` (``O_EXCL``: of two runs started together, one
gets it, on a local or a network filesystem), holding the holder's host, pid and start time; every rank learns
the outcome, and a second run stops with one line naming the holder. ``train`` releases it on every way out
(the last step, an error, a stop signal). A run that could not (killed, its node died, or ended at once by
the fault watcher, training/faults.py) leaves a stale lock, taken over when no process can still hold it:

- the holder ran on this machine (same host, boot and pid namespace) and its process is gone, or the host
  rebooted since;
- the holder is an earlier start of this Slurm job (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``):
  Slurm starts a requeued job only once its previous start has ended, on whichever nodes it gets;
- ``job.force_unlock``: the holder ran elsewhere (another host or container), where its process cannot be
  looked up, and the user says it is gone. A holder alive on this machine is never taken over.

Taking over goes through ``run.lock.break`` (also ``O_EXCL``), so that of two runs that find the same stale
lock only one removes it, and only while it still holds what was judged stale.
"""

import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from config.errors import ConfigError
from config.job_config import Job
from parallelisms.distributed import on_rank0

logger = logging.getLogger("train")

LOCK_NAME = "run.lock"
_BREAK_NAME = LOCK_NAME + ".break"
_ATTEMPTS = 20  # looks at the lock before giving up on a folder whose lock keeps changing hands
_RETRY_SECONDS = 0.05


class FolderInUse(OSError):
    """The folder's lock is held by a run that may still be writing; the message names it and the fix."""


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot; -1: no such process, -2: unknown here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
    except FileNotFoundError:
        return -1
    except (OSError, ValueError, IndexError):
        return -2


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to name the run, and to tell from this machine whether it still runs."""

    host: str
    pid: int
    since: str  # local time the lock was taken
    process_start: int = -2  # the holder's start in clock ticks since boot: tells its pid from a reused one
    boot_id: str = ""  # Linux: changes at every boot
    pid_namespace: str = ""  # a container may share the host's name but not its processes
    slurm_job_id: str = ""
    slurm_restart_count: int = 0

    @classmethod
    def me(cls) -> "Holder":
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            since=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            process_start=_process_start(os.getpid()),
            boot_id=_read_first_line("/proc/sys/kernel/random/boot_id"),
            pid_namespace=os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else "",
            slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Optional["Holder"]:
        """The holder a lock file names; None for anything else (a file being written, or not ours)."""
        try:
            fields = json.loads(text)
            known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
            return cls(**known) if isinstance(known.get("host"), str) and isinstance(known.get("pid"), int) else None
        except (ValueError, TypeError, AttributeError):
            return None

    def describe(self) -> str:
        slurm = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host} since {self.since}{slurm}"

    def same_machine(self, other: "Holder") -> bool:
        return (self.host, self.boot_id, self.pid_namespace) == (other.host, other.boot_id, other.pid_namespace)

    def running_here(self) -> bool:
        """Whether this holder's process still runs; only meaningful on its own machine."""
        now = _process_start(self.pid)
        if now == -2 or self.process_start == -2:  # no /proc: whether the pid exists at all
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True
        return now == self.process_start


def _stale(holder: Optional[Holder], me: Holder, force: bool) -> Optional[str]:
    """Why ``holder``'s lock (None: a file that names no holder) may be taken over by ``me`` (for the log), or
    None while it may be in use."""
    if holder is None:
        return "job.force_unlock" if force else None
    if holder.same_machine(me):
        return None if holder.running_here() else "its process is gone"
    if holder.host == me.host and holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
        return "its host has rebooted since"
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id:
        if holder.slurm_restart_count < me.slurm_restart_count:
            return "an earlier start of this Slurm job, which Slurm ended before requeueing it"
    if force:
        return "job.force_unlock"
    return None


def _in_use(folder: Path, holder: Optional[Holder], me: Holder, file: str) -> FolderInUse:
    """The refusal: who holds ``file`` (``run.lock`` or its ``.break``), and what the user can do."""
    if holder is None:
        return FolderInUse(
            f"{folder / file} is not a lock this trainer wrote; if no run uses {folder}, delete it or rerun "
            "with --job.force_unlock, else point job.dump_folder elsewhere"
        )
    where = f"{folder} is in use by the run of {holder.describe()} ({file})"
    if holder.same_machine(me):
        return FolderInUse(f"{where}; wait for it to end, stop it, or point job.dump_folder elsewhere")
    hint = f" (`squeue -j {holder.slurm_job_id}` tells)" if holder.slurm_job_id else ""
    return FolderInUse(
        f"{where}; if that run is gone{hint}, rerun with --job.force_unlock, else point job.dump_folder elsewhere"
    )


def _create(path: Path, me: Holder) -> bool:
    """Create ``path`` holding ``me``, atomically; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(me.to_json())
    return True


def _read(path: Path) -> Optional[str]:
    """The file's text, or None once it is gone. A file just created may be empty for an instant: read it
    again before calling its text what it is."""
    for _ in range(10):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        if Holder.from_json(text) is not None:
            return text
        time.sleep(_RETRY_SECONDS)
    return text


def _break(folder: Path, seen: str, me: Holder, force: bool) -> None:
    """Remove the stale ``run.lock`` if it still holds ``seen``, as the only one doing so (``run.lock.break``).

    Another run breaking it at the same moment holds ``.break`` for an instant: wait for it, then let the
    caller look again. A ``.break`` left by a run that died between its two steps is judged like a lock.
    """
    lock, guard = folder / LOCK_NAME, folder / _BREAK_NAME
    for _ in range(_ATTEMPTS):
        if _create(guard, me):
            break
        text = _read(guard)
        if text is None:
            continue
        if _stale(Holder.from_json(text), me, force) is not None:
            guard.unlink(missing_ok=True)
        else:
            time.sleep(_RETRY_SECONDS)
    else:
        raise _in_use(folder, Holder.from_json(_read(guard) or ""), me, _BREAK_NAME)
    try:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text() == seen:
                lock.unlink()
    finally:
        guard.unlink()


def take(folder: Path, force: bool = False) -> Holder:
    """Take ``folder``'s lock for this process (creating the folder), or raise ``FolderInUse``; a stale
    lock is taken over with a warning naming its holder and why. Returns what the lock file holds."""
    folder.mkdir(parents=True, exist_ok=True)
    me, lock, broken = Holder.me(), folder / LOCK_NAME, None
    for _ in range(_ATTEMPTS):
        if _create(lock, me):
            if broken is not None:
                logger.warning(f"{folder}: took over the lock of {broken}")
            return me
        seen = _read(lock)
        if seen is None:  # released while we looked
            continue
        holder = Holder.from_json(seen)
        why = _stale(holder, me, force)
        if why is None:
            raise _in_use(folder, holder, me, LOCK_NAME)
        _break(folder, seen, me, force)
        broken = f"{holder.describe() if holder is not None else 'an unreadable run.lock'} ({why})"
    raise FolderInUse(f"{folder / LOCK_NAME} kept changing hands while this run tried to take it; rerun")


def release(folder: Path, mine: Holder) -> None:
    """Remove ``folder``'s lock if it is still ``mine`` (a forced takeover may have replaced it)."""
    lock = folder / LOCK_NAME
    try:
        if lock.read_text() == mine.to_json():
            lock.unlink()
        else:
            logger.warning(f"{lock} was taken over while this run held it; left to its new holder")
    except FileNotFoundError:
        logger.warning(f"{lock} was removed while this run held it")
    except OSError as err:  # on the way out of a run that may be failing already: say so, raise nothing new
        logger.warning(f"cannot remove {lock} ({err}); the next run on this host takes it over")


@contextlib.contextmanager
def hold(job: Job) -> Iterator[None]:
    """Hold ``job.dump_folder``'s lock for the ``with`` block: rank 0 takes it, every rank raises the same
    one-line ``ConfigError`` if it cannot, and rank 0 releases it however the block ends. Needs the process
    group."""
    folder, held = Path(job.dump_folder), []

    def take_on_rank0() -> None:
        held.append(take(folder, job.force_unlock))

    failure = on_rank0(take_on_rank0)
    if isinstance(failure, FolderInUse):
        raise ConfigError("job.dump_folder", str(failure))
    if failure is not None:
        raise ConfigError(
            "job.dump_folder", f"cannot write to {folder} ({failure}); point job.dump_folder at a writable place"
        )
    try:
        yield
    finally:
        if held:
            release(folder, held[0])
