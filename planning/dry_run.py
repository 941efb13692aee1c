"""``train.py --dry_run``: the predicted memory of every rank, printed before a job is queued,
and under pipeline parallel each rank's predicted compute and the schedule's bubble.

    python train.py --config configs/qwen3_1p7b_pp4.toml --dry_run --world_size 8 [--gpu h100|h200] [--gpu_memory_gib G]

The flags are taken out of the command line before the recipe is read; the
estimates themselves are planning/memory.py and planning/timing.py. Before the
report, train.py stops at what the run would refuse at start-up (output folders,
tokenizer, data files), with the run's one-line errors, writing nothing.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from config.errors import ConfigError
from config.job_config import JobConfig
from models import build_model_args
from parallelisms.parallel_dims import ParallelDims
from planning.batch import accumulation_steps
from planning.comm import LINKS
from planning.cost import DEFAULT_GPU, RATES, StageCostInputs, head_rate, layer_rate, logits_bytes, loss_choice
from planning.gpu import GPU, of_kind
from planning.memory import CUDA_OVERHEAD_GIB, GIB, RankMemory, estimate_memory, peaks_per_rank_gib
from planning.schedule_search import PipelineChoice, choice_lines, choose_pipeline
from planning.timing import PipelineTiming, predict_timing, why_this_split

_VALUED = ("--world_size", "--gpu", "--gpu_memory_gib")


@dataclass(frozen=True)
class DryRun:
    world_size: int  # default: $WORLD_SIZE (set by torchrun), else 1
    gpu: GPU  # --gpu's rate table (default DEFAULT_GPU's), held to --gpu_memory_gib (default: that GPU's memory)


def _positive(flag: str, text: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        raise ConfigError(flag, f"expected a positive {'integer' if kind is int else 'number'}, got {text!r}")
    return value


def split_dry_run_args(argv: Sequence[str]) -> tuple[Optional[DryRun], list[str]]:
    """Take ``--dry_run [--world_size N] [--gpu KIND] [--gpu_memory_gib G]`` out of ``argv``; the rest is the
    recipe's."""
    rest, values, dry_run, i = [], {}, False, 0
    while i < len(argv):
        name, has_value, text = argv[i].partition("=")
        if name == "--dry_run" and not has_value:
            dry_run = True
        elif name in _VALUED:
            if not has_value:
                if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(name, f"needs a value: {name} VALUE or {name}=VALUE")
                i += 1
                text = argv[i]
            values[name] = text
        else:
            rest.append(argv[i])
        i += 1
    if not dry_run:
        if values:
            flag = next(iter(values))
            raise ConfigError(flag, "only goes with --dry_run; a run's world size is the number of processes launched")
        return None, rest
    world_size = _positive("--world_size", values.get("--world_size", os.environ.get("WORLD_SIZE", "1")), int)
    kind = values.get("--gpu", DEFAULT_GPU).lower()
    if kind not in RATES:
        raise ConfigError("--gpu", f"no rate table for {kind!r}; planning/rates/ has {', '.join(RATES)}")
    memory = values.get("--gpu_memory_gib")
    return DryRun(
        world_size, of_kind(kind, None if memory is None else _positive("--gpu_memory_gib", memory, float))
    ), rest


def check_output_folders_writable(cfg: JobConfig) -> None:
    """The folders the run writes to (``job.dump_folder``; with checkpoints on, ``checkpoint.folder``) can
    be made and written: the run's check (training/run_log.py) without its probe file, so a dry run
    leaves no trace. The nearest existing folder on each path must be a writable folder."""
    folders = {"job.dump_folder": Path(cfg.job.dump_folder)}
    if cfg.checkpoint.enable:
        folders["checkpoint.folder"] = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    for key, folder in folders.items():
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            problem = f"{existing} is a file, not a folder"
        elif os.statvfs(existing).f_flag & os.ST_RDONLY:
            problem = f"{existing} is on a read-only filesystem"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable"
        else:
            continue
        raise ConfigError(key, f"cannot write to {folder} ({problem}); point {key} at a writable place")


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


_ROWS: list[tuple[str, Callable[[RankMemory], str]]] = [
    ("parameters (fp32 shards)", lambda m: _gib(m.parameters)),
    ("gradients (fp32 shards)", lambda m: _gib(m.gradients)),
    ("optimizer state (AdamW, 2 x fp32)", lambda m: _gib(m.optimizer)),
    ("FSDP-gathered params or bf16 copies", lambda m: _gib(m.unsharded_params)),
    ("unsharded gradients (FSDP)", lambda m: _gib(m.unsharded_grads)),
    ("pipeline receive buffers", lambda m: _gib(m.pipeline_buffers)),
    ("activations", lambda m: _gib(m.activations)),
    ("block-causal masks (MiB, not GiB)", lambda m: f"{m.masks / 2**20:.2f}"),
    ("  microbatches in flight", lambda m: str(m.in_flight)),
    ("loss workspace or one block's backward", lambda m: _gib(m.transient)),
]


_WIDTH = 40


def _table(rows: list[tuple[str, list[str]]]) -> list[str]:
    col = max(14, *(len(v) + 2 for _, values in rows for v in values))
    return [label.ljust(_WIDTH) + "".join(v.rjust(col) for v in values) for label, values in rows]


def dry_run_report(cfg: JobConfig, dry_run: DryRun) -> str:
    """``--dry_run``: the layout checks of a run, its plan and its predicted memory; no device, no process group."""
    dims = ParallelDims.from_config(cfg.parallelism, dry_run.world_size)
    accumulation = accumulation_steps(cfg, dims)
    choice = choose_pipeline(cfg, dims, dry_run.gpu) if dims.pp > 1 else None
    plan = choice.plan_for(0) if choice is not None else None
    report = format_report(cfg, dims, estimate_memory(cfg, dims, plan), accumulation, dry_run.gpu)
    return report + ("" if choice is None else "\n\n" + "\n".join(schedule_choice_lines(choice)))


def schedule_choice_lines(choice: PipelineChoice) -> list[str]:
    """How the plan's schedule was chosen, and the line the run would stop with when it does not fit."""
    lines = choice_lines(choice)
    if choice.problem is not None:
        lines += ["", f"the run would stop here: {choice.problem}"]
    return lines


def format_report(
    cfg: JobConfig, dims: ParallelDims, estimates: list[RankMemory], accumulation_steps: int, gpu: GPU
) -> str:
    """A table with one column per pipeline rank, its notes, and the per-rank peaks as memory.json lists them;
    under pipeline parallel, the predicted compute of the same split (``timing_lines``)."""
    t, p, ac = cfg.training, cfg.parallelism, cfg.activation_checkpoint
    a = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size)
    pp = dims.pp > 1
    plan = estimates[0].plan
    microbatch = plan.microbatch_size if pp else t.local_batch_size
    schedule = (
        (f"{plan.schedule}, {plan.n_microbatches} microbatches of " if pp else "")
        + f"{microbatch} x {t.seq_len} tokens"
        + ("" if pp else " per micro-step")
    )
    ac_text = ac.mode + (f" ({ac.selective_ac_option})" if ac.mode == "selective" else "")
    lines = [
        "Predicted peak GPU memory per rank (no GPU used, no process group; how: docs/performance.md)",
        f"{cfg.model.name} {cfg.model.flavor} ({a.num_params() / 1e6:,.1f}M parameters), world {dims.world_size} = "
        f"pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard}",
        f"{schedule}, {accumulation_steps} micro-step(s) per optimizer step; activation checkpointing {ac_text}; "
        f"params {t.mixed_precision_param}, reduce {t.mixed_precision_reduce}",
        f"loss: {loss_choice(cfg).describe(p.vocab_parallel)}",
        f"planned for {gpu.describe()} (--gpu, --gpu_memory_gib)",
        "",
    ]
    heads = [f"pp rank {m.pp_rank}" if pp else "every rank" for m in estimates]
    ranks = [
        f"{m.pp_rank * dims.dp}-{(m.pp_rank + 1) * dims.dp - 1}" if dims.dp > 1 else str(m.pp_rank) for m in estimates
    ]
    stages = [(",".join(map(str, m.stages)) if pp else "all") + f" ({m.layers} layers)" for m in estimates]
    overhead = CUDA_OVERHEAD_GIB * GIB
    table = [("GiB", heads), ("  global ranks", ranks), ("  stages", stages)]
    table += [(label, [value(m) for m in estimates]) for label, value in _ROWS]
    table += [
        ("peak allocated (memory.json's figure)", [_gib(m.peak) for m in estimates]),
        ("CUDA context, NCCL, allocator (guess)", [_gib(overhead) for _ in estimates]),
        ("total on the GPU", [_gib(m.peak + overhead) for m in estimates]),
        (
            f"fits {gpu.memory_gib:g} GiB",
            ["yes" if m.peak + overhead <= gpu.memory_gib * GIB else "NO" for m in estimates],
        ),
        ("peak during", [m.phase for m in estimates]),
    ]
    lines += _table(table)
    lines += [
        "",
        "peak allocated is what memory.json records (torch.cuda.max_memory_allocated); the fixed "
        f"{CUDA_OVERHEAD_GIB:g} GiB is a guess",
        "for what it does not see. In the backward the fp32 gradient shards do not exist yet (zero_grad frees",
        "them) unless gradients accumulate; at the optimizer step the activations are gone.",
        f"predicted peak_memory_gib_per_rank: {peaks_per_rank_gib(estimates, dims)}",
    ]
    if pp:
        lines += ["", *timing_lines(cfg, predict_timing(cfg, dims, plan, gpu.rates), accumulation_steps)]
    return "\n".join(lines)


def timing_lines(cfg: JobConfig, timing: PipelineTiming, accumulation_steps: int) -> list[str]:
    """Per pipeline rank, one microbatch's predicted forward and backward; then the split, the
    slowest/fastest ratio, the simulated bubble and the step."""
    plan, cost, schedule = timing.plan, timing.cost, timing.schedule
    ranks = [timing.rank(r) for r in range(plan.pp_degree)]
    layers = [
        ",".join(f"{s} ({plan.layer_ranges[s][1] - plan.layer_ranges[s][0]})" for s in plan.stages_of(r))
        for r in range(plan.pp_degree)
    ]
    name = plan.schedule
    step = accumulation_steps * schedule.makespan_ms
    lines = [
        "Predicted compute per microbatch (a prediction, not a measurement: planning/cost.py; "
        "how: docs/performance.md)",
        "",
        *_table(
            [
                ("ms", [f"pp rank {r}" for r in range(plan.pp_degree)]),
                ("  stages (layers)", layers),
                ("forward", [f"{t.forward_ms:.1f}" for t in ranks]),
                ("backward", [f"{t.backward_ms:.1f}" for t in ranks]),
                ("forward + backward", [f"{t.total_ms:.1f}" for t in ranks]),
            ]
        ),
        "",
        f"split {'/'.join(str(e - s) for s, e in plan.layer_ranges)} layers over stages 0-{plan.num_stages - 1}, "
        f"{why_this_split(cfg, timing)}",
        f"slowest/fastest pp rank {timing.slowest_over_fastest:.2f}; {name} bubble {100 * schedule.bubble:.1f} % "
        f"(torch's action lists for {plan.n_microbatches} microbatches replayed with these times, the sends and "
        "FSDP's collectives)",
        f"predicted step {step:.0f} ms ({accumulation_steps} micro-step(s) x {schedule.makespan_ms:.0f} ms); "
        f"decoder layers at {layer_rate(cost):g} TFLOP/s{_float8_rate_note(cost)}, head + {cost.loss} at "
        f"{head_rate(cost):g} TFLOP/s"
        + (" + its logits traffic" if any(logits_bytes(cost.model, cost.loss, 1)) else ""),
        *_communication_lines(timing),
        "not in it: the tied-embedding sync, the optimizer and host overhead",
    ]
    return lines


def _float8_rate_note(cost: StageCostInputs) -> str:
    if not cost.float8:
        return ""
    if cost.rates.layer_tflops_float8 is None:
        return f" (bf16's: no float8 rate measured on the {cost.rates.gpu}, so slower than float8 will be)"
    if cost.rates.layer_tflops_float8 < cost.rates.layer_tflops:
        return (
            f" (float8, below bf16's {cost.rates.layer_tflops:g}: the {cost.rates.gpu}'s table times one 4,096-token "
            'sequence, where float8 loses; longer microbatches gain: docs/performance.md "Float8")'
        )
    return " (float8)"


def _communication_lines(timing: PipelineTiming) -> list[str]:
    comm = timing.comm
    return [
        f"sends {comm.transfer_ms:.2f} ms per microbatch between ranks ({LINKS.p2p_gbs:g} GB/s), FSDP "
        f"{sum(comm.gather_ms):.1f} ms of gathers and {sum(comm.reduce_ms):.1f} ms of reductions per micro-step "
        f"({LINKS.collective_gbs:g} GB/s; planning/comm.py's guesses, not measured)",
    ]
