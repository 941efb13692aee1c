"""FSDP2 (``fully_shard``) for a model or pipeline stage, HSDP when the mesh is 2-D."""

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from models.transformer import Transformer

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: str, reduce_dtype: str,
               reshard_after_forward: str, pp_enabled: bool) -> None:
    """Shard each block, the embedding, the head and the root.

    ``reshard_after_forward="default"`` follows TorchTitan: reshard every block
    but the last (its backward comes right after), and never under pipeline
    parallel, where resharding would re-gather once per microbatch.

    A tied embedding and head (no pipeline) share one parameter and stay in the
    root group, which is then not resharded after forward: the loss finds the
    unsharded weight and its gradient (embedding + head) is reduced once.

    A vocab-parallel head (already a vocab-sharded DTensor, parallelisms/vocab_parallel.py)
    is left out: it is never gathered.
    """
    mp = MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])
    default = not pp_enabled
    policy = {"default": default, "always": True, "never": False}[reshard_after_forward]

    tied_in_root = model.output is not None and model.tok_embeddings is not None \
        and model.output.weight is model.tok_embeddings.weight
    vocab_parallel_head = model.output is not None and isinstance(model.output.weight, DTensor)
    if model.tok_embeddings is not None and not tied_in_root:
        fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=mp, reshard_after_forward=policy)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=policy and not (last and reshard_after_forward == "default"))
    if model.output is not None and not tied_in_root and not vocab_parallel_head:
        # Applied by the loss right after forward, first in backward: keep it gathered between.
        fully_shard(model.output, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always")
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=policy and not tied_in_root,
                ignored_params={model.output.weight} if vocab_parallel_head else None)
