"""The recipe's pipeline plan: ``plan_pipeline`` given the recipe's stage costs.

The run (train.py) and its prediction (training/memory_estimate.py, ``--dry_run``) both
plan through ``recipe_plan``, so they split the layers alike.
"""

from dataclasses import replace
from typing import Optional

from models import build_model_args
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import PipelinePlan, StageFits, plan_pipeline
from parallelisms.pipeline_cost import StageCostInputs
from training.config import JobConfig


def loss_impl(cfg: JobConfig) -> str:
    """The loss entry a run uses: ``auto`` is ``chunked``, as losses/registry.py resolves it."""
    return "chunked" if cfg.loss.name == "auto" else cfg.loss.name


def head_loss(cfg: JobConfig) -> str:
    """The kernels the head and loss run on a GPU. The vocab-parallel head's ``auto`` is
    CCE's unless z-loss, label smoothing or float32 parameters rule them out
    (losses/vocab_parallel.py); elsewhere ``loss_impl``."""
    if cfg.parallelism.vocab_parallel and cfg.loss.name == "auto":
        cce_able = (cfg.loss.z_loss_weight == 0 and cfg.loss.label_smoothing == 0
                    and cfg.training.mixed_precision_param != "float32")
        return "cce" if cce_able else "chunked"
    return loss_impl(cfg)


def stage_cost_inputs(cfg: JobConfig, dims: ParallelDims) -> StageCostInputs:
    t, ac, p = cfg.training, cfg.activation_checkpoint, cfg.parallelism
    model = replace(build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size), max_seq_len=t.seq_len)
    return StageCostInputs(model, t.seq_len, p.pipeline_parallel_microbatch_size, head_loss(cfg), ac.mode,
                           ac.selective_ac_option, dims.dp_shard if p.vocab_parallel else 1)


def recipe_plan(cfg: JobConfig, dims: ParallelDims, pp_rank: int, fits: Optional[StageFits] = None) -> PipelinePlan:
    """The plan of pipeline rank ``pp_rank``; ``fits`` (memory_estimate.stage_fits) when the GPU's size is known."""
    cost = stage_cost_inputs(cfg, dims)
    return plan_pipeline(cost.model.n_layers, cfg.parallelism, pp_rank, cfg.training.local_batch_size, cost, fits)
