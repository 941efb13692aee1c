"""What a run logs (training/metrics/): every pipeline rank's peak memory, the records of metrics.jsonl across
reruns, resumes and rollbacks, TensorBoard beside it, Weights & Biases from rank 0."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from config.errors import CheckpointError, ConfigError
from config.job_config import JobConfig
from parallelisms.parallel_dims import ParallelDims
from tests.dist_utils import run_distributed, train_command
from train import train
from training.metrics.records import continued_branch, parse, read_metrics
from training.recipe import load_recipe
from training.run_folder import LOCK_NAME, Holder

ROOT = Path(__file__).resolve().parents[1]


def _gather_over_pp(rank, world_size):
    import training.metrics.device as metrics

    metrics.peak_memory_gib = lambda device: 10.0 + rank  # a figure that says whose it is
    mesh, _ = ParallelDims(pp=2, dp_replicate=1, dp_shard=2, world_size=world_size).build_mesh("cpu")
    return metrics.pipeline_peak_memory(torch.device("cpu"), mesh["pp"].get_group())


@pytest.mark.multiprocess
def test_each_pipeline_rank_reports_its_own_peak_in_pipeline_order():
    # Mesh (pp=2, dp_shard=2): ranks 0 and 2 form one pipeline, 1 and 3 the other.
    got = run_distributed(_gather_over_pp, 4)
    assert got[0] == got[2] == {"peak_memory_gib/pp_rank_0": 10.0, "peak_memory_gib/pp_rank_1": 12.0}
    assert got[1] == got[3] == {"peak_memory_gib/pp_rank_0": 11.0, "peak_memory_gib/pp_rank_1": 13.0}


@pytest.mark.multiprocess
def test_a_pipeline_run_logs_every_stage_s_peak_memory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = train_command(
        2,
        tmp_path,
        "--training.steps",
        "3",
        "--training.local_batch_size",
        "2",
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--metrics.enable_tensorboard",
    )
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    keys = ["peak_memory_gib/pp_rank_0", "peak_memory_gib/pp_rank_1"]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert all(row[k] > 0 for k in keys), row
        assert row[keys[0]] == pytest.approx(row["peak_memory_gib"], rel=0.05)  # rank 0 is pipeline rank 0
    # A peak only grows: each rank's figure at the last step is at most its peak at the end (memory.json).
    final = json.loads((tmp_path / "memory.json").read_text())["peak_memory_gib_per_rank"]
    assert all(rows[-1][k] <= final[r] + 1e-3 for r, k in enumerate(keys)), (rows[-1], final)

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(keys) <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars(keys[1])] == [1, 2, 3]


def test_validation_is_a_record_and_a_console_line_of_its_own(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.metrics.logger import MetricsLogger

    cfg = JobConfig()
    cfg.job.dump_folder, cfg.metrics.enable_tensorboard = str(tmp_path), True
    metrics = MetricsLogger(cfg, start_step=0, active=True)
    step_figures = {
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_second": 10.0,
        "mfu_percent": None,
        "peak_memory_gib": 0.5,
    }
    with caplog.at_level("INFO", logger="train"):
        metrics.log(4, 10, step_figures, eta_seconds=0.0)
        metrics.log_validation(4, 10, {"validation_loss": 2.25, "validation_perplexity": 9.4877})
    metrics.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start" and rows[0]["step"] == 0
    assert rows[1:] == [
        {"step": 4, **step_figures},
        {"step": 4, "validation_loss": 2.25, "validation_perplexity": 9.4877},
    ]
    assert caplog.messages[-1] == "step  4/10  validation_loss 2.2500  validation_perplexity 9.49"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("validation_loss")] == [(4, 2.25)]


def _argv(folder, *extra):
    return [
        "--config",
        "configs/debug.toml",
        "--training.seq_len",
        "32",
        "--training.steps",
        "4",
        "--job.dump_folder",
        str(folder),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "2",
        "--metrics.enable_tensorboard",
        *extra,
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tensorboard_steps(folder: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars("loss")]


def _reruns(rank, world_size, folder):
    """A run, its rollback to step 2, a refused rollback by a run of another model (nothing moved aside), and a
    rerun from scratch in one folder."""
    seen = {"first": train(load_recipe(_argv(folder))).losses}
    seen["rolled_back"] = train(load_recipe(_argv(folder, "--checkpoint.load_step", "2"))).losses
    seen["after_rollback"] = ((folder / "metrics.jsonl").read_text(), _tensorboard_steps(folder))
    before = _files(folder)
    try:
        train(load_recipe(_argv(folder, "--model.name", "llama3", "--checkpoint.load_step", "2")))
    except CheckpointError as err:
        seen["refusal"] = str(err)
    after = _files(folder)
    seen["refused_run_changed"] = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    seen["fresh"] = train(load_recipe(_argv(folder, "--checkpoint.enable", "false"))).losses
    seen["after_fresh"] = ((folder / "metrics.jsonl").read_text(), _tensorboard_steps(folder))
    seen["config"] = (folder / "config.toml").read_text()
    return seen


def _events(text: str) -> list[tuple]:
    return [(r["event"], r["step"], r.get("rolled_back_from")) for r in parse(text.splitlines())[0] if "event" in r]


@pytest.mark.multiprocess
def test_metrics_append_across_reruns_mark_each_start_and_a_refused_run_changes_nothing(tmp_path):
    (seen,) = run_distributed(_reruns, 1, tmp_path, timeout_s=300)
    first = seen["first"]
    assert seen["rolled_back"] == first[2:]  # resumed from step-2 (an exact resume: the reference is the first run)

    text, tensorboard = seen["after_rollback"]
    assert _events(text) == [("start", 0, None), ("resume", 2, 4)]
    records = parse(text.splitlines())[0]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 3, 4]  # both branches are kept...
    branch = continued_branch(records)  # ...and a reader draws the one that continued
    assert [r["step"] for r in branch] == [1, 2, 3, 4] and branch[2:] == [r for r in records if "loss" in r][4:]

    # The refused run (another model than the checkpoint's) said why and left every file as it was.
    assert "was written for another model" in seen["refusal"]
    assert seen["refused_run_changed"] == []
    assert not (tmp_path / LOCK_NAME).exists()

    text, tensorboard_after_fresh = seen["after_fresh"]
    assert _events(text) == [("start", 0, None), ("resume", 2, 4), ("start", 0, 4)]  # appended, not truncated
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == first  # the same seed
    assert seen["fresh"] == first
    assert "[checkpoint]\nenable = false" in seen["config"]
    # TensorBoard draws the branch that continued too (purge_step).
    assert tensorboard == [1, 2, 3, 4] and tensorboard_after_fresh == [1, 2, 3, 4]


class _FakeWandb(types.ModuleType):
    """``wandb`` as the writer uses it: ``init`` returns a run with ``log`` and ``finish``; every call is kept.
    ``online_fails``: an ``init`` not asked for offline raises, as one without a network or a key does."""

    def __init__(self, online_fails: bool = False, on_init=lambda: None):
        super().__init__("wandb")
        self.calls, self.online_fails, self.on_init = [], online_fails, on_init

    def init(self, **options):
        self.calls.append(("init", options))
        if self.online_fails and options.get("mode") != "offline":
            raise RuntimeError("Run initialization has timed out after 90.0 sec.\nmore detail")
        self.calls.append(("init_saw", self.on_init()))
        return self

    def log(self, data, step=None):
        self.calls.append(("log", step, data))

    def finish(self):
        self.calls.append(("finish",))


def _rank0_keeps_the_books(rank, world_size, root):
    """A run refused by a held folder, then a 2-step run logging to a fake W&B: what each rank saw."""
    import os

    os.environ["WANDB_MODE"] = "offline"
    fake = _FakeWandb(on_init=lambda: (root / "run" / LOCK_NAME).read_text())
    sys.modules["wandb"] = fake
    held = ["--config", "configs/debug.toml", "--job.dump_folder", str(root / "held")]
    try:
        train(load_recipe(held))
        refusal = "not refused"
    except ConfigError as err:
        refusal = str(err)
    run = ["--config", "configs/debug.toml", "--training.seq_len", "32", "--training.steps", "2"]
    train(load_recipe([*run, "--job.dump_folder", str(root / "run"), "--metrics.enable_wandb"]))
    return refusal, fake.calls, os.getpid()


@pytest.mark.multiprocess
def test_rank_0_alone_holds_the_folder_and_logs_to_wandb_what_metrics_jsonl_holds(tmp_path):
    first = Holder.me()  # this test process holds one folder, as a run still going would
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / LOCK_NAME).write_text(first.to_json())
    (refused0, calls0, pid0), (refused1, calls1, _) = run_distributed(
        _rank0_keeps_the_books, 2, tmp_path, timeout_s=300
    )
    # Every rank stops with the same line naming the holder; nothing is written into its folder.
    assert (
        refused0
        == refused1
        == (
            f"config error: job.dump_folder: {tmp_path / 'held'} is in use by the run of {first.describe()} "
            "(run.lock); wait for it to end, stop it, or point job.dump_folder elsewhere"
        )
    )
    assert [p.name for p in (tmp_path / "held").iterdir()] == [LOCK_NAME]

    assert calls1 == []  # rank 1 neither starts a W&B run nor logs
    (_, options), (_, lock), *logs, finish = calls0
    assert json.loads(lock)["pid"] == pid0  # rank 0 held the folder while the run went on...
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # ...and let it go at the end
    assert options["mode"] == "offline" and options["dir"] == str(tmp_path / "run")
    assert options["config"]["job"]["dump_folder"] == str(tmp_path / "run") and options["project"] == "headroom"
    expected = [
        ("log", r["step"], {k: v for k, v in r.items() if k != "step" and v is not None})
        for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
    ]
    assert logs == expected and [step for _, step, _ in logs] == [1, 2] and finish == ("finish",)
    assert "mfu_percent" not in logs[0][2]  # null on the CPU: left out, not logged as a value


def test_wandb_goes_offline_without_a_key_or_a_server_or_when_the_online_start_fails(tmp_path, monkeypatch, caplog):
    import socket

    from training.metrics.wandb_writer import WandbWriter

    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_server(("127.0.0.1", 0)) as closed:
        listening, refusing = server.getsockname()[1], closed.getsockname()[1]
    server = socket.create_server(("127.0.0.1", listening))  # answers; the other port refuses
    cases = [
        ({}, False, "no API key"),
        ({"WANDB_API_KEY": "k", "WANDB_BASE_URL": f"http://127.0.0.1:{refusing}"}, False, "does not answer"),
        ({"WANDB_API_KEY": "k", "WANDB_BASE_URL": f"http://127.0.0.1:{listening}"}, True, "online start failed"),
    ]
    with server:
        for env, online_fails, why in cases:
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            fake = _FakeWandb(online_fails=online_fails)
            monkeypatch.setitem(sys.modules, "wandb", fake)
            with caplog.at_level("WARNING", logger="train"):
                WandbWriter(cfg, start_step=0)
            modes = [options.get("mode") for name, options in (c for c in fake.calls if c[0] == "init")]
            assert modes == ([None, "offline"] if online_fails else ["offline"]), (why, fake.calls)
            assert why in caplog.messages[-1] and "wandb sync" in caplog.messages[-1], caplog.messages[-1]
    assert "\n" not in caplog.messages[-1]  # the cause's first line only


def test_a_missing_wandb_is_one_line_before_anything_is_built(tmp_path, monkeypatch, capsys):
    import train as train_module

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    code = train_module.main(
        ["--config", "configs/debug.toml", "--job.dump_folder", str(tmp_path / "run"), "--metrics.enable_wandb"]
    )
    assert code == 2
    assert capsys.readouterr().err == "config error: metrics.enable_wandb: needs the wandb package: pip install wandb\n"
    assert not (tmp_path / "run").exists()
