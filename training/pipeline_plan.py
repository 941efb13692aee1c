"""The recipe's pipeline plan: ``plan_pipeline`` given the recipe's stage costs.

The run (train.py) and its prediction (training/memory_estimate.py, ``--dry_run``) both
plan through ``recipe_plan``, so they split the layers alike.
"""

from dataclasses import replace
from typing import Optional

import torch

from config.job_config import JobConfig
from losses import LossChoice, choose_loss, recipe_options
from models import build_model_args
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PipelinePlan, StageFits, plan_pipeline
from parallelisms.pipeline_cost import StageCostInputs


def loss_choice(cfg: JobConfig) -> LossChoice:
    """What the run's loss computes with on a GPU machine with the requirements installed: the
    registry's own answer (losses/resolve.py) for the recipe's parameter dtype on CUDA."""
    return choose_loss(
        cfg.loss.name,
        recipe_options(cfg.loss, cfg.compile),
        device_type="cuda",
        dtype=getattr(torch, cfg.training.mixed_precision_param),
        vocab_parallel=cfg.parallelism.vocab_parallel,
        gpu_kernels=True,
    )


def stage_cost_inputs(cfg: JobConfig, dims: ParallelDims) -> StageCostInputs:
    t, ac, p = cfg.training, cfg.activation_checkpoint, cfg.parallelism
    model = replace(build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size), max_seq_len=t.seq_len)
    return StageCostInputs(
        model,
        t.seq_len,
        p.pipeline_parallel_microbatch_size,
        loss_choice(cfg).entry,
        ac.mode,
        ac.selective_ac_option,
        dims.dp_shard if p.vocab_parallel else 1,
    )


def recipe_plan(cfg: JobConfig, dims: ParallelDims, pp_rank: int, fits: Optional[StageFits] = None) -> PipelinePlan:
    """The plan of pipeline rank ``pp_rank``; ``fits`` (memory_estimate.stage_fits) when the GPU's size is known."""
    cost = stage_cost_inputs(cfg, dims)
    return plan_pipeline(cost.model.n_layers, cfg.parallelism, pp_rank, cfg.training.local_batch_size, cost, fits)
