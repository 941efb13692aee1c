"""Peak memory of every pipeline rank in metrics.jsonl and TensorBoard (training/metrics.py)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from parallelisms.parallel_dims import ParallelDims
from tests.dist_utils import run_distributed, train_command

ROOT = Path(__file__).resolve().parents[1]


def _gather_over_pp(rank, world_size):
    import training.metrics as metrics

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
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
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

    from training.metrics import MetricsLogger

    metrics = MetricsLogger(str(tmp_path), enable_tensorboard=True, active=True, append=False)
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
    assert rows == [{"step": 4, **step_figures}, {"step": 4, "validation_loss": 2.25, "validation_perplexity": 9.4877}]
    assert caplog.messages[-1] == "step  4/10  validation_loss 2.2500  validation_perplexity 9.49"
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("validation_loss")] == [(4, 2.25)]
