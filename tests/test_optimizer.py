"""FlatAdamW against torch.optim.AdamW: the same steps, the same state, checkpoints that load both ways,
and the same training under every parallel layout.

Compared within 1e-6 relative, not bitwise: torch's foreach AdamW computes the update with other
operations than the fused kernel (a lerp for the first moment, a separate division), which round
differently in the last bit of some elements; 10 steps keep that at fp32 rounding.
"""

import io
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from config.job_config import Optimizer
from models.initialize import canonical_name
from parallelisms.distributed import init_mesh
from tests.dist_utils import run_distributed
from train import train
from training.flat_adamw import FlatAdamW
from training.optimizer import build_optimizer
from training.recipe import load_recipe

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (0,), (2, 9)]
NEVER_GRAD = 3  # this parameter never gets a gradient; parameter 1 has none every third step
STEPS = 10
SETTINGS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
CLOSE = dict(rtol=1e-6, atol=1e-7)


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _optimizer(kind: str, params) -> torch.optim.AdamW:
    if kind == "flat":
        return FlatAdamW(params, **SETTINGS)
    return torch.optim.AdamW(params, **SETTINGS, foreach=kind == "foreach", fused=kind == "fused")


def _train(optimizer, params, steps) -> None:
    """Random gradients, some missing, and an LR that changes every step (as the schedule changes it)."""
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g)
            p.grad = None if i == NEVER_GRAD or (i == 1 and step % 3 == 0) else grad
        for group in optimizer.param_groups:
            group["lr"] = SETTINGS["lr"] * (1 + step) / STEPS
        optimizer.step()


def _assert_same(flat, flat_params, ref, ref_params) -> None:
    for i, (p, q) in enumerate(zip(flat_params, ref_params)):
        torch.testing.assert_close(p, q, **CLOSE, msg=lambda m, i=i: f"parameter {i}: {m}")
        mine = flat.state.get(p)
        if q not in ref.state:  # never stepped: torch has no state yet, FlatAdamW's is still zero
            assert i == NEVER_GRAD and (mine is None or (mine["step"] == 0 and not mine["exp_avg"].any()))
            continue
        for name, value in ref.state[q].items():
            torch.testing.assert_close(mine[name].float(), value.float(), **CLOSE, msg=f"{name} of parameter {i}")


@pytest.mark.parametrize("kind", ["foreach", "fused"])
def test_steps_match_torch_adamw(kind):
    flat_params, ref_params = _params(), _params()
    flat, ref = _optimizer("flat", flat_params), _optimizer(kind, ref_params)
    _train(flat, flat_params, range(STEPS))
    _train(ref, ref_params, range(STEPS))
    _assert_same(flat, flat_params, ref, ref_params)


def test_the_recipe_picks_the_implementation():
    assert type(build_optimizer(_params(), Optimizer())) is FlatAdamW
    torch_adamw = build_optimizer(_params(), Optimizer(implementation="torch"))
    assert type(torch_adamw) is torch.optim.AdamW and torch_adamw.param_groups[0]["fused"]


def _saved(optimizer) -> dict:
    """The state dict after a round trip through bytes, as a checkpoint holds it (no tensor shared)."""
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("source, target", [("flat", "foreach"), ("foreach", "flat"), ("flat", "flat")])
def test_a_state_dict_loads_into_either_and_training_continues_alike(source, target):
    """Half the steps with ``source``, its state dict loaded into ``target`` over copies of the parameters,
    the rest with ``target``: as if ``source`` had taken every step."""
    straight_params, params = _params(), _params()
    straight, first = _optimizer(source, straight_params), _optimizer(source, params)
    _train(straight, straight_params, range(STEPS))
    _train(first, params, range(STEPS // 2))
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = _optimizer(target, resumed_params)
    resumed.load_state_dict(_saved(first))
    _train(resumed, resumed_params, range(STEPS // 2, STEPS))
    flat, flat_params, ref, ref_params = (
        (resumed, resumed_params, straight, straight_params)
        if target == "flat"
        else (straight, straight_params, resumed, resumed_params)
    )
    _assert_same(flat, flat_params, ref, ref_params)


# -- FSDP2 shards and DCP, as training/checkpoint.py saves and loads ----------------------------------------
_DCP = StateDictOptions(flatten_optimizer_state_dict=True)


def _sharded_model(mesh) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))  # 5 and 3 rows: uneven over 2 ranks
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_steps(model, optimizer, steps, rank) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(10 * step + rank)
        model(torch.randn(4, 6, generator=g)).square().sum().backward()
        for group in optimizer.param_groups:
            group["lr"] = 0.05 / (1 + step)
        optimizer.step()
        optimizer.zero_grad()


def _dcp_round_trips(rank, world_size, folder):
    """For each (saving, loading) implementation: 3 steps, a DCP checkpoint, 3 more steps; and a fresh model
    and optimizer of the other implementation that load the checkpoint and take the same 3 steps."""
    mesh = init_mesh("cpu", (world_size,), ("dp_shard",))
    build = {
        "flat": lambda m: build_optimizer(list(m.parameters()), Optimizer(lr=0.05)),
        "torch": lambda m: build_optimizer(list(m.parameters()), Optimizer(lr=0.05, implementation="torch")),
    }
    results = {}
    for saving, loading in (("torch", "flat"), ("flat", "torch")):
        path = f"{folder}/{saving}"
        model = _sharded_model(mesh)
        optimizer = build[saving](model)
        _fsdp_steps(model, optimizer, range(3), rank)
        state = {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=_DCP),
        }
        dcp.save(state, checkpoint_id=path)
        _fsdp_steps(model, optimizer, range(3, 6), rank)

        other = _sharded_model(mesh)
        resumed = build[loading](other)
        state = {
            "model": get_model_state_dict(other),
            "optimizer": get_optimizer_state_dict(other, resumed, options=_DCP),
        }
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(other, state["model"])
        set_optimizer_state_dict(other, resumed, state["optimizer"], options=_DCP)
        _fsdp_steps(other, resumed, range(3, 6), rank)
        results[f"{saving} to {loading}"] = [
            (p.full_tensor(), q.full_tensor()) for p, q in zip(model.parameters(), other.parameters())
        ]
    return results


@pytest.mark.multiprocess
def test_dcp_checkpoints_of_sharded_parameters_load_both_ways(tmp_path):
    results = run_distributed(_dcp_round_trips, 2, str(tmp_path), timeout_s=120)[0]
    for name, pairs in results.items():
        for i, (straight, resumed) in enumerate(pairs):
            torch.testing.assert_close(resumed, straight, **CLOSE, msg=lambda m, i=i, n=name: f"{n}, {i}: {m}")


# -- whole runs under every parallel layout --------------------------------------------------------------
def _recipe(folder: Path, implementation: str, overrides: list[str]) -> list[str]:
    return [
        "--config",
        "configs/debug.toml",
        "--model.vocab_size",
        "515",
        "--training.steps",
        "3",
        "--training.seq_len",
        "32",
        "--training.global_batch_size",
        "8",
        "--lr_scheduler.warmup_steps",
        "1",
        "--optimizer.eps",
        "1e-6",  # as the equivalence tests: Adam amplifies less of the float noise in near-zero gradients
        "--optimizer.implementation",
        implementation,
        "--job.dump_folder",
        str(folder / implementation),
        *overrides,
    ]


def _train_runs(rank, world_size, argvs):
    """Each recipe in turn in one launch of the processes: its losses and its full parameters by name."""
    runs = []
    for argv in argvs:
        result = train(load_recipe(argv))
        params = {
            canonical_name(name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for part in result.model_parts
            for name, p in part.named_parameters()
        }
        runs.append((result.losses, params))
    return runs


_PP2 = ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size", "2"]
_VP = ["--parallelism.vocab_parallel"]
LAYOUTS = {
    2: {
        "dp_shard2": ["--training.local_batch_size", "2"],
        "hsdp_replicate2": ["--training.local_batch_size", "4", "--parallelism.data_parallel_replicate_degree", "2"],
        "vocab_parallel_dp_shard2": [*_VP, "--training.local_batch_size", "4"],
        # qwen3 ties its embedding: stage 0 (rank 0) and the head copy of stage 3 (rank 1) step alike.
        "pp2_interleaved_virtual2_tied": [
            *_PP2,
            "--training.local_batch_size",
            "8",
            "--parallelism.pipeline_parallel_schedule",
            "Interleaved1F1B",
            "--parallelism.pipeline_parallel_virtual_stages",
            "2",
        ],
    },
    4: {
        "vocab_parallel_hsdp": [
            *_VP,
            "--training.local_batch_size",
            "2",
            "--parallelism.data_parallel_replicate_degree",
            "2",
        ],
        "pp2_dp_shard2_1F1B": [
            *_PP2,
            "--training.local_batch_size",
            "4",
            "--parallelism.pipeline_parallel_schedule",
            "1F1B",
        ],
    },
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", list(LAYOUTS))
def test_every_layout_trains_alike_with_either_implementation(world_size, tmp_path):
    """Each layout with FlatAdamW and with torch's AdamW, all in one launch: the same losses and parameters."""
    layouts = LAYOUTS[world_size]
    argvs = [
        _recipe(tmp_path / name, implementation, overrides)
        for name, overrides in layouts.items()
        for implementation in ("flat", "torch")
    ]
    per_rank = run_distributed(_train_runs, world_size, argvs, timeout_s=600)
    for i, name in enumerate(layouts):
        (flat_losses, _), (torch_losses, _) = per_rank[0][2 * i], per_rank[0][2 * i + 1]
        torch.testing.assert_close(torch.tensor(flat_losses), torch.tensor(torch_losses), rtol=1e-6, atol=0, msg=name)
        flat_params = {k: v for ranks in per_rank for k, v in ranks[2 * i][1].items()}
        torch_params = {k: v for ranks in per_rank for k, v in ranks[2 * i + 1][1].items()}
        assert flat_params.keys() == torch_params.keys(), name
        for key, value in flat_params.items():
            torch.testing.assert_close(
                value, torch_params[key], rtol=1e-6, atol=1e-6, msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
            )


@pytest.mark.parametrize("kind", ["flat", "fused"])
def test_a_step_with_found_inf_changes_nothing(kind):
    """training/step.py skips a non-finite step on the device: parameters, moments and step counts stay, and the
    next steps are those of an optimizer that never saw it."""
    params, ref_params = _params(), _params()
    optimizer, ref = _optimizer(kind, params), _optimizer(kind, ref_params)
    _train(optimizer, params, range(3))
    _train(ref, ref_params, range(3))
    for p in params:
        if p.grad is not None:
            p.grad.fill_(float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    _assert_same(optimizer, params, ref, ref_params)
    optimizer.found_inf = ref.found_inf = torch.zeros(())
    _train(optimizer, params, range(3, 6))
    _train(ref, ref_params, range(3, 6))
    _assert_same(optimizer, params, ref, ref_params)


@pytest.mark.parametrize("kind", ["flat", "fused"])
def test_grad_scale_divides_the_gradients(kind):
    """training/step.py clips through the kernel's grad_scale: the update is torch's (foreach) AdamW on gradients
    divided beforehand, as ``clip_grad_norm_`` would leave them."""
    params, ref_params = _params(), _params()
    optimizer, ref = _optimizer(kind, params), _optimizer("foreach", ref_params)
    for step in range(4):
        divisor = torch.tensor(1.0 + 0.7 * step)
        g = torch.Generator().manual_seed(200 + step)
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, generator=g) * 5
            q.grad = p.grad / divisor
        optimizer.grad_scale = divisor
        optimizer.step()
        ref.step()
    _assert_same(optimizer, params, ref, ref_params)
