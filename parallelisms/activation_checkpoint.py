"""Activation checkpointing of transformer blocks: full, every N-th block, or op-level selective."""

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from config.job_config import ActivationCheckpoint
from models.transformer import Transformer

# Saved by op-level selective AC: the expensive results; everything else is recomputed.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.higher_order.flex_attention,  # block_causal on CUDA (models/attention.py)
    torch.ops.aten._scaled_mm.default,  # [float8]: the linear layers' matmuls
    torch.ops.aten.max.default,  # [float8]: a cast's absolute maximum, its scale (a scalar; TorchTitan saves it too)
}


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, ac: ActivationCheckpoint) -> None:
    if ac.mode == "none":
        return
    for i, (name, block) in enumerate(list(model.layers.items())):
        if ac.mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif ac.selective_ac_option == "op":
            context = partial(create_selective_checkpoint_contexts, _save_matmuls_policy)
            wrapped = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)
        elif (i + 1) % int(ac.selective_ac_option) == 0:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            continue
        model.layers[name] = wrapped
