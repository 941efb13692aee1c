"""Turn a checkpoint into a Hugging Face folder that transformers loads.

    python -m scripts.export_hf --checkpoint outputs/run/checkpoint/step-1000 \\
        --config outputs/run/config.toml --output qwen3-hf [--dtype bfloat16] [--replace] [--section.key value ...]

The recipe says which model the checkpoint holds (a run's dump folder has its effective one,
config.toml); overrides after it work as in train.py. One process on the CPU: the weights are
read whole, already in the output dtype, so the memory needed is one copy of the model (3.4 GB
for Qwen3-1.7B in bfloat16). Writes config.json and model.safetensors, or past --max_shard_gib
model-0000i-of-0000n.safetensors with model.safetensors.index.json; tokenizer files are not copied.

A non-empty --output is refused unless --replace is given: writing into it would leave the old
export's shards and index next to the new ones. The export is written to ``<output>.partial``
and renamed into place, so a reader sees the old folder or the new one, never a mix.
"""

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp

from config.errors import CheckpointError, ConfigError
from models import build_model_args
from training.checkpoint import EXPORT_DTYPES, model_fingerprint, read_train_state
from training.hf_checkpoint import write_hf_folder
from training.recipe import load_recipe


def read_model(path: Path, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as full tensors under our names, read in ``dtype`` (None: as stored)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {
        key.removeprefix("model."): torch.empty(md.size, dtype=dtype or md.properties.dtype)
        for key, md in metadata.items()
        if key.startswith("model.")
    }
    dcp.load({"model": model}, checkpoint_id=str(path))
    return model


def check_output(output: Path, replace: bool) -> None:
    """Refuse, before anything is read, an ``--output`` that holds something and is not to be replaced."""
    if output.exists() and not output.is_dir():
        raise ConfigError("--output", f"{output} is a file, not a folder; pick a folder to write")
    if output.is_dir() and any(output.iterdir()) and not replace:
        raise ConfigError(
            "--output", f"{output} is not empty; pass --replace to replace it whole, or pick an empty or new folder"
        )


def write_in_place(output: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """``write(folder)`` into ``<output>.partial``, then rename that to ``output``; returns what ``write`` does.

    An existing ``output`` is renamed to ``<output>.replaced`` first and deleted once the new folder is in
    place: a reader finds the old export, the new one, or (between the two renames) none, never a mix. A
    failed write leaves ``output`` as it was.
    """
    output = output.absolute()  # a name to add suffixes to, even for "."
    partial, replaced = output.with_name(output.name + ".partial"), output.with_name(output.name + ".replaced")
    for leftover in (partial, replaced):  # of an export that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        files = write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.exists():
        os.replace(output, replaced)
    os.replace(partial, output)
    shutil.rmtree(replaced, ignore_errors=True)
    return files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Turn a checkpoint into a Hugging Face folder.")
    parser.add_argument("--checkpoint", required=True, help="a step-N folder")
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=list(EXPORT_DTYPES), help="the weights' dtype (default: as stored)")
    parser.add_argument("--max_shard_gib", type=float, default=5.0, help="largest safetensors file")
    parser.add_argument("--replace", action="store_true", help="replace a non-empty --output whole")
    args, overrides = parser.parse_known_args(argv)
    output = Path(args.output)
    # One process reading the whole checkpoint is the intent here, not a missing process group.
    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
    try:
        check_output(output, args.replace)
        cfg = load_recipe(["--config", args.config, *overrides])
        model_args = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size)
        checkpoint = Path(args.checkpoint)
        read_train_state(
            checkpoint,
            {"fingerprint": ""},
            model_fingerprint(model_args),
            "pass the recipe (and overrides) the checkpoint was trained with",
        )
        state = read_model(checkpoint, EXPORT_DTYPES.get(args.dtype))
    except (ConfigError, CheckpointError) as err:
        print(f"export_hf: {err}", file=sys.stderr)
        return 2
    dtype = next(iter(state.values())).dtype
    files = write_in_place(
        output,
        lambda folder: write_hf_folder(
            state, cfg.model.name, model_args, folder, dtype, int(args.max_shard_gib * 2**30)
        ),
    )
    print(f"export_hf: wrote config.json and {', '.join(files)} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
