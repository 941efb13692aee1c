"""Load a recipe completely: ``load_recipe(argv)`` is how ``train.py``, ``scripts/export_hf.py`` and the
tests read one.

``config/loader.py`` checks everything the dataclasses alone can say (types, choices, ranges, rules
between keys). What needs another package's facts is asked of that package here, after it and in
this order, still before any process group, model or GPU memory exists: the flavor exists
(``models``), the ``[loss]`` options suit the chosen entry and the vocab-parallel head (``losses``),
``checkpoint.initial_load_path`` is a folder a run can start from (``training``).
"""

import dataclasses
from pathlib import Path
from typing import Sequence

from config.errors import ConfigError, require
from config.job_config import Checkpoint, JobConfig
from config.loader import load_config
from losses import check_vocab_parallel, validate_loss_options
from models import build_model_args
from training.hf_checkpoint import is_hf_folder


def load_recipe(argv: Sequence[str]) -> JobConfig:
    """``argv`` is ``[--config PATH] [--section.key value ...]`` in any order; every mistake is a ``ConfigError``."""
    cfg = load_config(argv)
    try:
        build_model_args(cfg.model.name, cfg.model.flavor)
    except ValueError as err:
        raise ConfigError("model.flavor", str(err)) from None
    loss_options = {k: v for k, v in dataclasses.asdict(cfg.loss).items() if k != "name"}
    validate_loss_options(cfg.loss.name, loss_options)
    if cfg.parallelism.vocab_parallel:
        check_vocab_parallel(cfg.loss.name, loss_options)
    _check_initial_load(cfg.checkpoint)
    return cfg


def _check_initial_load(ck: Checkpoint) -> None:
    """``initial_load_path`` must be a DCP checkpoint or a Hugging Face folder (weights only)."""
    if not ck.initial_load_path:
        return
    folder = Path(ck.initial_load_path)
    hf = is_hf_folder(folder)
    require(
        hf or (folder / ".metadata").is_file(),
        "checkpoint.initial_load_path",
        f"'{folder}' is neither a checkpoint folder (with .metadata) nor a Hugging Face folder "
        "(config.json and *.safetensors)",
    )
    require(
        ck.initial_load_model_only or not hf,
        "checkpoint.initial_load_model_only",
        f"'{folder}' is a Hugging Face folder, which holds only weights; set it to true",
    )
