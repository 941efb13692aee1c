"""[float8]: which layers convert, the one-line refusals, and float8 runs (emulated on CPU) against plain ones:
close losses under FSDP's float8 all-gather and pipeline stages, and checkpoints that load both ways exactly."""

import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from config.errors import ConfigError
from config.job_config import Float8
from models import Transformer, build_model_args
from models.output_head import OutputHead
from parallelisms.float8 import check_float8, convert_to_float8, converts
from tests.dist_utils import run_distributed
from tests.weights import loaded_parameters, whole_parameters
from train import train
from training.recipe import load_recipe

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
EMULATED = ["--float8.enable", "--float8.emulate"]
# Float8 casts (e4m3 for weights and inputs, e5m2 for gradients) carry 3 and 2 mantissa bits; over 4 steps the
# debug model's losses stay within 3e-4 of the plain run's (one process), while the step-4 loss of a run that had
# not trained would be 10 % above: the bound leaves 7x room and still catches a run whose update went missing.
FLOAT8_RTOL = 2e-3


def _model() -> Transformer:
    with torch.device("meta"):
        return Transformer(build_model_args("qwen3", "debug"))


def _block_linears(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if type(m) is nn.Linear and name.startswith("layers.")}


@needs_torchao
def test_the_blocks_linears_convert_and_nothing_else_changes():
    """Every block linear but those ``filter_fqns`` keeps; the head stays the loss's; names and shapes unchanged."""
    from torchao.float8.float8_linear import Float8Linear

    model, plain = _model(), _model()
    expected = {name for name in _block_linears(model) if not name.endswith(".w2")}
    assert expected and len(expected) < len(_block_linears(model))
    converted = convert_to_float8(model, Float8(enable=True, filter_fqns=["w2"], emulate=True), dp_shard=1)
    assert set(converted) == expected
    assert {name for name, m in model.named_modules() if isinstance(m, Float8Linear)} == expected
    assert type(model.output) is OutputHead
    shapes = {name: (p.shape, p.dtype) for name, p in model.named_parameters()}
    assert shapes == {name: (p.shape, p.dtype) for name, p in plain.named_parameters()}


def test_a_linear_whose_dimensions_scaled_mm_cannot_take_stays():
    rule = Float8(enable=True)
    assert converts("layers.0.attention.wq", nn.Linear(32, 64), rule)
    assert not converts("layers.0.attention.wq", nn.Linear(24, 64), rule)  # 24: not a multiple of 16
    assert not converts("output", nn.Linear(32, 64), rule)  # outside the blocks


def test_where_float8_cannot_run_is_one_line(monkeypatch):
    on = Float8(enable=True)
    check_float8(Float8(), torch.device("cpu"))  # off: nothing to check
    if importlib.util.find_spec("torchao") is not None:
        with pytest.raises(ConfigError, match="float8.emulate = true") as err:
            check_float8(on, torch.device("cpu"))
        assert "this run is on cpu" in str(err.value)
        check_float8(Float8(enable=True, emulate=True), torch.device("cpu"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
        with pytest.raises(ConfigError, match="A100-SXM4-80GB is sm_80; float8 matmuls need sm_89 or newer"):
            check_float8(on, torch.device("cuda"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match="needs torchao, which is not installed: pip install -r requirements-cuda"):
        check_float8(Float8(enable=True, emulate=True), torch.device("cpu"))


@needs_torchao
def test_a_cpu_run_with_float8_stops_before_anything_is_written(tmp_path):
    dump = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/debug.toml", "--job.dump_folder", str(dump)]
        + ["--float8.enable"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "config error: float8.enable: float8 matmuls need a CUDA GPU of compute capability 8.9+, and this run is on "
        "cpu; set float8.emulate = true to check the numerics without one (no speed-up), or float8.enable = false"
    ]
    assert not dump.exists()


def _argv(folder, steps, *extra):
    return [
        "--config",
        "configs/debug.toml",
        "--training.steps",
        str(steps),
        "--lr_scheduler.warmup_steps",
        "2",
        "--job.dump_folder",
        str(folder),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "4",
        *extra,
    ]


def _interchange(rank, world_size, root):
    """A plain and a float8 run of 4 steps; then each one's step-4 checkpoint resumed by the other kind."""
    plain = train(load_recipe(_argv(root / "plain", 4)))
    plain_weights = whole_parameters(plain.model_parts)
    float8 = train(load_recipe(_argv(root / "float8", 4, *EMULATED)))
    float8_weights = whole_parameters(float8.model_parts)
    if rank == 0:
        for source, target in (("plain", "float8_from_plain"), ("float8", "plain_from_float8")):
            shutil.copytree(root / source / "checkpoint" / "step-4", root / target / "checkpoint" / "step-4")
    torch.distributed.barrier()
    resumes = [_argv(root / "float8_from_plain", 5, *EMULATED), _argv(root / "plain_from_float8", 5)]
    loaded = loaded_parameters(resumes)
    return plain.losses, float8.losses, plain_weights, float8_weights, loaded


@needs_torchao
@pytest.mark.multiprocess
def test_float8_trains_near_plain_and_checkpoints_load_both_ways_exactly(tmp_path):
    """dp_shard 2: FSDP gathers the float8 weights in float8, scales precomputed after each step."""
    plain, float8, plain_weights, float8_weights, (float8_from_plain, plain_from_float8) = run_distributed(
        _interchange, 2, tmp_path, timeout_s=300
    )[0]
    assert len(plain) == len(float8) == 4
    assert float8 != plain  # float8 casts ran
    assert float8 == pytest.approx(plain, rel=FLOAT8_RTOL)
    assert set(float8_weights) == set(plain_weights)
    for name, value in plain_weights.items():
        assert torch.equal(float8_from_plain[name], value), name
        assert torch.equal(plain_from_float8[name], float8_weights[name]), name


def _layout_pairs(rank, world_size, root):
    """Plain and float8 runs of each layout in turn: {layout: {kind: (losses, validation)}}."""
    pipeline = (
        "--parallelism.pipeline_parallel_degree 2 --parallelism.vocab_parallel --validation.enable "
        "--validation.dataset_path data/corpus --validation.steps 2 --validation.freq 2"
    ).split()
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]
    out = {}
    for layout, extra in (("pipeline", pipeline), ("hsdp", hsdp)):
        for kind, more in (("plain", []), ("float8", EMULATED)):
            result = train(load_recipe(_argv(root / f"{layout}_{kind}", 4, *extra, *more)))
            out.setdefault(layout, {})[kind] = (result.losses, result.validation)
    return out


@needs_torchao
@pytest.mark.multiprocess
def test_float8_under_pipeline_stages_vocab_parallel_head_validation_and_hsdp(tmp_path):
    """pp 2 x dp_shard 2 with the tied embedding across stages, the vocab-parallel head and validation every 2
    steps; HSDP 2 x 2 (float8 all-gather within each shard group)."""
    runs = run_distributed(_layout_pairs, 4, tmp_path, timeout_s=300)[0]
    for layout, kinds in runs.items():
        (plain, plain_validation), (float8, float8_validation) = kinds["plain"], kinds["float8"]
        assert len(plain) == 4 and float8 != plain, layout
        assert float8 == pytest.approx(plain, rel=FLOAT8_RTOL), layout
    (_, plain_validation), (_, float8_validation) = runs["pipeline"]["plain"], runs["pipeline"]["float8"]
    assert list(float8_validation) == list(plain_validation) == [2, 4]
    for step in (2, 4):
        got, want = float8_validation[step]["validation_loss"], plain_validation[step]["validation_loss"]
        assert got == pytest.approx(want, rel=FLOAT8_RTOL)
