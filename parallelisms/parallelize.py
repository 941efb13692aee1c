"""``parallelize``: everything applied to one model part (a pipeline stage, or the whole model), in order.

The order is fixed: float8 swaps the blocks' linear layers, activation checkpointing wraps
the blocks, ``torch.compile`` compiles the (wrapped) blocks, the vocab-parallel head replaces
the classifier by its vocab shard, and FSDP shards what is left over the data-parallel ranks (with
one, nothing: ``ComputeWeights`` gives the forward its bf16 weights); each step relies on the ones
before it (TorchTitan's order).
"""

from config.job_config import JobConfig
from models.transformer import Transformer
from parallelisms.activation_checkpoint import apply_activation_checkpointing
from parallelisms.compile import apply_compile
from parallelisms.float8 import convert_to_float8
from parallelisms.fsdp import apply_fsdp
from parallelisms.vocab_parallel import shard_head_over_vocab


def parallelize(part: Transformer, cfg: JobConfig, fsdp_mesh, param_dtype: str, pp_enabled: bool) -> None:
    """Apply float8, AC, compile, the vocab-parallel head and FSDP (over more than one rank) to ``part``
    (still on the meta device)."""
    if cfg.float8.enable:
        convert_to_float8(part, cfg.float8, dp_shard=fsdp_mesh.size(fsdp_mesh.ndim - 1))
    apply_activation_checkpointing(part, cfg.activation_checkpoint)
    if cfg.compile.enable and "model" in cfg.compile.components:
        apply_compile(part)
    if cfg.parallelism.vocab_parallel and part.output is not None:
        shard_head_over_vocab(part, fsdp_mesh)  # the classifier is never gathered
    if fsdp_mesh.size() > 1:  # on one data-parallel rank, ComputeWeights (parallelisms/compute_weights.py)
        apply_fsdp(
            part,
            fsdp_mesh,
            param_dtype,
            cfg.training.mixed_precision_reduce,
            cfg.parallelism.fsdp_reshard_after_forward,
            pp_enabled,
        )
