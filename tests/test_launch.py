"""scripts/multinode.slurm and scripts/slurm_launch.sh without a cluster: fake Slurm variables, two
"nodes" on this machine meeting over loopback, gloo on the CPU."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import free_port
from training.metrics.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "slurm_launch.sh"
SBATCH = ROOT / "scripts" / "multinode.slurm"
TRAIN_ARGS = ["--training.steps", "4", "--training.seq_len", "32", "--training.local_batch_size", "2"]


def _slurm_env(tmp_path, **overrides):
    """What srun gives each task, for a 2-node job on 127.0.0.1 (no scontrol here, so the launcher
    reads the node list itself), plus the launcher's own knobs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env.update(
        SLURM_NNODES="2",
        SLURM_NODEID="0",
        SLURM_JOB_ID=str(os.getpid()),
        SLURM_JOB_NODELIST="127.0.0.1",
        GPUS_PER_NODE="2",
        CONFIG_FILE="configs/debug.toml",
        PYTHON=sys.executable,
        LOG_DIR=str(tmp_path / "logs"),
    )
    env.update(overrides)
    return env


@pytest.mark.multiprocess
def test_two_fake_nodes_of_two_processes_train_as_one_world_of_four(tmp_path):
    env = _slurm_env(tmp_path, MASTER_PORT=str(free_port()))
    args = [*TRAIN_ARGS, "--parallelism.data_parallel_shard_degree", "-1", "--job.dump_folder", str(tmp_path / "run")]
    # Each launcher in its own session, so that a hang can be cleaned up with its torchrun workers.
    nodes = [
        subprocess.Popen(
            ["bash", str(LAUNCH), *args],
            cwd=ROOT,
            env={**env, "SLURM_NODEID": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    deadline = time.monotonic() + 150
    outputs = []
    try:
        for proc in nodes:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for node, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {node}:\n{out[-4000:]}"
        assert f"[node {node}/2" in out and f"--rdzv_conf is_host={int(node == 0)}" in out

    # Global rank 0 sits on whichever node the rendezvous put it: look in both consoles.
    rank0 = [line for out in outputs for line in out.splitlines() if line.startswith("[rank0]:")]
    assert any("world 4 = pp 1 x dp_replicate 1 x dp_shard 4" in line for line in rank0), "\n".join(rank0)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    # Every rank's output is kept: 2 nodes x 2 local ranks.
    assert len(list((tmp_path / "logs").glob("node*/*/attempt_0/*/stdout.log"))) == 4


@pytest.mark.parametrize("script", [LAUNCH, SBATCH], ids=["slurm_launch.sh", "multinode.slurm"])
def test_a_missing_recipe_is_refused_before_anything_starts(tmp_path, script):
    # No srun on PATH: the sbatch script has to refuse before it would call it.
    result = subprocess.run(
        ["bash", str(script)],
        cwd=ROOT,
        env=_slurm_env(tmp_path, CONFIG_FILE="configs/nope.toml"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "slurm_launch.sh: no recipe at CONFIG_FILE=configs/nope.toml" in result.stderr
    assert "srun" not in result.stderr


def _dry_run(tmp_path, *args, returncode=0, **env):
    result = subprocess.run(
        ["bash", str(LAUNCH), "--training.steps", "4", *args],
        cwd=ROOT,
        env=_slurm_env(tmp_path, DRY_RUN="1", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == returncode, result.stderr
    return result.stdout if returncode == 0 else result.stderr


def test_the_dry_run_checks_the_recipe_as_the_run_does(tmp_path):
    """The check a batch script makes before any node starts: train.py's own, for the job's world size."""
    err = _dry_run(tmp_path, "--training.stpes", "5", returncode=2)
    assert err.startswith("config error: training.stpes: unknown key (did you mean 'steps'?)") and err.count("\n") == 1


@pytest.mark.parametrize(
    "variable, value", [("GPUS_PER_NODE", "0"), ("GPUS_PER_NODE", "eight"), ("SLURM_NNODES", "two")]
)
def test_a_process_count_that_is_not_a_positive_integer_is_one_line(tmp_path, variable, value):
    err = _dry_run(tmp_path, returncode=2, **{variable: value})
    assert err.startswith(f"slurm_launch.sh: {variable}") and err.count("\n") == 1, err


@pytest.mark.parametrize("ngpu", ["0", "two"])
def test_run_train_sh_refuses_a_process_count_that_is_not_a_positive_integer(ngpu):
    result = subprocess.run(
        ["./run_train.sh"], cwd=ROOT, env={**os.environ, "NGPU": ngpu}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"run_train.sh: NGPU={ngpu}: expected the number of processes to start, a positive integer (e.g. NGPU=1)\n"
    )


def test_the_head_node_is_the_first_host_of_the_allocation(tmp_path):
    # PYTHON=true: the recipe check is test_the_dry_run_checks_the_recipe_as_the_run_does's.
    out = _dry_run(
        tmp_path,
        PYTHON="true",
        SLURM_JOB_NODELIST="gpu[07-09,12],cpu1",
        SLURM_NODEID="1",
        SLURM_JOB_ID="4242",
        SLURM_CPUS_PER_TASK="16",
        LOG_RANK="1",
    )
    assert "--rdzv_endpoint gpu07:24242 --rdzv_id 4242 --rdzv_conf is_host=0" in out
    assert "--nnodes 2 --nproc_per_node 2" in out and "--local-ranks-filter 1" in out
    assert "train.py --config configs/debug.toml --training.steps 4" in out
    assert "NCCL_NVLS_ENABLE=0" in out and "OMP_NUM_THREADS=8" in out
    # With scontrol present its expansion wins.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    out = _dry_run(tmp_path, PYTHON="true", PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-[a-b]")
    assert "--rdzv_endpoint node-a:" in out and "is_host=1" in out


def test_the_batch_script_starts_one_launcher_per_node_through_srun_and_outlives_sigusr1_and_sigterm(tmp_path):
    # A fake srun that records its arguments, then runs until released and fails with status 3.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"""#!/bin/sh
echo "srun $*" >> {tmp_path}/srun_args
case "$*" in *--overlap*) exit 0 ;; esac
while [ ! -e {tmp_path}/release ]; do sleep 0.05; done
exit 3
""")
    (bin_dir / "srun").chmod(0o755)
    env = _slurm_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_CPUS_PER_TASK="32")
    batch = subprocess.Popen(
        ["bash", str(SBATCH), "--training.steps", "4"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "srun_args").exists():  # the trap is set before srun starts
            assert batch.poll() is None and time.monotonic() < deadline, "srun was never started"
            time.sleep(0.05)
        for signum in (signal.SIGUSR1, signal.SIGTERM):  # before the time limit; at preemption or scancel
            batch.send_signal(signum)
            pkill = f"srun --overlap --ntasks-per-node=1 pkill -{signal.Signals(signum).name[3:]} -f train.py"
            while pkill not in (tmp_path / "srun_args").read_text():
                assert batch.poll() is None, f"the batch script ended on {signal.Signals(signum).name}"
                assert time.monotonic() < deadline
                time.sleep(0.05)
        (tmp_path / "release").touch()
        out, err = batch.communicate(timeout=30)
    finally:
        (tmp_path / "release").touch()  # the fake srun ends, whatever happened
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 3, err  # srun's status, not the signal's
    assert (
        "srun --ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 scripts/slurm_launch.sh --training.steps 4"
    ) in (tmp_path / "srun_args").read_text()
    assert out.count("--rdzv_backend c10d") == 1  # the resolved command, printed once before srun
    assert "world 4 = pp 1 x dp_replicate 1 x dp_shard 4" in out  # after train.py --dry_run for the whole job
    assert "SIGUSR1" in out and "SIGTERM" in out and "checkpoint and stop" in out


@pytest.mark.multiprocess
def test_a_bad_recipe_under_the_launcher_is_the_ranks_line_and_its_exit_code(tmp_path):
    """scripts/torchrun.py ends as the failed rank did, naming it, without torchrun's own traceback."""
    result = subprocess.run(
        ["./run_train.sh", "--training.stpes", "5", "--job.dump_folder", str(tmp_path / "run")],
        cwd=ROOT,
        env={**os.environ, "NGPU": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "config error: training.stpes: unknown key (did you mean 'steps'?)" in output
    assert re.search(r"^torchrun: rank \d exited 2; its output above says why$", result.stderr, re.M), output[-3000:]
    assert "Traceback" not in output


@pytest.mark.multiprocess
def test_a_rank_that_crashes_under_the_launcher_is_its_traceback_and_its_exit_code(tmp_path):
    """A rank that leaves no line in torchrun's error file (a bug's traceback) is named after its own output,
    with nothing made up for it."""
    script = tmp_path / "crash.py"
    script.write_text("import os\nif os.environ['RANK'] == '1':\n    1 / 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "scripts.torchrun", "--nproc_per_node=2", "--rdzv_backend", "c10d"]
        + ["--rdzv_endpoint", "localhost:0", str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "ZeroDivisionError" in output and "<NONE>" not in output, output[-3000:]
    assert re.search(r"^torchrun: rank 1 exited 1; its output above says why$", result.stderr, re.M), output[-3000:]
