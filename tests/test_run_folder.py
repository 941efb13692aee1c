"""One writer per dump folder (training/run_folder.py): the lock and its stale cases. A run refused by a held
folder, on every rank: tests/test_metrics.py."""

import dataclasses
import json
import logging
import subprocess
import threading

import pytest

from training.run_folder import LOCK_NAME, FolderInUse, Holder, release, take


def _write_lock(folder, holder: Holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(holder.to_json())


def _gone_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _race(folder, contenders: int) -> list[str]:
    """``take`` from ``contenders`` threads released together: "won" or "refused" for each."""
    outcomes, start = [], threading.Barrier(contenders)

    def contend() -> None:
        start.wait()
        try:
            take(folder)
            outcomes.append("won")
        except FolderInUse:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_of_runs_that_start_together_one_takes_the_folder_fresh_or_stale(tmp_path):
    # Threads of one process: each sees the others' lock as held by a running process (its own), as a
    # second run sees the first's; the file system decides who created the lock.
    for round in range(5):
        fresh, stale = tmp_path / f"fresh{round}", tmp_path / f"stale{round}"
        assert sorted(_race(fresh, 6)) == ["refused"] * 5 + ["won"]
        _write_lock(stale, dataclasses.replace(Holder.me(), pid=_gone_pid()))
        assert sorted(_race(stale, 6)) == ["refused"] * 5 + ["won"]
        assert json.loads((stale / LOCK_NAME).read_text())["pid"] == Holder.me().pid
        assert not (stale / (LOCK_NAME + ".break")).exists()


def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_log_line(tmp_path, caplog, monkeypatch):
    me = Holder.me()
    gone = dataclasses.replace(me, pid=_gone_pid(), since="2025-01-01 00:00:00 UTC")
    rebooted = dataclasses.replace(me, boot_id="another-boot", pid_namespace="pid:[1]")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    requeued = dataclasses.replace(me, host="node-b", slurm_job_id="77", slurm_restart_count=1)
    for holder, why in [
        (gone, "its process is gone"),
        (rebooted, "its host has rebooted since"),
        (requeued, "an earlier start of this Slurm job"),
    ]:
        folder = tmp_path / why.replace(" ", "_")
        _write_lock(folder, holder)
        with caplog.at_level(logging.WARNING, logger="train"):
            mine = take(folder)
        assert f"took over the lock of {holder.describe()} ({why}" in caplog.messages[-1]
        assert (folder / LOCK_NAME).read_text() == mine.to_json()
        release(folder, mine)
        assert not (folder / LOCK_NAME).exists()

    # A run that died between the two steps of a takeover left its .break too: judged like a lock.
    _write_lock(tmp_path / "half_broken", gone)
    (tmp_path / "half_broken" / (LOCK_NAME + ".break")).write_text(gone.to_json())
    mine = take(tmp_path / "half_broken")
    assert [p.name for p in (tmp_path / "half_broken").iterdir()] == [LOCK_NAME]


def test_a_lock_held_elsewhere_needs_force_unlock_and_a_live_one_here_is_never_taken(tmp_path, monkeypatch):
    me = Holder.me()
    elsewhere = dataclasses.replace(me, host="node-b", since="2025-01-01 00:00:00 UTC", slurm_job_id="41")
    # The same Slurm job id without a higher restart count: two job steps of one allocation, both may run.
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    _write_lock(tmp_path / "elsewhere", elsewhere)
    with pytest.raises(FolderInUse) as refused:
        take(tmp_path / "elsewhere")
    assert str(refused.value) == (
        f"{tmp_path / 'elsewhere'} is in use by the run of pid {me.pid} on node-b since 2025-01-01 00:00:00 UTC, "
        "Slurm job 41 (run.lock); if that run is gone (`squeue -j 41` tells), rerun with --job.force_unlock, "
        "else point job.dump_folder elsewhere"
    )
    mine = take(tmp_path / "elsewhere", force=True)
    assert (tmp_path / "elsewhere" / LOCK_NAME).read_text() == mine.to_json()

    _write_lock(tmp_path / "here", me)  # this very process: running
    for force in (False, True):
        with pytest.raises(FolderInUse, match="wait for it to end, stop it, or point job.dump_folder elsewhere"):
            take(tmp_path / "here", force=force)

    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / LOCK_NAME).write_text("}\n")
    with pytest.raises(FolderInUse, match="is not a lock this trainer wrote"):
        take(tmp_path / "garbage")
    take(tmp_path / "garbage", force=True)


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
    mine = take(tmp_path)
    theirs = dataclasses.replace(mine, host="node-b")
    _write_lock(tmp_path, theirs)
    release(tmp_path, mine)
    assert (tmp_path / LOCK_NAME).read_text() == theirs.to_json()
