"""What a run writes about itself besides its metrics: versions and layout at the start, the effective
recipe (``config.toml``) once it is accepted, and every rank's peak memory at the end (``memory.json``)."""

import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from config.job_config import JobConfig
from config.loader import dump_config
from losses import choose_loss, recipe_options
from models.args import ModelArgs
from parallelisms.float8 import describe_float8
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PipelinePlan
from planning.batch import accumulation_steps
from training.checkpoint import check_writable
from training.metrics.device import gather_peak_memory_gib
from training.optimizer import warmup_warning

logger = logging.getLogger("train")


def check_output_folders(cfg: JobConfig) -> None:
    """The folders the run will write to, checked before anything is built: ``job.dump_folder``
    (metrics, config.toml, memory.json) and, with checkpoints on, ``checkpoint.folder``."""
    check_writable(Path(cfg.job.dump_folder), "job.dump_folder")
    if cfg.checkpoint.enable:
        check_writable(Path(cfg.job.dump_folder) / cfg.checkpoint.folder, "checkpoint.folder")


def log_run(dims: ParallelDims, mesh, device: torch.device) -> None:
    """Versions and the rank layout; rank 0 only."""
    versions = [f"torch {torch.__version__}"]
    for name in ("triton", "cut-cross-entropy"):  # read from the installed metadata: importing triton takes seconds
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    logger.info(", ".join(versions) + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    grid = mesh.mesh  # [pp, dp_replicate, dp_shard] of global ranks
    for p in range(dims.pp):
        groups = " ".join(str(g) for g in grid[p].reshape(-1, dims.dp_shard).tolist())
        logger.info(f"pipeline rank {p}: dp_shard groups {groups}")


def write_config(cfg: JobConfig) -> None:
    """The effective recipe, ``<dump_folder>/config.toml`` (rank 0): written once every start-up check has
    passed (the checkpoint's model included), so that a refused run leaves the folder's recipe as it was;
    replaced whole, so that no reader sees half of it."""
    path = Path(cfg.job.dump_folder) / "config.toml"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(dump_config(cfg))
    os.replace(partial, path)


def log_layout(
    cfg: JobConfig, args: ModelArgs, dims: ParallelDims, device: torch.device, param_dtype: str, global_batch: int
) -> None:
    """The model, the rank layout, the batch and what the loss computes with (and why); rank 0 only."""
    t, vp = cfg.training, cfg.parallelism.vocab_parallel
    one_rank = "" if dims.dp > 1 else "; one data-parallel rank: no FSDP (parallelisms/compute_weights.py)"
    logger.info(
        f"{cfg.model.name} {cfg.model.flavor}: {args.num_params() / 1e6:,.1f}M parameters, vocab {args.vocab_size:,}; "
        f"world {dims.world_size} = pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard}; "
        f"device {device}; params {param_dtype}{one_rank}"
    )
    logger.info(
        f"global batch {global_batch} x {t.seq_len} tokens, {accumulation_steps(cfg, dims)} accumulation step(s)"
    )
    choice = choose_loss(
        cfg.loss.name,
        recipe_options(cfg.loss, cfg.compile),
        device_type=device.type,
        dtype=getattr(torch, param_dtype),
        vocab_parallel=vp,
    )
    logger.info(f"loss: {choice.describe(vp)}")
    if cfg.float8.enable:
        logger.info(describe_float8(cfg.float8, dims.dp_shard))
    warning = warmup_warning(t.steps, cfg.lr_scheduler)
    if warning is not None:
        logger.warning(warning)


def report_memory(dump_folder: str, device: torch.device, plan: Optional[PipelinePlan], rank: int) -> None:
    """Peak memory of every rank, with its pipeline stages: logged and written to memory.json."""
    peaks = gather_peak_memory_gib(device)
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, list(plan.local_stages) if plan is not None else [])
    if rank == 0:
        per_rank = [round(p, 3) for p in peaks]
        logger.info(
            "peak memory per rank (GiB): "
            + ", ".join(
                f"{r}:{m:.2f}" + (f" (stages {stages[r]})" if stages[r] else "") for r, m in enumerate(per_rank)
            )
        )
        with open(os.path.join(dump_folder, "memory.json"), "w") as f:
            json.dump({"peak_memory_gib_per_rank": per_rank, "stages_per_rank": stages}, f)
