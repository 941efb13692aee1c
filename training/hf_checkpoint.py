"""Hugging Face folders (``config.json`` + ``*.safetensors``): recognizing one, checking one, writing one.

Reading one goes through DCP's ``HuggingFaceStorageReader`` (training/checkpoint.py),
so that every rank reads only the slices of its own shards and stages.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from config.errors import CheckpointError
from models.args import ModelArgs
from models.hf_adapter import hf_config, to_hf_name

INDEX = "model.safetensors.index.json"
_FIX_STALE = "delete the stale file, or export the folder again with scripts/export_hf --replace"
_FIX_DOWNLOAD = "download or export the folder again"
_JSON_KINDS = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _read_json_object(file: Path) -> dict[str, Any]:
    """``file``'s JSON object; invalid JSON or another JSON value is one line naming the file."""
    try:
        value = json.loads(file.read_text())
    except ValueError as err:  # not JSON, or not UTF-8
        raise CheckpointError(f"{file} is not valid JSON ({err}); {_FIX_DOWNLOAD}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds {_JSON_KINDS[type(value)]}, not a JSON object; {_FIX_DOWNLOAD}")
    return value


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, checked to be a JSON object."""
    return _read_json_object(folder / "config.json")


def _tensor_files(files: list[Path]) -> dict[str, Path]:
    """Which file holds each tensor, from the safetensors headers alone; a name in two files is an error."""
    owners: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                names = list(f.keys())
        except Exception as err:  # safetensors raises its own error type for a damaged header
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); {_FIX_DOWNLOAD}") from None
        for name in names:
            if name in owners:
                raise CheckpointError(
                    f"{name} is in both {owners[name]} and {file}, so which one is meant is unknown; {_FIX_STALE}"
                )
            owners[name] = file
    return owners


def check_weight_files(folder: Path) -> None:
    """Refuse a folder whose weights could come from a mix of files, before any weight is read.

    With ``model.safetensors.index.json`` the files it names must all be there, no other
    ``*.safetensors`` may be, and each tensor must be in the file the index names. Without one,
    no tensor may be in two files. After this, the folder's ``*.safetensors`` are exactly the files
    to read, each tensor in one of them, which is what DCP's ``HuggingFaceStorageReader`` takes
    them to be (it reads every ``*.safetensors`` of the folder), so it needs no file list.

    Every rank checks for itself: only the headers are read (kilobytes a file, as the reader itself
    does on every rank), and the same files give every rank the same answer, so all ranks raise
    the same error without waiting on each other.
    """
    present = sorted(folder.glob("*.safetensors"))
    if not (folder / INDEX).is_file():
        _tensor_files(present)
        return
    weight_map = _read_json_object(folder / INDEX).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{folder / INDEX} has no weight_map object; {_FIX_DOWNLOAD}")
    named = sorted({folder / file for file in weight_map.values()})
    for file in named:
        if not file.is_file():
            raise CheckpointError(f"{file} is missing ({INDEX} lists it); copy the whole folder, or {_FIX_DOWNLOAD}")
    for file in present:
        if file not in named:
            raise CheckpointError(
                f"{file} is not listed in {folder / INDEX}, a leftover of another export or download; {_FIX_STALE}"
            )
    owners = _tensor_files(named)
    for name, file in weight_map.items():
        if owners.get(name) != folder / file:
            raise CheckpointError(f"{folder / INDEX} puts {name} in {file}, which does not hold it; {_FIX_DOWNLOAD}")


def write_hf_folder(
    state: dict[str, torch.Tensor],
    name: str,
    args: ModelArgs,
    out: str | Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[str]:
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
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
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
