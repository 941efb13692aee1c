"""The memory estimate of ``train.py --dry_run`` against measured peaks, and the dry run end to end."""

import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import _ComputationType
from torch.nn.attention.flex_attention import create_block_mask

import train
from models import Transformer, build_model_args
from models.attention import dense_block_causal_mask, document_ids
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PIPELINE_SCHEDULES
from planning.cost import DEFAULT_GPU
from planning.gpu import of_kind
from planning.memory import (
    CUDA_OVERHEAD_GIB,
    GIB,
    block_causal_mask_bytes,
    estimate_memory,
    peaks_per_rank_gib,
    stage_fits,
)
from planning.schedule_search import choose_pipeline
from training.recipe import load_recipe

ONE_GPU = "configs/qwen3_1p7b.toml"
PP4 = "configs/qwen3_1p7b_pp4.toml"
# The runs below used 1F1B, one sequence per microbatch, 8 per rank and the then-default even split; the
# recipe now chooses its schedule and microbatches and balances the stages' time.
SPLIT = "--parallelism.pipeline_parallel_stage_split_points"
AS_MEASURED = [
    "--parallelism.pipeline_parallel_schedule",
    "1F1B",
    "--parallelism.pipeline_parallel_microbatch_size",
    "1",
    "--training.local_batch_size",
    "8",
]
EVEN4 = [*AS_MEASURED, SPLIT, "[7, 14, 21]"]
PP2 = [*AS_MEASURED, "--parallelism.pipeline_parallel_degree", "2", SPLIT, "[14]"]
FSDP4 = ["--parallelism.pipeline_parallel_degree", "1", "--training.local_batch_size", "2"]
VOCAB_PARALLEL = ["--parallelism.vocab_parallel", "--loss.name", "auto"]
INTERLEAVED = [
    *AS_MEASURED,
    "--parallelism.pipeline_parallel_schedule",
    "Interleaved1F1B",
    SPLIT,
    "[4, 8, 12, 16, 19, 22, 25]",
]

# Measured torch.cuda.max_memory_allocated per rank, GiB, in rank order (memory.json's
# peak_memory_gib_per_rank), as quoted in docs/performance.md: "Qwen3-1.7B on one H100 80GB"
# (steps 20, warmup 8) and "Qwen3-1.7B on 4 x H200" (the recipe scaled to 4 GPUs, with the
# overrides of that section's benchmark command). Measurements, not fitted targets.
MEASURED = [
    ("1 H100, cce, 2 sequences", ONE_GPU, [], 1, [30.7]),
    ("1 H100, cross_entropy, 2 sequences", ONE_GPU, ["--loss.name", "cross_entropy"], 1, [43.6]),
    ("1 H100, cce, 4 sequences", ONE_GPU, ["--training.local_batch_size", "4"], 1, [40.7]),
    (
        "1 H100, cce, 4 sequences, float8",
        ONE_GPU,
        ["--training.local_batch_size", "4", "--float8.enable"],
        1,
        [40.6],
    ),
    ("PP=4, cce", PP4, EVEN4, 4, [16.4, 10.1, 8.9, 13.3]),
    ("PP=4, cross_entropy", PP4, [*EVEN4, "--loss.name", "cross_entropy"], 4, [16.4, 10.1, 8.9, 19.6]),
    ("PP=4, 16 sequences, cce", PP4, [*EVEN4, "--training.local_batch_size", "16"], 4, [16.6, 10.3, 9.1, 13.5]),
    (
        "PP=4, 16 sequences, Interleaved1F1B x2",
        PP4,
        ["--training.local_batch_size", "16", *INTERLEAVED],
        4,
        [19.4, 13.3, 12.0, 16.1],
    ),
    ("PP=2 x dp_shard=2, cce", PP4, PP2, 4, [16.6, 16.6, 14.7, 14.7]),
    ("PP=2 x dp_shard=2, vocab-parallel head", PP4, [*PP2, *VOCAB_PARALLEL], 4, [16.6, 16.6, 13.9, 13.9]),
    ("PP=2 x dp_shard=2, cross_entropy", PP4, [*PP2, "--loss.name", "cross_entropy"], 4, [16.6, 16.6, 21.1, 21.1]),
    ("FSDP=4, cce", PP4, FSDP4, 4, [16.3] * 4),
    ("FSDP=4, vocab-parallel head", PP4, [*FSDP4, *VOCAB_PARALLEL], 4, [16.3] * 4),
]


def _estimate(cfg, dims: ParallelDims, gpu_memory_gib=None):
    """The estimate for the plan the run would make (the dry run's)."""
    plan = choose_pipeline(cfg, dims, of_kind("h200", gpu_memory_gib)).plan_for(0) if dims.pp > 1 else None
    return estimate_memory(cfg, dims, plan)


def _predicted(config: str, overrides: list[str], world_size: int) -> list[float]:
    cfg = load_recipe(["--config", config, *overrides])
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    return peaks_per_rank_gib(_estimate(cfg, dims), dims)


@pytest.mark.parametrize("label, config, overrides, world_size, measured", MEASURED, ids=[m[0] for m in MEASURED])
def test_estimate_is_within_15_percent_of_every_measured_peak(label, config, overrides, world_size, measured):
    predicted = _predicted(config, overrides, world_size)
    assert len(predicted) == len(measured)
    for rank, (got, want) in enumerate(zip(predicted, measured)):
        assert abs(got - want) <= 0.15 * want, f"{label}, rank {rank}: predicted {got} GiB, measured {want} GiB"


@pytest.mark.parametrize("schedule, in_flight", [("1F1B", [4, 3, 2, 1]), ("GPipe", [8, 8, 8, 8])])
def test_microbatches_in_flight_follow_the_schedule(schedule, in_flight):
    cfg = load_recipe(["--config", PP4, *AS_MEASURED, "--parallelism.pipeline_parallel_schedule", schedule])
    estimates = _estimate(cfg, ParallelDims.from_config(cfg.parallelism, 8))
    assert [m.in_flight for m in estimates] == in_flight


def _most_in_flight(schedule: str, pp: int, microbatches: int, per_rank: int) -> list[int]:
    """Per rank, the most microbatches whose forward ran and whose backward (or weight backward) did
    not, counted on torch's visualizer tables, independently of planning/."""
    most = []
    for rank_ops in get_schedule_ops(PIPELINE_SCHEDULES[schedule], pp, microbatches, per_rank):
        held = peak = 0
        for action in rank_ops:
            subs = (action.sub_actions or ()) if action is not None else ()
            for a in subs or ([action] if action is not None else []):
                if a.computation_type == _ComputationType.FORWARD:
                    held += 1
                elif a.computation_type in (_ComputationType.FULL_BACKWARD, _ComputationType.BACKWARD_WEIGHT):
                    held -= 1
                peak = max(peak, held)
        most.append(peak)
    return most


def test_the_estimate_counts_the_schedule_the_plan_chose():
    """The recipe leaves the schedule to the search: the estimate holds the chosen schedule's microbatches
    in flight, not the recipe's literal value."""
    cfg = load_recipe(["--config", PP4])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    estimates = _estimate(cfg, dims, gpu_memory_gib=80)
    plan = estimates[0].plan
    assert cfg.parallelism.pipeline_parallel_schedule == "auto" and plan.schedule == "Interleaved1F1B"
    per_rank = plan.num_stages // plan.pp_degree
    # the stages of a rank differ in size: the peak holds at least as many as any one table moment's count
    assert [m.in_flight for m in estimates] == _most_in_flight(plan.schedule, 4, plan.n_microbatches, per_rank)


def test_stage_fits_is_the_ranks_predicted_peak_with_one_stage_per_rank():
    """For each rank of a 9/9/9/1 split: fits exactly at its own peak + the CUDA overhead, not below."""
    cfg = load_recipe(["--config", PP4, SPLIT, "[9, 18, 27]"])
    dims = ParallelDims.from_config(cfg.parallelism, 4)
    estimates = _estimate(cfg, dims)
    plan = estimates[0].plan
    for m in estimates:
        (stage,) = m.stages
        at_peak = m.peak / GIB + CUDA_OVERHEAD_GIB
        assert stage_fits(cfg, dims, at_peak)(plan, stage, m.layers)
        assert not stage_fits(cfg, dims, at_peak - 0.01)(plan, stage, m.layers)


def test_a_gpu_budget_moves_layers_off_the_fullest_rank():
    cfg = load_recipe(["--config", PP4, *AS_MEASURED])
    dims = ParallelDims.from_config(cfg.parallelism, 4)
    free = _estimate(cfg, dims)
    fullest = max(range(4), key=lambda r: free[r].peak)
    budget = free[fullest].peak / GIB + CUDA_OVERHEAD_GIB - 0.5  # the time-balanced split no longer fits
    bounded = _estimate(cfg, dims, gpu_memory_gib=budget)
    assert all(m.peak / GIB + CUDA_OVERHEAD_GIB <= budget for m in bounded)
    assert bounded[fullest].layers < free[fullest].layers and sum(m.layers for m in bounded) == 28


@pytest.fixture
def no_process_group(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run started a process group")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    yield
    assert not dist.is_initialized()


def test_dry_run_prints_the_table_and_exits_0_without_a_process_group(no_process_group, capsys, tmp_path):
    code = train.main(["--config", PP4, "--dry_run", "--world_size", "8", "--job.dump_folder", str(tmp_path)])
    out = capsys.readouterr().out
    gpu = of_kind(DEFAULT_GPU)  # what the dry run plans for without --gpu
    assert code == 0
    for row in (
        "parameters (fp32 shards)",
        "gradients (fp32 shards)",
        "optimizer state",
        "activations",
        "block-causal masks",
        "loss workspace",
        "CUDA context",
        "total on the GPU",
        f"fits {gpu.memory_gib:g} GiB",
        f"planned for {gpu.describe()}",
        "pp rank 3",
    ):
        assert row in out, row
    cfg = load_recipe(["--config", PP4])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    plan = choose_pipeline(cfg, dims, gpu).plan_for(0)
    peaks = peaks_per_rank_gib(estimate_memory(cfg, dims, plan), dims)
    assert f"predicted peak_memory_gib_per_rank: {peaks}" in out and len(peaks) == 8
    assert not list(tmp_path.iterdir())  # nothing written: no config.toml, no metrics
    # the same split's predicted compute, after the memory table
    timing = out[out.index("Predicted compute per microbatch") :]
    for row in ("stages (layers)", "forward + backward", "Interleaved1F1B bubble", "predicted step", "sends"):
        assert row in timing, row
    layers = "/".join(str(end - start) for start, end in plan.layer_ranges)
    assert f"split {layers} layers over stages 0-7, chosen to balance the head (cce, " in timing
    # how the schedule was chosen: the best candidates and why the winner won
    choice = out[out.index("pipeline schedule: ") :]
    assert "chosen: Interleaved1F1B, 2 stage(s) per rank, microbatch 1, the shortest predicted step" in choice
    assert "  1F1B " in choice and "step ms" in choice and "bubble" in choice and "peak GiB" in choice


def test_dry_run_world_size_comes_from_the_environment(no_process_group, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.main(["--config", ONE_GPU, "--dry_run", "--gpu_memory_gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "world 4 = pp 1 x dp_replicate 1 x dp_shard 4" in out and "fits 24 GiB" in out
    assert "Predicted compute" not in out  # no pipeline, no per-rank compute


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--dry_run", "--world_size", "6"],
            "config error: parallelism.pipeline_parallel_degree: pipeline_parallel_degree "
            "(4) x data_parallel_replicate_degree (1) = 4 does not divide the world size 6",
        ),
        (["--dry_run", "--world_size", "two"], "config error: --world_size: expected a positive integer, got 'two'"),
        (["--world_size", "8"], "config error: --world_size: only goes with --dry_run"),
    ],
)
def test_dry_run_config_errors_are_one_line(no_process_group, capsys, args, message):
    assert train.main(["--config", PP4, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_block_causal_mask_bytes_are_those_of_the_masks_attention_keeps():
    """Against the tensors models/attention.py builds (FlexAttention's BlockMask built eagerly on the CPU:
    the same tensors CUDA's compiled builder returns) and their document ids."""
    batch, seq = 2, 512
    tokens = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(0))
    doc_ids = document_ids(tokens, eos_id=0)

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    block_mask = create_block_mask(same_document_causal, batch, None, seq, seq, device="cpu")
    held = [t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor)] + [doc_ids]
    assert block_causal_mask_bytes(batch, seq, "cuda") == sum(t.numel() * t.element_size() for t in held)
    dense = dense_block_causal_mask(doc_ids)
    assert block_causal_mask_bytes(batch, seq, "cpu") == dense.numel() * dense.element_size() + 4 * doc_ids.numel()


def test_block_causal_adds_one_mask_per_microbatch_in_flight():
    cfg = load_recipe(["--config", PP4])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    causal = _estimate(cfg, dims, 80)
    masked = _estimate(load_recipe(["--config", PP4, "--model.attn_mask_type", "block_causal"]), dims, 80)
    mask = block_causal_mask_bytes(1, 4096)
    assert mask == 4 * 4 * 32 * 33 + 4 * 4096 and math.isclose(mask, 33_280)
    for c, m in zip(causal, masked):
        assert c.masks == 0 and m.masks == m.in_flight * mask
        assert m.peak == pytest.approx(c.peak + m.masks)


def test_dry_run_shows_the_table_and_the_line_the_run_would_stop_with(no_process_group, capsys):
    assert train.main(["--config", PP4, "--dry_run", "--world_size", "8", "--gpu_memory_gib", "10"]) == 0
    out = capsys.readouterr().out
    assert "fits 10 GiB" in out and "NO" in out
    assert "the run would stop here: config error: parallelism.pipeline_parallel_schedule: no schedule" in out


@pytest.mark.parametrize(
    "overrides, world, float8_bytes",
    [([], 4, 1), (["--float8.recipe", "rowwise"], 4, 2), ([], 1, 2)],
    ids=["tensorwise, sharded", "rowwise", "nothing sharded"],
)
def test_float8_all_gather_holds_the_gathered_blocks_linear_weights_at_one_byte(overrides, world, float8_bytes):
    """FSDP gathers two blocks at a time; with tensorwise float8 on sharded weights their linear layers'
    weights come gathered in float8 (torchao's all-gather); rowwise, or a single rank, gathers them in bf16."""
    args = [*FSDP4, *overrides]
    cfg = load_recipe(["--config", PP4, *args])
    dims = ParallelDims.from_config(cfg.parallelism, world)
    (plain,) = set(estimate_memory(cfg, dims, None))
    (float8,) = set(estimate_memory(load_recipe(["--config", PP4, *args, "--float8.enable"]), dims, None))
    a = build_model_args("qwen3", "1.7B")
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    linears = a.dim * (q + 2 * kv) + q * a.dim + 3 * a.dim * a.ffn_dim  # wq, wk, wv; wo; w1, w2, w3
    assert plain.unsharded_params - float8.unsharded_params == 2 * linears * (2 - float8_bytes)
    assert replace(float8, unsharded_params=plain.unsharded_params) == plain


def test_one_data_parallel_rank_holds_bf16_copies_where_fsdp_holds_gathered_ones():
    """Without FSDP (parallelisms/compute_weights.py) the copies are held and freed as FSDP would gather and
    reshard them, b bytes a parameter, none in fp32; under PP the gradients accumulate in the fp32 ``.grad``
    from the first microbatch, not unsharded."""
    with torch.device("meta"):
        model = Transformer(build_model_args("qwen3", "1.7B"))
    params, block = (sum(p.numel() for p in m.parameters()) for m in (model, model.layers["0"]))
    dims = ParallelDims.from_config(load_recipe(["--config", ONE_GPU]).parallelism, 1)

    def one_rank(*overrides: str):
        (estimate,) = estimate_memory(load_recipe(["--config", ONE_GPU, *overrides]), dims, None)
        return estimate

    never = one_rank("--parallelism.fsdp_reshard_after_forward", "never")
    assert never.unsharded_params == 2 * params and never.parameters == 4 * params
    assert one_rank().unsharded_params == never.unsharded_params - 2 * 26 * block  # all blocks but two freed
    fp32 = one_rank("--training.mixed_precision_param", "float32", "--loss.name", "chunked")
    assert fp32.unsharded_params == 0

    cfg = load_recipe(["--config", PP4, *EVEN4])
    dims = ParallelDims.from_config(cfg.parallelism, 4)
    for rank in _estimate(cfg, dims):
        assert rank.unsharded_grads == 0
        assert rank.unsharded_params == 2 * rank.parameters / 4 and rank.gradients == rank.parameters


def test_one_rank_flat_adamw_steps_on_bf16_gradients_and_writes_the_copies():
    """One rank, one micro-step, ``FlatAdamW``: the optimizer step holds bf16 gradients, 2 bytes a parameter,
    and the bf16 copies it writes, 2 more; torch's AdamW needs the gradients in fp32 and no copies, a second
    micro-step the gradients in fp32."""
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(build_model_args("qwen3", "1.7B")).parameters())
    dims = ParallelDims.from_config(load_recipe(["--config", ONE_GPU]).parallelism, 1)
    short = ["--training.seq_len", "256", "--training.local_batch_size", "1"]  # so the step is the peak

    def step(*overrides: str) -> tuple[float, float]:
        (estimate,) = estimate_memory(load_recipe(["--config", ONE_GPU, *short, *overrides]), dims, None)
        assert estimate.phase == "optimizer step"
        return estimate.gradients, estimate.unsharded_params

    assert step() == (2 * params, 2 * params)
    assert step("--optimizer.implementation", "torch") == (4 * params, 0)
    assert step("--training.global_batch_size", "2") == (4 * params, 2 * params)
