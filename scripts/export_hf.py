"""Turn a checkpoint into a Hugging Face folder that transformers loads.

    python -m scripts.export_hf --checkpoint outputs/run/checkpoint/step-1000 \\
        --config outputs/run/config.toml --output qwen3-hf [--dtype bfloat16] [--replace] [--section.key value ...]

The recipe says which model the checkpoint holds (a run's dump folder has its effective one,
config.toml); overrides after it work as in train.py. One process on the CPU: the weights are
read whole, already in the output dtype, so the memory needed is one copy of the model (3.4 GB
for Qwen3-1.7B in bfloat16). Writes config.json and model.safetensors, or past --max_shard_gib
model-0000i-of-0000n.safetensors with model.safetensors.index.json; tokenizer files are not copied.

It never deletes what it did not write. An --output that is, or holds, the checkpoint, the recipe
or the current folder is refused, as is a non-empty one unless it holds an earlier export and
--replace is given: writing into it would leave the old export's shards and index next to the new
ones. An earlier export is recognised by what export_hf writes, config.json and model*.safetensors
(+ the index) and nothing else, rather than by a marker file: no extra file travels with the model
to the Hub, and a folder to which anything was added (tokenizer files, a README) is not replaced
with its additions. The export is written to ``<output>.partial`` and renamed into place, so a
reader sees the old folder or the new one, never a mix.
"""

import argparse
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp

from config.errors import CheckpointError, ConfigError
from models import build_model_args
from training.checkpoint import EXPORT_DTYPES, broken_files, complete_steps, model_fingerprint, read_train_state
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


# What an export consists of (training/hf_checkpoint.write_hf_folder), and all it consists of.
_EXPORTED = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


def _not_exported(folder: Path) -> list[str]:
    """The entries of ``folder`` that no export writes; a subfolder ends in "/"."""
    return sorted(p.name + "/" for p in folder.iterdir() if p.is_dir()) + sorted(
        p.name for p in folder.iterdir() if not p.is_dir() and not _EXPORTED.fullmatch(p.name)
    )


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def check_output(output: Path, replace: bool, checkpoint: Path, config: Path) -> None:
    """Refuse, before anything is read, an ``--output`` whose writing or replacing would delete what
    export_hf did not write: the checkpoint, the recipe, the current folder (or a folder holding one of
    them), a folder holding anything but an earlier export, or one not to be replaced."""
    target = output.resolve()
    new_home = checkpoint.parent.parent / f"hf-{checkpoint.name}"
    for what, path in (("the checkpoint", checkpoint), ("the recipe", config), ("the current folder", Path.cwd())):
        if target == path.resolve() or target in path.resolve().parents:
            raise ConfigError(
                "--output",
                f"{output} {'is' if target == path.resolve() else 'holds'} {what} ({path}), which an export must "
                f"not replace; pick a folder of its own, e.g. --output {new_home}",
            )
    if output.exists() and not output.is_dir():
        raise ConfigError("--output", f"{output} is a file, not a folder; pick a folder to write")
    if output.is_dir() and any(output.iterdir()):
        foreign = _not_exported(output)
        if foreign or not (output / "config.json").is_file() or not any(output.glob("model*.safetensors")):
            raise ConfigError(
                "--output",
                f"{output} holds {_listing(foreign or sorted(p.name for p in output.iterdir()))}, which is no "
                "export of export_hf (config.json + model*.safetensors alone), the only folder it replaces; "
                "pick a new or empty folder",
            )
        if not replace:
            raise ConfigError(
                "--output",
                f"{output} holds an earlier export; pass --replace to replace it whole, or pick a new or empty folder",
            )
    for leftover in _leftovers(output):  # of an export that was killed: removed before writing
        if leftover.exists() and (not leftover.is_dir() or _not_exported(leftover)):
            raise ConfigError(
                "--output",
                f"{leftover} exists and is not what an unfinished export leaves, so it is kept; move it away "
                "or pick another --output",
            )


def _leftovers(output: Path) -> tuple[Path, Path]:
    """Where an export is written before it is renamed into place, and where the folder it replaces waits."""
    output = output.absolute()  # a name to add suffixes to, even for "."
    return output.with_name(output.name + ".partial"), output.with_name(output.name + ".replaced")


def check_checkpoint(path: Path) -> None:
    """One step-N folder of a run's checkpoints, undamaged; the run's checkpoint folder itself names its newest."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder; pass a checkpoint, a step-N folder of a run's checkpoint/")
    if not (path / ".metadata").is_file():
        steps = complete_steps(path)
        if steps:
            newest = path / f"step-{steps[-1]}"
            raise CheckpointError(
                f"{path} holds checkpoints, one per step-N folder; pass one, e.g. --checkpoint {newest} (the newest)"
            )
        raise CheckpointError(f"{path} is no checkpoint (no .metadata); pass a step-N folder of a run's checkpoint/")
    damaged = broken_files(path)
    if damaged:
        raise CheckpointError(
            f"{path} is damaged ({', '.join(damaged)}); export another step-N folder of the run, or copy this one again"
        )


def write_in_place(output: Path, write: Callable[[Path], list[str]]) -> list[str]:
    """``write(folder)`` into ``<output>.partial``, then rename that to ``output``; returns what ``write`` does.

    An existing ``output`` is renamed to ``<output>.replaced`` first and deleted once the new folder is in
    place: a reader finds the old export, the new one, or (between the two renames) none, never a mix. A
    failed write leaves ``output`` as it was.
    """
    partial, replaced = _leftovers(output)
    for leftover in (partial, replaced):  # of an export that was killed (check_output looked inside)
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
    parser.add_argument("--replace", action="store_true", help="replace an earlier export in --output whole")
    args, overrides = parser.parse_known_args(argv)
    output, checkpoint = Path(args.output), Path(args.checkpoint)
    # One process reading the whole checkpoint is the intent here, not a missing process group.
    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
    try:
        check_output(output, args.replace, checkpoint, Path(args.config))
        if not 0 < args.max_shard_gib < math.inf:
            raise ConfigError("--max_shard_gib", f"{args.max_shard_gib:g} is no file size; give one above 0, e.g. 5")
        cfg = load_recipe(["--config", args.config, *overrides])
        model_args = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size)
        check_checkpoint(checkpoint)
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
