"""Weight init that does not depend on how the model is split or sharded.

Each parameter is drawn whole from a generator seeded by (seed, its name) and
every rank keeps only its own shard. A pipeline stage, an FSDP shard and a
single process therefore start from the same numbers, which is what makes
multi-process runs comparable to a single-process one and lets a tied head on
the last pipeline stage start equal to the embedding on the first.
"""

import zlib

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from models.transformer import Transformer


def _full_init(kind: str, std: float, shape: torch.Size, seed: int, key: str, device: torch.device) -> Tensor:
    if kind == "ones":
        return torch.ones(shape, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return torch.empty(shape, device=device).normal_(0.0, std, generator=gen)


def _local_part(param: Tensor, full: Tensor) -> Tensor:
    if not isinstance(param, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


# Wrappers that activation checkpointing or compile may add to a parameter's name.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(fqn: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


@torch.no_grad()
def init_weights(model: Transformer, seed: int, device: torch.device) -> None:
    """Fill every parameter (plain or DTensor) of a model or pipeline stage already on ``device``."""
    model.tie_weights()
    model.init_buffers(device)
    for fqn, param in model.named_parameters():
        fqn = canonical_name(fqn)
        kind, std = model.init_spec(fqn)
        full = _full_init(kind, std, param.shape, seed, model.init_key(fqn), device)
        target = param.to_local() if isinstance(param, DTensor) else param
        target.copy_(_local_part(param, full))
