"""Hugging Face folders (``config.json`` + ``*.safetensors``): recognizing one, writing one.

Reading one goes through DCP's ``HuggingFaceStorageReader`` (training/checkpoint.py),
so that every rank reads only the slices of its own shards and stages.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.args import ModelArgs
from models.hf_adapter import hf_config, to_hf_name

INDEX = "model.safetensors.index.json"


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def write_hf_folder(state: dict[str, torch.Tensor], name: str, args: ModelArgs, out: str | Path, dtype: torch.dtype,
                    max_shard_bytes: int) -> list[str]:
    """Write full tensors (our names) as ``model*.safetensors`` + ``config.json``; returns the file names.

    Tensors go in order into shards of at most ``max_shard_bytes`` (one tensor may exceed it);
    several shards get ``model-0000i-of-0000n.safetensors`` names and the index transformers reads.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for fqn, tensor in state.items():
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][to_hf_name(fqn)] = tensor.to(dtype).contiguous()
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for shard, file in zip(shards, names):
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = hf_config(name, args, str(dtype).removeprefix("torch."))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return names
