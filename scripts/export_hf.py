"""Turn a checkpoint into a Hugging Face folder that transformers loads.

    python -m scripts.export_hf --checkpoint outputs/run/checkpoint/step-1000 \\
        --config outputs/run/config.toml --output qwen3-hf [--dtype bfloat16] [--section.key value ...]

The recipe says which model the checkpoint holds (a run's dump folder has its effective one,
config.toml); overrides after it work as in train.py. One process on the CPU: the weights are
read whole, already in the output dtype, so the memory needed is one copy of the model (3.4 GB
for Qwen3-1.7B in bfloat16). Writes config.json and model.safetensors, or past --max_shard_gib
model-0000i-of-0000n.safetensors with model.safetensors.index.json; tokenizer files are not copied.
"""

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp

from models import build_model_args
from training.checkpoint import EXPORT_DTYPES, CheckpointError, model_fingerprint, read_train_state
from training.config_loader import load_config
from config.errors import ConfigError
from training.hf_checkpoint import write_hf_folder


def read_model(path: Path, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as full tensors under our names, read in ``dtype`` (None: as stored)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(md.size, dtype=dtype or md.properties.dtype)
             for key, md in metadata.items() if key.startswith("model.")}
    dcp.load({"model": model}, checkpoint_id=str(path))
    return model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Turn a checkpoint into a Hugging Face folder.")
    parser.add_argument("--checkpoint", required=True, help="a step-N folder")
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=list(EXPORT_DTYPES), help="the weights' dtype (default: as stored)")
    parser.add_argument("--max_shard_gib", type=float, default=5.0, help="largest safetensors file")
    args, overrides = parser.parse_known_args(argv)
    # One process reading the whole checkpoint is the intent here, not a missing process group.
    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
    try:
        cfg = load_config(["--config", args.config, *overrides])
        model_args = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size)
        checkpoint = Path(args.checkpoint)
        read_train_state(checkpoint, {"fingerprint": ""}, model_fingerprint(model_args),
                         "pass the recipe (and overrides) the checkpoint was trained with")
        state = read_model(checkpoint, EXPORT_DTYPES.get(args.dtype))
    except (ConfigError, CheckpointError) as err:
        print(f"export_hf: {err}", file=sys.stderr)
        return 2
    dtype = next(iter(state.values())).dtype
    files = write_hf_folder(state, cfg.model.name, model_args, args.output, dtype, int(args.max_shard_gib * 2**30))
    print(f"export_hf: wrote config.json and {', '.join(files)} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
