"""The recipe's pipeline plan: the schedule, virtual stages and microbatch size its ``"auto"`` keys leave open.

Every candidate (schedule x stages per rank x microbatch size that divides the local batch, over
the keys set to ``"auto"``; a set key is kept as written) is split by ``plan_pipeline``, replayed
on torch's own action lists with the predicted stage, transfer and FSDP times
(``planning/timing.py``) and held to the GPU's memory with its own microbatches in flight
(``planning/memory.py``). The shortest step that fits wins; ties go to the earlier candidate
(simpler schedule, fewer stages per rank, larger microbatch). ``choose_pipeline`` is what the
run (train.py) and its prediction (``--dry_run``) both ask: a pure function of the recipe, the
layout, the GPU the run passes in (its memory and rate table) and the installed torch, so every rank
decides alike.
"""

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
from torch.distributed.pipelining.schedules import PipelineScheduleSingle

from config.errors import ConfigError
from config.job_config import JobConfig
from models import build_model_args
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PIPELINE_SCHEDULES, V_SHAPED, ZERO_BUBBLE, PipelinePlan
from planning.batch import accumulation_steps
from planning.cost import StageCostInputs, stage_cost_inputs, stage_time
from planning.gpu import GPU
from planning.memory import CUDA_OVERHEAD_GIB, GIB, estimate_memory, stage_fits
from planning.pipeline_plan import balanced_splits, plan_pipeline, stage_count
from planning.timing import BackwardSplit, predict_timing, step_lower_bound

_KEY = "parallelism.pipeline_parallel_"


@dataclass(frozen=True)
class Candidate:
    schedule: str
    virtual_stages: int  # stages per pipeline rank
    microbatch_size: int

    def __str__(self) -> str:
        return f"{self.schedule}, {self.virtual_stages} stage(s) per rank, microbatch {self.microbatch_size}"


@dataclass(frozen=True)
class Outcome:
    """A candidate's plan and its predicted step."""

    candidate: Candidate
    plan: PipelinePlan  # of pipeline rank 0
    step_ms: float  # every micro-step of one optimizer step
    bubble: float
    peak_gib: float  # the fullest rank's total on the GPU (the fixed CUDA overhead included)
    peak_rank: int
    fits: bool


@dataclass(frozen=True)
class PipelineChoice:
    outcomes: tuple[Outcome, ...]  # candidates replayed, best first (those that fit before those that do not)
    refused: int  # candidates that cannot run (stage-count or microbatch rules)
    skipped: int  # candidates not replayed: a bound below their step exceeds the best ones' steps
    notes: tuple[str, ...]  # schedules left out, and why
    searched: tuple[str, ...]  # the keys that were "auto"
    gpu: GPU  # planned for: its memory, its rates
    problem: Optional[ConfigError]  # the best does not fit the GPU: what the run stops with

    @property
    def best(self) -> Outcome:
        return self.outcomes[0]

    def plan_for(self, pp_rank: int) -> PipelinePlan:
        return replace(self.best.plan, pp_rank=pp_rank)


@functools.cache
def torch_splits_function_backward() -> bool:
    """Whether this torch's zero-bubble backward (torch's own ``stage_backward_input``, then
    ``stage_backward_weight``) takes a weight gradient through a custom autograd.Function. torch
    2.11 cannot: the weight step's ``autograd.grad`` from the Function's node asks it for
    ``_input_metadata``, which that version's Python Function nodes do not have."""

    class _Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return (x * w).sum()

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            return grad * w, grad * x

    x, w = torch.ones(2, requires_grad=True), torch.nn.Parameter(torch.ones(2))
    _, groups = stage_backward_input([_Product.apply(x, w)], None, [x], [w])
    try:
        stage_backward_weight([w], groups)
    except RuntimeError:
        return False
    return True


def zero_bubble_problem(cfg: JobConfig, split: BackwardSplit) -> Optional[str]:
    """Why the zero-bubble schedules cannot run this recipe on the installed torch, or None."""
    if not (split.blocks_whole or split.head_whole) or torch_splits_function_backward():
        return None
    what = "the compiled blocks" if split.blocks_whole else "the loss"
    return (
        f"torch {torch.__version__} cannot split the backward of {what} (a custom autograd.Function) into the "
        "input and weight halves that zero-bubble schedules run (torch 2.13 can)"
    )


def _candidates(cfg: JobConfig, dims: ParallelDims, n_layers: int, excluded: tuple[str, ...]) -> list[Candidate]:
    """In tie-break order: schedules as PIPELINE_SCHEDULES lists them, fewer stages per rank, larger microbatches."""
    p, t, v = cfg.parallelism, cfg.training, cfg.validation
    if p.pipeline_parallel_schedule == "auto":
        schedules = [s for s in PIPELINE_SCHEDULES if s not in excluded]
    else:
        schedules = [p.pipeline_parallel_schedule]
    if p.pipeline_parallel_microbatch_size == "auto":
        local = [t.local_batch_size] + ([v.local_batch_size] if v.enable and v.local_batch_size else [])
        sizes = [m for m in range(t.local_batch_size, 0, -1) if all(b % m == 0 for b in local)]
    else:
        sizes = [p.pipeline_parallel_microbatch_size]
    out = []
    for schedule in schedules:
        if p.pipeline_parallel_stage_split_points or p.pipeline_parallel_layers_per_stage:
            # the split keys set the stage count; plan_pipeline checks it against the schedule
            stages = [max(1, stage_count(n_layers, p) // dims.pp)]
        elif p.pipeline_parallel_virtual_stages != "auto":
            stages = [p.pipeline_parallel_virtual_stages]
        elif issubclass(PIPELINE_SCHEDULES[schedule], PipelineScheduleSingle):
            stages = [1]
        elif schedule in V_SHAPED:
            stages = [2]
        else:
            stages = list(range(2, max(2, n_layers // dims.pp) + 1))
        out += [Candidate(schedule, k, m) for k in stages for m in sizes]
    return out


def choose_pipeline(cfg: JobConfig, dims: ParallelDims, gpu: GPU, shown: int = 5) -> PipelineChoice:
    """Every candidate the recipe's keys allow, ranked by its replayed step (module docstring).

    Each candidate's split is found first, and with it a bound below its step
    (``step_lower_bound``); candidates are then replayed in the order of their bounds until the
    next bound exceeds the ``shown``-th best step that fits, so the winner and the ``shown``
    best are exact and most hopeless candidates (large microbatches, GPipe) cost no replay."""
    p, local = cfg.parallelism, cfg.training.local_batch_size
    n_layers = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size).n_layers
    searched = tuple(
        key
        for key in ("schedule", "virtual_stages", "microbatch_size")
        if getattr(p, "pipeline_parallel_" + key) == "auto"
    )
    split = BackwardSplit.of(cfg, stage_cost_inputs(cfg, dims, 1, gpu.rates))
    problem = zero_bubble_problem(cfg, split)
    notes = ()
    if problem is not None:
        if p.pipeline_parallel_schedule in ZERO_BUBBLE:
            raise ConfigError(_KEY + "schedule", f"{problem}; choose Interleaved1F1B or 'auto'")
        notes = (f"{', '.join(ZERO_BUBBLE)} left out: {problem}",)
    elif (split.blocks_whole or split.head_whole) and p.pipeline_parallel_schedule in ("auto", *ZERO_BUBBLE):
        whole = " and ".join(w for w, on in (("compiled blocks", split.blocks_whole), ("loss", split.head_whole)) if on)
        notes = (
            f"zero-bubble schedules: the input and the weight backward action each run the whole backward of the "
            f"{whole} (one autograd node each; planning/timing.py BackwardSplit)",
        )
    fits = stage_fits(cfg, dims, gpu.memory_gib)
    steps = accumulation_steps(cfg, dims)

    bounded, refusals = [], []  # (bound, order, candidate, its splits)
    for candidate in _candidates(cfg, dims, n_layers, ZERO_BUBBLE if problem else ()):
        keys = replace(
            p,
            pipeline_parallel_schedule=candidate.schedule,
            pipeline_parallel_virtual_stages=candidate.virtual_stages,
            pipeline_parallel_microbatch_size=candidate.microbatch_size,
        )
        try:
            even = plan_pipeline(n_layers, keys, 0, local)
        except ConfigError as err:
            refusals.append(err)
            continue
        explicit = p.pipeline_parallel_stage_split_points or p.pipeline_parallel_layers_per_stage
        cost = stage_cost_inputs(cfg, dims, candidate.microbatch_size, gpu.rates)
        splits = [even] if explicit else balanced_splits(even, n_layers, cost, None)
        if explicit or fits is None or all(fits(plan, s, k) for plan in splits for s, k in enumerate(_layers(plan))):
            bound = min(step_lower_bound(cfg, dims, plan, gpu.rates) for plan in splits)
        else:  # the memory-bound splits are searched only if it comes to that; no split has a faster rank
            splits, bound = None, even.n_microbatches * _slowest_rank_ms(splits[0], cost)
        bounded.append((bound, len(bounded), candidate, splits))
    if not bounded:
        raise refusals[0]

    outcomes: list[Outcome] = []
    for bound, _, candidate, splits in sorted(bounded, key=lambda b: b[:2]):
        fitting = sorted(o.step_ms for o in outcomes if o.fits)
        if len(fitting) >= shown and steps * bound > fitting[shown - 1]:
            break  # this and every later candidate is slower than the best shown
        if splits is None:
            keys = replace(
                p,
                pipeline_parallel_schedule=candidate.schedule,
                pipeline_parallel_virtual_stages=candidate.virtual_stages,
                pipeline_parallel_microbatch_size=candidate.microbatch_size,
            )
            even = plan_pipeline(n_layers, keys, 0, local)
            splits = balanced_splits(
                even, n_layers, stage_cost_inputs(cfg, dims, candidate.microbatch_size, gpu.rates), fits
            )
        timings = [predict_timing(cfg, dims, plan, gpu.rates) for plan in splits]
        timing = min(timings, key=lambda t: round(t.schedule.makespan_ms, 6))  # the first on a tie, as plan_pipeline
        memory = estimate_memory(cfg, dims, timing.plan)
        fullest = max(memory, key=lambda m: m.peak)
        peak = fullest.peak / GIB + CUDA_OVERHEAD_GIB
        fits_gpu = gpu.memory_gib is None or peak <= gpu.memory_gib
        step = steps * timing.schedule.makespan_ms
        outcomes.append(Outcome(candidate, timing.plan, step, timing.schedule.bubble, peak, fullest.pp_rank, fits_gpu))
    order = {b[2]: b[1] for b in bounded}
    # those that fit by their step; when none does, the one closest to fitting first
    outcomes.sort(key=lambda o: (not o.fits, round(o.step_ms if o.fits else o.peak_gib, 6), order[o.candidate]))
    skipped = len(bounded) - len(outcomes)
    choice = PipelineChoice(tuple(outcomes), len(refusals), skipped, notes, searched, gpu, None)
    return replace(choice, problem=_memory_problem(cfg, dims, choice))


def _layers(plan: PipelinePlan) -> list[int]:
    return [end - start for start, end in plan.layer_ranges]


def _slowest_rank_ms(plan: PipelinePlan, cost: StageCostInputs) -> float:
    """One microbatch through the slowest rank of ``plan``, fw + bw: with the rank-balanced split, the
    least any split of these stages can give its slowest rank."""
    last = plan.num_stages - 1
    return max(
        sum(
            stage_time(cost, end - start, s == 0, s == last).total_ms
            for s, (start, end) in enumerate(plan.layer_ranges)
            if s in plan.stages_of(r)
        )
        for r in range(plan.pp_degree)
    )


def _memory_problem(cfg: JobConfig, dims: ParallelDims, choice: PipelineChoice) -> Optional[ConfigError]:
    best = choice.best
    if best.fits:
        return None
    over = (
        f"needs {best.peak_gib:.1f} GiB on pipeline rank {best.peak_rank} (predicted, see --dry_run), over the "
        f"GPU's {choice.gpu.memory_gib:g} GiB"
    )
    if choice.searched:
        return ConfigError(
            _KEY + choice.searched[0],
            f"no schedule, stages per rank and microbatch size fit: the smallest, {best.candidate}, {over}; use "
            "activation_checkpoint.mode = 'full', a smaller training.local_batch_size or more pipeline ranks",
        )
    keys = ("schedule", "virtual_stages", "microbatch_size")
    auto = replace(cfg, parallelism=replace(cfg.parallelism, **{"pipeline_parallel_" + k: "auto" for k in keys}))
    alternative = choose_pipeline(auto, dims, choice.gpu).best
    fix = (
        f"with the three keys 'auto' the run takes {alternative.candidate} ({alternative.peak_gib:.1f} GiB)"
        if alternative.fits
        else "use activation_checkpoint.mode = 'full', a smaller training.local_batch_size or more pipeline ranks"
    )
    return ConfigError(_KEY + "microbatch_size", f"{best.candidate} {over}; {fix}")


def choice_lines(choice: PipelineChoice, shown: int = 5) -> list[str]:
    """The best candidates (step, bubble, the fullest rank's memory) and why the winner won: the run
    log's and ``--dry_run``'s account of the choice."""
    rows = choice.outcomes[:shown]
    lines = [
        f"pipeline schedule: {len(choice.outcomes)} candidate(s) replayed"
        + (f" over {', '.join(choice.searched)} = 'auto'" if choice.searched else " (every key set by the recipe)")
        + (f", {choice.skipped} skipped (a bound below their step exceeds these)" if choice.skipped else "")
        + (f", {choice.refused} refused by the stage-count and microbatch rules" if choice.refused else "")
        + f"; planned for {choice.gpu.describe()}",
        f"  {'schedule':<22}{'stages/rank':>12}{'microbatch':>11}  {'split':<28}{'step ms':>9}{'bubble':>8}"
        f"{'peak GiB':>10}  fits",
    ]
    for o in rows:
        c, split = o.candidate, "/".join(str(e - s) for s, e in o.plan.layer_ranges)
        lines.append(
            f"  {c.schedule:<22}{c.virtual_stages:>12}{c.microbatch_size:>11}  {split[:27]:<28}{o.step_ms:>9.1f}"
            f"{100 * o.bubble:>7.1f}%{o.peak_gib:>10.1f}  {'yes' if o.fits else 'NO'}"
        )
    lines.append("  " + _why(choice))
    lines += [f"  {note}" for note in choice.notes]
    return lines


def _why(choice: PipelineChoice) -> str:
    best = choice.best
    if not choice.searched:
        return f"chosen: {best.candidate}, as the recipe sets it"
    if not best.fits:
        return f"chosen: {best.candidate}, the closest to fitting; nothing fits"
    fitting = [o for o in choice.outcomes if o.fits]
    why = f"chosen: {best.candidate}, the shortest predicted step of the {len(fitting)} replayed that fit"
    if len(fitting) > 1:
        runner = fitting[1]
        why += f"; the next, {runner.candidate}, is {runner.step_ms - best.step_ms:.1f} ms slower"
    faster = [o for o in choice.outcomes if not o.fits and o.step_ms < best.step_ms]
    if faster:
        o = min(faster, key=lambda o: o.step_ms)
        why += f"; {o.candidate} would be {best.step_ms - o.step_ms:.1f} ms faster but needs {o.peak_gib:.1f} GiB"
    return why
