"""FSDP2 (``fully_shard``) for a model or pipeline stage, HSDP when the mesh is 2-D.

``fsdp_groups`` is the one description of which modules are sharded together and which
stay gathered after their forward: ``apply_fsdp`` applies it and the memory estimate
(planning/memory.py) counts from it.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from models.transformer import Transformer


@dataclass(frozen=True)
class FSDPGroup:
    """One ``fully_shard`` call: the module (``""``: the model itself, which takes every parameter
    no other group took) and whether its parameters are resharded after its forward."""

    name: str
    kind: Literal["embedding", "block", "head", "root"]
    reshard_after_forward: bool


def tied_in_root(model: Transformer, vocab_parallel_head: bool) -> bool:
    """A tied embedding and head in one module: no pipeline split between them, and no
    vocab-parallel head (which is a separate, vocab-sharded copy)."""
    return (
        not vocab_parallel_head
        and model.output is not None
        and model.tok_embeddings is not None
        and model.output.weight is model.tok_embeddings.weight
    )


def fsdp_groups(
    model: Transformer, reshard_after_forward: str, pp_enabled: bool, vocab_parallel_head: bool
) -> list[FSDPGroup]:
    """The groups in the order they are sharded (children before the root).

    ``reshard_after_forward="default"`` follows TorchTitan: reshard every block but the last
    (its backward comes right after), and never under pipeline parallel, where resharding
    would re-gather once per microbatch. A tied embedding and head share one parameter and
    stay in the root group, which is then not resharded after forward: the loss finds the
    unsharded weight and its gradient (embedding + head) is reduced once. An untied head is
    applied by the loss right after the forward and first in the backward: it stays gathered
    between unless ``"always"``. A vocab-parallel head is no group at all: it is never gathered.
    """
    policy = {"default": not pp_enabled, "always": True, "never": False}[reshard_after_forward]
    tied = tied_in_root(model, vocab_parallel_head)
    groups = []
    if model.tok_embeddings is not None and not tied:
        groups.append(FSDPGroup("tok_embeddings", "embedding", policy))
    names = list(model.layers.keys())
    for i, name in enumerate(names):
        last = i == len(names) - 1
        groups.append(
            FSDPGroup(f"layers.{name}", "block", policy and not (last and reshard_after_forward == "default"))
        )
    if model.output is not None and not tied and not vocab_parallel_head:
        groups.append(FSDPGroup("output", "head", reshard_after_forward == "always"))
    groups.append(FSDPGroup("", "root", policy and not tied))
    return groups


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: str,
    reduce_dtype: str,
    reshard_after_forward: str,
    pp_enabled: bool,
) -> None:
    """Shard ``model`` group by group as ``fsdp_groups`` describes."""
    # Forward inputs are not cast: the blocks' hidden states already come in param_dtype (the embedding's
    # output, a stage's receive buffer), and the rope table stays fp32, as parallelisms/compute_weights.py
    # leaves it where no FSDP runs.
    mp = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype), reduce_dtype=getattr(torch, reduce_dtype), cast_forward_inputs=False
    )
    vp_head = model.output is not None and isinstance(model.output.weight, DTensor)  # parallelisms/vocab_parallel.py
    ignored = {model.output.weight} if vp_head else None
    for group in fsdp_groups(model, reshard_after_forward, pp_enabled, vp_head):
        module: nn.Module = model.get_submodule(group.name)
        fully_shard(
            module,
            mesh=mesh,
            mp_policy=mp,
            reshard_after_forward=group.reshard_after_forward,
            ignored_params=ignored if group.kind == "root" else None,
        )
