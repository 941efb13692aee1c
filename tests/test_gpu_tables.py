"""The cost model's rate tables per GPU kind: how a run and a dry run pick one, and what each must hold."""

import json
import sys
from pathlib import Path

import pytest

import train
from losses import ENTRIES
from models.flavors import QWEN3_FLAVORS
from planning.cost import DEFAULT_GPU, RATES, AchievedRates, StageCostInputs, stage_time
from planning.gpu import for_device, gpu_kind, of_kind

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stage_cost_bench import write_table  # noqa: E402


@pytest.mark.parametrize("kind", list(RATES))
def test_every_table_times_every_loss_entry(kind):
    """A loss entry's rate key is in every GPU's table, so a plan on any of them can cost every entry."""
    rates = RATES[kind]
    assert rates.gpu.upper().find(kind.upper()) >= 0 and rates.memory_gib > 0
    for name in ENTRIES:
        c = StageCostInputs(QWEN3_FLAVORS["1.7B"], 4096, 1, name, "selective", "op", rates=rates)
        assert stage_time(c, 1, first=False, last=True).total_ms > stage_time(c, 1, first=False, last=False).total_ms


@pytest.mark.parametrize(
    "name, kind", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100")]
)
def test_a_device_is_known_by_its_model(name, kind):
    assert gpu_kind(name) == kind


def test_a_run_plans_with_its_gpus_table_or_says_which_it_used_instead():
    for kind, rates in RATES.items():
        gpu = for_device(rates.gpu, 70.0)
        assert (gpu.kind, gpu.rates, gpu.memory_gib, gpu.note) == (kind, rates, 70.0, "")
    other = for_device("NVIDIA A100-SXM4-80GB", 79.2)
    assert other.kind == DEFAULT_GPU and other.memory_gib == 79.2
    assert (
        other.note.startswith("no rate table for NVIDIA A100-SXM4-80GB") and "stage_cost_bench.py --write" in other.note
    )
    cpu = for_device(None, None)
    assert cpu.kind == DEFAULT_GPU and cpu.memory_gib is None and "no GPU" in cpu.note


@pytest.mark.parametrize("kind", list(RATES))
def test_the_dry_run_plans_for_the_gpu_it_is_told(kind, capsys):
    args = ["--config", "configs/qwen3_1p7b_pp4.toml", "--dry_run", "--world_size", "8", "--gpu", kind.upper()]
    assert train.main(args) == 0
    out = capsys.readouterr().out
    gpu = of_kind(kind)
    assert f"planned for {gpu.describe()}" in out and f"fits {gpu.memory_gib:g} GiB" in out
    assert f"decoder layers at {gpu.rates.layer_tflops:g} TFLOP/s" in out
    assert train.main([*args, "--gpu_memory_gib", "60"]) == 0
    assert "fits 60 GiB" in capsys.readouterr().out


def test_a_gpu_without_a_table_is_one_line(capsys):
    assert train.main(["--config", "configs/debug.toml", "--dry_run", "--gpu", "a100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"config error: --gpu: no rate table for 'a100'; planning/rates/ has {', '.join(RATES)}"


def test_the_benchmark_writes_a_table_the_cost_model_reads(tmp_path):
    h200 = json.loads((Path("planning/rates") / "h200.json").read_text())
    achieved = {"layer_tflops": 400.4, "embedding_gbs": 1500.0, "norm_gbs": 500.0, "logits_gbs": 3000.0}
    achieved |= {f"head_tflops[{k}]": v / 2 for k, v in h200["head_tflops"].items()}
    path = tmp_path / "x100.json"
    written = write_table(path, achieved, "NVIDIA X100", 90.04, "run A")
    assert "layer_tflops" in written and "head_tflops.cce" in written
    rates = AchievedRates.read(path)
    assert (rates.gpu, rates.memory_gib, rates.layer_tflops) == ("NVIDIA X100", 90.0, 400.0)
    assert dict(rates.head_tflops) == {k: float(round(v / 2)) for k, v in h200["head_tflops"].items()}
    # a second run updates what it timed and keeps the rest, each figure noting how it was measured
    write_table(path, {"head_tflops[cce]": 999.0}, "NVIDIA X100", 90.04, "run B")
    table = json.loads(path.read_text())
    assert table["head_tflops"]["cce"] == 999.0 and table["layer_tflops"] == 400.0
    assert table["notes"]["head_tflops.cce"] == "run B" and table["notes"]["layer_tflops"] == "run A"
