"""Predicted peak GPU memory of every pipeline rank, from the recipe and the layout alone.

``python train.py --config X --dry_run --world_size N`` prints it (planning/dry_run.py).
No device memory, no process group: the stages are the run's own plan (``choose_pipeline``),
their parameters counted on a meta-device model, the microbatches in flight read off torch's
own schedule tables, and the rest is byte counting. Every data-parallel
rank of a pipeline rank holds the same, so there is one estimate per pipeline rank. The
same terms give ``stage_fits``, the memory constraint of the default split.

The peak is the larger of two moments of a steady-state step (the optimizer state
exists from step 1's update on):

- backward: fp32 master shards + AdamW state + what FSDP holds gathered (the blocks' float8
  linear weights at one byte where ``[float8]`` gathers them in float8), or with one
  data-parallel rank the bf16 copies held instead (parallelisms/compute_weights.py) + the
  activations of the microbatches in flight (under the schedule the plan runs, which
  ``"auto"`` may have chosen) and their block-causal masks + the largest transient, either the
  loss's workspace or one block's backward (its activations recomputed without
  checkpointing and its bf16 gradients). Gradient shards are freed by
  ``zero_grad(set_to_none=True)``, so they exist here only under gradient
  accumulation;
- optimizer step: master shards + gradient shards + AdamW state, and with one data-parallel rank
  the bf16 copies where the optimizer writes them (``optimizer_can_cast``).

Every term is counted from the code (ours, torch's FSDP2 and pipelining); nothing is
fitted to measurements. tests/test_memory_estimate.py holds the result within 15 % of
the peaks measured in docs/performance.md, whose section "Predicting memory before a
run" lists the terms, the comparison and what is left out.
"""

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch.distributed.pipelining.schedules import _ComputationType

from config.job_config import Float8, JobConfig
from losses import ENTRIES
from losses.facts import LossShape
from models import Transformer, build_model_args
from models.args import ModelArgs
from parallelisms.compute_weights import optimizer_can_cast
from parallelisms.float8 import converts, float8_all_gather
from parallelisms.fsdp import fsdp_groups, tied_in_root
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PipelinePlan
from planning.batch import accumulation_steps
from planning.cost import loss_choice
from planning.replay import schedule_ops

GIB = 2**30
# CUDA context, NCCL buffers and the caching allocator's unused reserve: not in
# torch.cuda.max_memory_allocated (memory.json), but on the GPU. A fixed guess, not measured.
CUDA_OVERHEAD_GIB = 1.0
_BYTES = {"bfloat16": 2, "float32": 4}

# fits(plan, stage, layers): whether the rank holding ``stage`` fits its GPU with ``layers`` layers there.
StageFits = Callable[[PipelinePlan, int, int], bool]


@dataclass(frozen=True)
class RankMemory:
    """Bytes one pipeline rank (each of its data-parallel ranks) holds at its predicted peak."""

    pp_rank: int
    stages: tuple[int, ...]
    layers: int
    phase: str  # "backward" or "optimizer step": the larger moment, which the figures below describe
    parameters: float  # fp32 master shards
    gradients: float  # fp32 gradient shards (and the vocab-parallel head's) alive at the peak
    optimizer: float  # AdamW exp_avg and exp_avg_sq, fp32 shards
    unsharded_params: float  # gathered by FSDP and not yet resharded; one data-parallel rank: the bf16 copies
    unsharded_grads: float  # PP: accumulated over microbatches; no PP: a tied root's, reduced at the end
    pipeline_buffers: float  # the stage's receive buffers, one per microbatch
    activations: float
    masks: float  # block_causal: the attention masks of the microbatches in flight
    in_flight: int  # (stage, microbatch) pairs whose activations are held at the peak
    transient: float  # the larger of the loss workspace and one block's backward
    plan: Optional[PipelinePlan] = None  # the split these figures are for (None without PP)

    @property
    def peak(self) -> float:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.unsharded_params
            + self.unsharded_grads
            + self.pipeline_buffers
            + self.activations
            + self.masks
            + self.transient
        )


def layer_activation_bytes(a: ModelArgs, mode: str, compiled: bool, act_bytes: int) -> float:
    """Bytes one block keeps for its backward, per token.

    ``none``: every tensor the eager block saves (compiled blocks save less: the
    partitioner recomputes pointwise ops). ``op``: the block input and the outputs of
    the matmuls and attention that op-level selective AC saves; a compiled block drops
    w2's, which backward never reads. ``full``: the block input.
    """
    d, q, kv, f = a.dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.ffn_dim
    lse = 4 * a.n_heads  # attention's fp32 log-sum-exp
    if mode == "full":
        return act_bytes * d
    if mode == "op":
        return act_bytes * (d + q + 2 * kv + q + d + 2 * f + (0 if compiled else d)) + lse
    # norm inputs and outputs (4d), SDPA's q, k, v, output and wo's input copy (5q),
    # q/k before their norms, SwiGLU's w1, silu, w3 and product (4f)
    return act_bytes * (4 * d + 5 * q + (q + kv if a.qk_norm else 0) + 4 * f) + lse


def _block_modes(cfg: JobConfig, n_blocks: int) -> list[str]:
    """The AC mode of each block of a stage, as parallelisms/activation_checkpoint.py applies it."""
    ac = cfg.activation_checkpoint
    if ac.mode != "selective":
        return [ac.mode] * n_blocks
    if ac.selective_ac_option == "op":
        return ["op"] * n_blocks
    every = int(ac.selective_ac_option)
    return ["full" if (i + 1) % every == 0 else "none" for i in range(n_blocks)]


def loss_workspace(cfg: JobConfig, a: ModelArgs, tokens: int, dp_shard: int, head_reduced_at_once: bool) -> float:
    """Peak bytes of the loss's forward + backward on ``tokens`` tokens, beyond its inputs.

    The entry's own bytes are its facts' ``workspace`` (losses/entries/, counted from the
    implementations and checked against benchmarks/loss_bench.py and vocab_parallel_bench.py,
    docs/performance.md). Without the vocab-parallel head FSDP's copy of the gathered
    classifier's gradient may outgrow them; with it, each rank computes the gathered tokens
    against its rows and also holds its shard's gradient upcast to fp32 and the gathered hidden states.
    """
    v, d, n = a.vocab_size, a.dim, tokens
    param_b, reduce_b = _BYTES[cfg.training.mixed_precision_param], _BYTES[cfg.training.mixed_precision_reduce]
    workspace = ENTRIES[loss_choice(cfg).entry].facts.workspace
    if cfg.parallelism.vocab_parallel:
        rows, gathered = math.ceil(v / dp_shard), dp_shard * n
        head = 4 * rows * d + param_b * gathered * d
        return head + workspace(LossShape(rows, gathered, d, param_b, cfg.loss.chunk_size, True, 0))
    # The gathered classifier's gradient, plus the fp32 copy FSDP reduce-scatters right away
    # when the head is its own group and no pipeline defers the reduction.
    classifier_grad = (param_b + (reduce_b if head_reduced_at_once else 0)) * v * d
    return workspace(LossShape(v, n, d, param_b, cfg.loss.chunk_size, False, classifier_grad))


def block_causal_mask_bytes(batch: int, seq_len: int, device_type: str = "cuda") -> float:
    """Bytes of one forward's block-causal mask (models/attention.py), which every block of a
    stage shares and attention keeps for its backward, with the document ids it is built from.

    CUDA: FlexAttention's ``BlockMask``, int32 block counts and indices of 128 x 128 blocks,
    by rows and by columns, for the partial and the full blocks: 4 ``[batch, 1, n, n]`` and
    4 ``[batch, 1, n]`` tensors, n = seq_len / 128. Elsewhere: SDPA's dense ``[batch, 1, seq,
    seq]`` booleans."""
    doc_ids = 4 * batch * seq_len
    if device_type == "cuda":
        blocks = math.ceil(seq_len / 128)
        return 4 * 4 * batch * blocks * (blocks + 1) + doc_ids
    return batch * seq_len * seq_len + doc_ids


def _held_at_peak(ops: tuple, stage_bytes: dict[int, float]) -> dict[int, int]:
    """Microbatches of each stage whose activations a rank's actions hold at its peak: a forward
    adds one microbatch of its stage, the backward that finishes one (full, or weight for
    zero-bubble) frees it. Counted per stage, not per microbatch id (torch's 1F1B table numbers
    the last rank's from 1)."""
    held = dict.fromkeys(stage_bytes, 0)
    peak, at_peak = 0.0, dict(held)
    for action in ops:
        if action.stage_index not in held:
            continue
        if action.computation_type == _ComputationType.FORWARD:
            held[action.stage_index] += 1
        elif action.computation_type in (_ComputationType.FULL_BACKWARD, _ComputationType.BACKWARD_WEIGHT):
            held[action.stage_index] -= 1
        total = sum(stage_bytes[s] * k for s, k in held.items())
        if total > peak:
            peak, at_peak = total, dict(held)
    return at_peak


def _most_held(ops: tuple) -> dict[int, int]:
    """Per stage of a rank, the most of its microbatches in flight at any moment (counted as ``_held_at_peak``)."""
    held: dict[int, int] = {}
    most: dict[int, int] = {}
    for action in ops:
        s = action.stage_index
        if action.computation_type == _ComputationType.FORWARD:
            held[s] = held.get(s, 0) + 1
            most[s] = max(most.get(s, 0), held[s])
        elif action.computation_type in (_ComputationType.FULL_BACKWARD, _ComputationType.BACKWARD_WEIGHT):
            held[s] -= 1
    return most


def _copy_bytes(param_b: int) -> int:
    """Bytes per parameter of ComputeWeights' copy: none where parameters compute in fp32, their own dtype."""
    return 0 if param_b == 4 else param_b


def _rank_ops(plan: PipelinePlan) -> tuple:
    return schedule_ops(plan.schedule, plan.pp_degree, plan.n_microbatches, plan.num_stages // plan.pp_degree)


def _numel(module: Optional[torch.nn.Module]) -> int:
    return sum(x.numel() for x in module.parameters()) if module is not None else 0


def _gathered_without_pp(part: Transformer, p, vp_head: bool) -> tuple[int, int, int]:
    """(parameters FSDP holds gathered during the backward, gradients it holds unreduced, blocks among the
    gathered), no PP.

    From the groups parallelisms/fsdp.py shards: at most two blocks when blocks reshard
    (the one running and the one prefetched), every other group that is not resharded
    after its forward, and the root's tied embedding/head gradient, reduced only at the
    end of the backward.
    """
    groups = fsdp_groups(part, p.fsdp_reshard_after_forward, pp_enabled=False, vocab_parallel_head=vp_head)
    tied = tied_in_root(part, vp_head)
    own = {
        "embedding": _numel(part.tok_embeddings),
        "head": _numel(part.output),
        "root": _numel(part.norm) + (_numel(part.tok_embeddings) if tied else 0),
    }
    resharded = any(g.reshard_after_forward for g in groups if g.kind == "block")
    held_blocks = min(2, len(part.layers)) if resharded else len(part.layers)
    held = held_blocks * _numel(part.layers["0"])
    held += sum(own[g.kind] for g in groups if g.kind != "block" and not g.reshard_after_forward)
    return held, (_numel(part.tok_embeddings) if tied else 0), held_blocks


@dataclass(frozen=True)
class _Stage:
    """What a pipeline stage's terms depend on: counts, not modules, so that a split the
    default planner is only trying can be costed."""

    index: int
    layers: int
    params: int  # the head's included
    first: bool
    last: bool  # holds the final norm and the head


@dataclass(frozen=True)
class _Setting:
    """What every rank's terms share."""

    cfg: JobConfig
    args: ModelArgs
    dp_shard: int
    sequences: int  # per microbatch (per micro-step without PP)
    tokens: int
    param_b: int
    reduce_b: int
    compiled: bool
    block_backward: float  # the transient of one block's backward
    accumulation_steps: int  # micro-steps per optimizer step: gradient shards live through the backward when > 1
    one_rank: bool  # data-parallel degree 1: no FSDP; ComputeWeights' copies, gradients in .grad
    optimizer_casts: bool  # one rank: FlatAdamW reads the bf16 gradients and writes the copies
    mask: float  # block_causal: one microbatch's attention mask; 0 when causal
    float8_gather_saving: float  # bytes one gathered block saves where FSDP gathers its float8 linears in float8


@lru_cache(maxsize=4)
def _meta_model(a: ModelArgs) -> Transformer:
    """The model on the meta device, built once per process."""
    with torch.device("meta"):
        return Transformer(a)


def _setting(cfg: JobConfig, dims: ParallelDims, microbatch_size: Optional[int]) -> _Setting:
    """``microbatch_size``: sequences per pipeline microbatch (the plan's); None without PP."""
    t = cfg.training
    a = replace(build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size), max_seq_len=t.seq_len)
    pp = dims.pp > 1
    sequences = microbatch_size if pp else t.local_batch_size
    tokens = sequences * t.seq_len
    param_b, reduce_b = _BYTES[t.mixed_precision_param], _BYTES[t.mixed_precision_reduce]
    compiled = cfg.compile.enable and "model" in cfg.compile.components
    # One block's backward: its activations recomputed (as without checkpointing) and its
    # gradients, plus without PP the fp32 copy FSDP reduce-scatters right away.
    block_backward = (
        layer_activation_bytes(a, "none", compiled, param_b) * tokens
        + (param_b + (0 if pp else reduce_b)) * _part_sizes(a)[0]
    )
    mask = block_causal_mask_bytes(sequences, t.seq_len) if cfg.model.attn_mask_type == "block_causal" else 0.0
    float8_saving = (param_b - 1) * _float8_linear_params(a, tuple(cfg.float8.filter_fqns))
    return _Setting(
        cfg,
        a,
        dims.dp_shard,
        sequences,
        tokens,
        param_b,
        reduce_b,
        compiled,
        block_backward,
        accumulation_steps(cfg, dims),
        dims.dp == 1,
        optimizer_can_cast(cfg, dims, a.tie_word_embeddings),
        mask,
        float8_saving if float8_all_gather(cfg.float8, dims.dp_shard) else 0.0,
    )


@lru_cache(maxsize=4)
def _part_sizes(a: ModelArgs) -> tuple[int, int, int, int]:
    """Parameters of (one block, the embedding, the final norm, the head): what a stage's count adds up,
    from a one-block model (a schedule search asks before any whole model is needed)."""
    m = _meta_model(replace(a, n_layers=1))
    return _numel(m.layers["0"]), _numel(m.tok_embeddings), _numel(m.norm), _numel(m.output)


@lru_cache(maxsize=4)
def _float8_linear_params(a: ModelArgs, filter_fqns: tuple[str, ...]) -> int:
    """Parameters of one block's linear layers that ``[float8]`` converts (parallelisms/float8.py's rule)."""
    block = _meta_model(replace(a, n_layers=1))
    rule = replace(Float8(), filter_fqns=list(filter_fqns))
    return sum(m.weight.numel() for fqn, m in block.named_modules() if converts(fqn, m, rule))


def _stage(st: _Setting, index: int, layers: int, num_stages: int) -> _Stage:
    """Stage ``index`` of ``num_stages`` holding ``layers`` blocks (as build_stage_module cuts it)."""
    block, embedding, norm, head = _part_sizes(st.args)
    first, last = index == 0, index == num_stages - 1
    params = layers * block + (embedding if first else 0) + (norm + head if last else 0)
    return _Stage(index, layers, params, first, last)


def _stage_activation_bytes(st: _Setting, layers: int) -> float:
    """One microbatch's activations kept by a stage of ``layers`` blocks."""
    return st.tokens * sum(
        layer_activation_bytes(st.args, mode, st.compiled, st.param_b) for mode in _block_modes(st.cfg, layers)
    )


def _pipeline_rank(
    st: _Setting, plan: PipelinePlan, stages: list[_Stage], held: dict[int, int], stage_activations: dict[int, float]
) -> RankMemory:
    """The larger of the backward and optimizer-step moments of pipeline rank ``plan.pp_rank`` holding
    ``stages``; ``held[s]`` microbatches of stage s in flight at the peak, ``stage_activations[s]``
    bytes each."""
    a, n, p, param_b = st.args, st.dp_shard, st.cfg.parallelism, st.param_b
    sharded = gathered = unreduced = buffers = vp_grad = loss = 0.0
    for s in stages:
        buffers += plan.n_microbatches * st.tokens * a.dim * param_b * ((not s.first) + (not s.last))
        if s.last:
            loss = loss_workspace(st.cfg, a, st.tokens, n, head_reduced_at_once=False)
        vp_head = s.last and p.vocab_parallel  # a vocab-sharded copy outside FSDP
        fsdp = s.params - (_part_sizes(st.args)[3] if vp_head else 0)
        vp_rows = math.ceil(a.vocab_size / n) * a.dim if vp_head else 0
        sharded += math.ceil(fsdp / n) + vp_rows
        vp_grad += 4 * vp_rows
        if st.one_rank:  # the copies for every microbatch; gradients accumulate in the fp32 .grad (counted below)
            gathered += _copy_bytes(param_b) * fsdp
            continue
        # The schedule turns resharding after backward off for all but the last microbatch,
        # so a stage's parameters stay gathered, and their gradients accumulate unsharded
        # in the reduce dtype until the step's one reduce-scatter.
        gathered += param_b * fsdp - s.layers * st.float8_gather_saving
        unreduced += max(param_b, st.reduce_b) * fsdp
    grads = 4 * sharded
    common = dict(
        pp_rank=plan.pp_rank,
        stages=tuple(s.index for s in stages),
        layers=sum(s.layers for s in stages),
        parameters=4 * sharded,
        optimizer=8 * sharded,
        pipeline_buffers=buffers,
        plan=plan,
    )
    backward = RankMemory(
        phase="backward",
        **common,
        gradients=grads if st.accumulation_steps > 1 or st.one_rank else vp_grad,
        unsharded_params=gathered,
        unsharded_grads=unreduced,
        activations=sum(stage_activations[s] * k for s, k in held.items()),
        masks=st.mask * sum(held.values()),
        in_flight=sum(held.values()),
        transient=max(loss, st.block_backward),
    )
    # The step starts with the accumulated gradients' reduce-scatter.
    step = RankMemory(
        phase="optimizer step",
        **common,
        gradients=grads,
        unsharded_params=gathered if st.optimizer_casts else 0.0,  # one rank: the copies it writes
        unsharded_grads=unreduced,
        activations=0.0,
        masks=0.0,
        in_flight=0,
        transient=0.0,
    )
    return max(backward, step, key=lambda m: m.peak)


def _whole_model_rank(st: _Setting) -> RankMemory:
    """Every rank without PP: the whole model, FSDP groups as parallelisms/fsdp.py makes them (none on one rank)."""
    a, n, p, param_b, model = st.args, st.dp_shard, st.cfg.parallelism, st.param_b, _meta_model(st.args)
    tied = model.output.weight is model.tok_embeddings.weight
    vp_head = p.vocab_parallel  # a vocab-sharded copy outside FSDP
    fsdp = _numel(model) - (_numel(model.output) if vp_head and not tied else 0)
    vp_rows = math.ceil(a.vocab_size / n) * a.dim if vp_head else 0
    sharded = math.ceil(fsdp / n) + vp_rows
    held, root_grad, held_blocks = _gathered_without_pp(model, p, vp_head)
    if st.one_rank:  # no FSDP: ComputeWeights holds and frees its copies as FSDP would
        gathered = _copy_bytes(param_b) * held
    else:
        gathered = param_b * held - held_blocks * st.float8_gather_saving
    # a tied root's gradient is the classifier gradient the workspace counts: not twice
    loss = loss_workspace(st.cfg, a, st.tokens, n, head_reduced_at_once=not tied and not vp_head) - param_b * root_grad
    # Where the optimizer casts, a gradient of one micro-step stays in the backward's dtype (with a
    # vocab-parallel head, whose own is fp32, all are counted at fp32).
    kept = st.optimizer_casts and st.accumulation_steps == 1 and not vp_head
    grads = (param_b if kept else 4) * sharded
    common = dict(
        pp_rank=0, stages=(0,), layers=a.n_layers, parameters=4 * sharded, optimizer=8 * sharded, pipeline_buffers=0.0
    )
    backward = RankMemory(
        phase="backward",
        **common,
        gradients=grads if st.accumulation_steps > 1 else 4 * vp_rows,
        unsharded_params=gathered,
        unsharded_grads=param_b * root_grad,
        activations=_stage_activation_bytes(st, a.n_layers),
        masks=st.mask,
        in_flight=1,
        transient=max(loss, st.block_backward),
    )
    step = RankMemory(
        phase="optimizer step",
        **common,
        gradients=grads,
        unsharded_params=_copy_bytes(param_b) * fsdp if st.optimizer_casts else 0.0,  # the copies it writes
        unsharded_grads=0.0,
        activations=0.0,
        masks=0.0,
        in_flight=0,
        transient=0.0,
    )
    return max(backward, step, key=lambda m: m.peak)


def stage_fits(cfg: JobConfig, dims: ParallelDims, gpu_memory_gib: Optional[float]) -> Optional[StageFits]:
    """``fits(plan, stage, layers)`` for ``plan_pipeline``: whether the pipeline rank holding
    ``stage`` stays within ``gpu_memory_gib`` (the fixed CUDA overhead included) with ``layers``
    blocks there, under the plan's schedule and microbatch size. None without a size or without
    PP: no constraint.

    Exact with one stage per rank: the rank's predicted peak, as the report counts it. With
    several, each stage is held to an equal share of the budget, counting its own activations
    at their most in flight and the rank's whole transient: the shares add up to at least the
    rank's peak, so a split that passes fits by this estimate (it may refuse one that fits).
    """
    if gpu_memory_gib is None or dims.pp == 1:
        return None
    budget = (gpu_memory_gib - CUDA_OVERHEAD_GIB) * GIB
    settings: dict[int, _Setting] = {}
    most_held: dict[tuple, dict[int, int]] = {}  # (schedule, microbatches, stages) -> stage -> most in flight
    answers: dict[tuple, bool] = {}  # a schedule search asks the same stages many times

    def fits(plan: PipelinePlan, stage: int, layers: int) -> bool:
        question = (plan.schedule, plan.n_microbatches, plan.num_stages, plan.microbatch_size, stage, layers)
        if question not in answers:
            answers[question] = _fits(plan, stage, layers)
        return answers[question]

    def _fits(plan: PipelinePlan, stage: int, layers: int) -> bool:
        if plan.microbatch_size not in settings:
            settings[plan.microbatch_size] = _setting(cfg, dims, plan.microbatch_size)
        st = settings[plan.microbatch_size]
        key = (plan.schedule, plan.n_microbatches, plan.num_stages)
        if key not in most_held:
            most_held[key] = {s: k for rank_ops in _rank_ops(plan) for s, k in _most_held(rank_ops).items()}
        rank = next(r for r in range(plan.pp_degree) if stage in plan.stages_of(r))  # the plan's layout, not its split
        memory = _pipeline_rank(
            st,
            replace(plan, pp_rank=rank),
            [_stage(st, stage, layers, plan.num_stages)],
            {stage: most_held[key][stage]},
            {stage: _stage_activation_bytes(st, layers)},
        )
        return memory.peak <= budget / len(plan.stages_of(rank))

    return fits


def estimate_memory(cfg: JobConfig, dims: ParallelDims, plan: Optional[PipelinePlan]) -> list[RankMemory]:
    """One ``RankMemory`` per pipeline rank for the run's ``plan`` (``planning.schedule_search.choose_pipeline``;
    None without pipeline parallel): its schedule's microbatches in flight, of its microbatch size."""
    st = _setting(cfg, dims, plan.microbatch_size if plan is not None else None)
    if plan is None:
        return [_whole_model_rank(st)]
    stages = [_stage(st, s, end - start, plan.num_stages) for s, (start, end) in enumerate(plan.layer_ranges)]
    ops = _rank_ops(plan)
    estimates = []
    for r in range(dims.pp):
        rank_plan = replace(plan, pp_rank=r)
        local = [stages[s] for s in rank_plan.local_stages]
        # masks held alike by every stage's microbatch: counted with its activations for the peak
        per_stage = {s.index: _stage_activation_bytes(st, s.layers) for s in local}
        held = _held_at_peak(ops[r], {s: b + st.mask for s, b in per_stage.items()})
        estimates.append(_pipeline_rank(st, rank_plan, local, held, per_stage))
    return estimates


def stage_parameters(cfg: JobConfig, dims: ParallelDims, plan: PipelinePlan) -> list[int]:
    """Parameters FSDP manages in each stage of ``plan`` (a vocab-parallel head is outside FSDP)."""
    st = _setting(cfg, dims, plan.microbatch_size)
    head = _part_sizes(st.args)[3] if cfg.parallelism.vocab_parallel else 0
    return [
        _stage(st, s, end - start, plan.num_stages).params - (head if s == plan.num_stages - 1 else 0)
        for s, (start, end) in enumerate(plan.layer_ranges)
    ]


def peaks_per_rank_gib(estimates: list[RankMemory], dims: ParallelDims) -> list[float]:
    """In global rank order, like memory.json's ``peak_memory_gib_per_rank`` (pp is the outer mesh dim)."""
    return [round(m.peak / GIB, 2) for m in estimates for _ in range(dims.dp)]
