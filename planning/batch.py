"""The global batch and its micro-steps: the arithmetic every other prediction and the loop start from."""

from config.errors import ConfigError
from config.job_config import JobConfig
from parallelisms.parallel_dims import ParallelDims


def global_batch_size(cfg: JobConfig, dims: ParallelDims) -> int:
    """Sequences per optimizer step; a whole number of micro-steps of every data-parallel rank."""
    t = cfg.training
    per_micro_step = t.local_batch_size * dims.dp
    g = t.global_batch_size if t.global_batch_size > 0 else per_micro_step
    if g % per_micro_step:
        raise ConfigError(
            "training.global_batch_size",
            f"{g} is not a multiple of local_batch_size {t.local_batch_size} x data-parallel degree "
            f"{dims.dp} = {per_micro_step}; gradient accumulation needs whole micro-steps",
        )
    return g


def accumulation_steps(cfg: JobConfig, dims: ParallelDims) -> int:
    """Micro-steps per optimizer step: the global batch over every data-parallel rank's micro-batch."""
    return global_batch_size(cfg, dims) // (cfg.training.local_batch_size * dims.dp)
