"""Turn a TOML recipe plus ``--section.key value`` overrides into a checked JobConfig.

Every user mistake becomes a ``ConfigError`` naming the key, raised before any
model, process group or GPU memory exists.
"""

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Sequence

import tomli

from config.errors import ConfigError
from config.job_config import Checkpoint, JobConfig
from losses.options import OPTIONS as LOSS_OPTIONS
from losses.registry import VOCAB_PARALLEL_NAMES, validate_loss_options
from models import MODEL_FLAVORS
from training.hf_checkpoint import is_hf_folder


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check_type(key: str, tp: Any, value: Any) -> Any:
    """Accept ``value`` for a field of type ``tp`` (TOML-typed), or raise naming the key.

    A ``Literal`` field takes one of its values; a ``list[X]`` field a list of X.
    """
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        for option in typing.get_args(tp):
            try:
                return _check_type(key, option, value)
            except ConfigError:
                pass
    elif origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return value
        raise ConfigError(
            key,
            f"{value!r} is not one of {', '.join(map(repr, allowed))}"
            f"{_did_you_mean(str(value), [str(a) for a in allowed])}",
        )
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            return value if item is Any else [_check_type(key, item, v) for v in value]
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")


def _parse_scalar(text: str) -> Any:
    """A command-line word as TOML would read it (number, boolean, quoted string), else the bare word."""
    try:
        return tomli.loads(f"v = {text}")["v"]
    except tomli.TOMLDecodeError:
        return text


def _parse_cli_value(key: str, tp: Any, text: str) -> Any:
    """Read a command-line string by the field's type: ``[a, b]``, ``a,b`` and bare words all work."""
    if tp is str:
        return text
    if typing.get_origin(tp) is list:
        value = _parse_scalar(text)
        if not isinstance(value, list):
            items = text.strip().removeprefix("[").removesuffix("]").split(",")
            value = [_parse_scalar(item.strip()) for item in items if item.strip()]
        return _check_type(key, tp, value)
    return _check_type(key, tp, _parse_scalar(text))


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _set(cfg: JobConfig, section: str, key: str, value: Any, *, from_cli: bool) -> None:
    sections = _fields(cfg)
    if section not in sections:
        raise ConfigError(
            section, f"unknown section{_did_you_mean(section, sections)}; sections are {', '.join(sections)}"
        )
    target = getattr(cfg, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ConfigError(
            f"{section}.{key}", f"unknown key{_did_you_mean(key, hints)}; [{section}] has {', '.join(hints)}"
        )
    full = f"{section}.{key}"
    if from_cli and value is None:
        if hints[key] is not bool:
            raise ConfigError(full, f"needs a value: --{full} VALUE or --{full}=VALUE")
        value = "true"
    value = _parse_cli_value(full, hints[key], value) if from_cli else _check_type(full, hints[key], value)
    setattr(target, key, value)


def _parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(arg, "expected --section.key value or --section.key=value (e.g. --training.steps 10)")
        name = arg[2:]
        if "=" in name:
            name, text = name.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            text = args[i]
        else:
            text = None  # a bare flag: only booleans may omit the value
        pairs.append((name, text))
        i += 1
    return pairs


def load_config(argv: Sequence[str]) -> JobConfig:
    """``argv`` is ``[--config PATH] [--section.key value ...]`` in any order."""
    argv = list(argv)
    paths, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if not path or path.startswith("--"):
                raise ConfigError("--config", "needs a path to a TOML recipe, e.g. --config configs/debug.toml")
            paths.append(path)
            i += 1 if "=" in arg else 2
        else:
            rest.append(arg)
            i += 1
    if len(paths) > 1:
        raise ConfigError(
            "--config",
            f"given {len(paths)} times ({', '.join(paths)}); pass one recipe and "
            "change its keys with --section.key value",
        )
    path, argv = (paths[0] if paths else None), rest
    cfg = JobConfig()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError("--config", f"no recipe file at '{path}' (recipes live in configs/)")
        try:
            data = tomli.loads(Path(path).read_text())
        except tomli.TOMLDecodeError as err:
            raise ConfigError("--config", f"'{path}' is not valid TOML: {err}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(section, f"expected a [{section}] table in '{path}'")
            for key, value in table.items():
                _set(cfg, section, key, value, from_cli=False)
    for name, text in _parse_overrides(argv):
        section, _, key = name.partition(".")
        _set(cfg, section, key, text, from_cli=True)
    validate_config(cfg)
    return cfg


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def validate_config(cfg: JobConfig) -> None:
    """Checks that need no process group: choices, ranges, and cross-key combinations."""
    flavors = MODEL_FLAVORS[cfg.model.name]
    _require(
        cfg.model.flavor in flavors,
        "model.flavor",
        f"{cfg.model.name} has no flavor {cfg.model.flavor!r}; choose one of {', '.join(flavors)}",
    )
    _require(cfg.model.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 keeps the flavor's vocabulary)")

    t = cfg.training
    for key in ("steps", "local_batch_size", "seq_len"):
        _require(getattr(t, key) > 0, f"training.{key}", "must be a positive integer")
    _require(
        t.seq_len >= 2,
        "training.seq_len",
        "must be >= 2: a window of one token has no next token to predict, so nothing would be learned",
    )
    _require(
        t.global_batch_size == -1 or t.global_batch_size > 0,
        "training.global_batch_size",
        "must be positive, or -1 for local_batch_size x data-parallel degree",
    )
    _require(t.max_norm >= 0, "training.max_norm", "must be >= 0 (0 turns clipping off)")
    _require(t.nonfinite_max_skips >= 0, "training.nonfinite_max_skips", "must be >= 0")

    o = cfg.optimizer
    _require(o.lr > 0, "optimizer.lr", "must be positive")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _require(
        len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
        "optimizer.betas",
        f"expected two numbers in [0, 1), got {o.betas!r}",
    )
    _require(o.eps > 0, "optimizer.eps", "must be positive")
    _require(cfg.lr_scheduler.warmup_steps >= 0, "lr_scheduler.warmup_steps", "must be >= 0")
    _require(0 <= cfg.lr_scheduler.min_lr_factor <= 1, "lr_scheduler.min_lr_factor", "must be in [0, 1]")

    options = {k: v for k, v in dataclasses.asdict(cfg.loss).items() if k != "name"}
    validate_loss_options(cfg.loss.name, options)

    p = cfg.parallelism
    for key in ("data_parallel_replicate_degree", "pipeline_parallel_degree"):
        _require(getattr(p, key) >= 1, f"parallelism.{key}", "must be >= 1")
    for key in ("pipeline_parallel_microbatch_size", "pipeline_parallel_virtual_stages"):
        _require(getattr(p, key) == "auto" or getattr(p, key) >= 1, f"parallelism.{key}", "must be >= 1 or 'auto'")
    _require(
        p.data_parallel_shard_degree == -1 or p.data_parallel_shard_degree >= 1,
        "parallelism.data_parallel_shard_degree",
        "must be >= 1, or -1 to fill the remaining ranks",
    )
    _require(
        p.pipeline_parallel_layers_per_stage >= 0,
        "parallelism.pipeline_parallel_layers_per_stage",
        "must be >= 0 (0 splits the layers evenly)",
    )
    _require(
        not (p.pipeline_parallel_layers_per_stage and p.pipeline_parallel_stage_split_points),
        "parallelism.pipeline_parallel_stage_split_points",
        "set either this or pipeline_parallel_layers_per_stage, not both",
    )
    _require(
        all(isinstance(x, int) and not isinstance(x, bool) for x in p.pipeline_parallel_stage_split_points),
        "parallelism.pipeline_parallel_stage_split_points",
        "expected a list of layer indices where new stages start, e.g. [7, 14, 21]",
    )

    if p.vocab_parallel:
        _require(
            cfg.loss.name in VOCAB_PARALLEL_NAMES,
            "loss.name",
            f"the vocab-parallel head runs {', '.join(map(repr, VOCAB_PARALLEL_NAMES))}, not {cfg.loss.name!r}",
        )
        _require(
            cfg.loss.chunk_size == LOSS_OPTIONS["chunk_size"].default and not cfg.loss.compile,
            "loss.chunk_size",
            "the vocab-parallel head does not take chunk_size or compile yet",
        )

    ac = cfg.activation_checkpoint
    if ac.mode == "selective":
        _require(
            ac.selective_ac_option == "op" or (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) > 0),
            "activation_checkpoint.selective_ac_option",
            f"expected 'op' or a positive integer N (every N-th block), got {ac.selective_ac_option!r}",
        )
    _require(cfg.metrics.log_freq >= 1, "metrics.log_freq", "must be >= 1")
    _require(
        cfg.profiling.profile_freq >= 2,
        "profiling.profile_freq",
        "must be >= 2 (each traced step follows one untraced warm-up step)",
    )
    for key in ("init_timeout_seconds", "train_timeout_seconds"):
        _require(getattr(cfg.comm, key) > 0, f"comm.{key}", "must be a positive number of seconds")
    _require(cfg.checkpoint.interval >= 1, "checkpoint.interval", "must be >= 1")
    _require(cfg.checkpoint.keep_latest_k >= 0, "checkpoint.keep_latest_k", "must be >= 0 (0 keeps all)")
    _require(cfg.checkpoint.load_step >= -1, "checkpoint.load_step", "must be a saved step, or -1 for the newest")
    _check_initial_load(cfg.checkpoint)
    _check_validation(cfg)


def _check_initial_load(ck: Checkpoint) -> None:
    """``initial_load_path`` must be a DCP checkpoint or a Hugging Face folder (weights only)."""
    if not ck.initial_load_path:
        return
    folder = Path(ck.initial_load_path)
    hf = is_hf_folder(folder)
    _require(
        hf or (folder / ".metadata").is_file(),
        "checkpoint.initial_load_path",
        f"'{folder}' is neither a checkpoint folder (with .metadata) nor a Hugging Face folder "
        "(config.json and *.safetensors)",
    )
    _require(
        ck.initial_load_model_only or not hf,
        "checkpoint.initial_load_model_only",
        f"'{folder}' is a Hugging Face folder, which holds only weights; set it to true",
    )


def _check_validation(cfg: JobConfig) -> None:
    """``[validation]``, when enabled; the data itself is checked when it is loaded (training/validation.py)."""
    v = cfg.validation
    if not v.enable:
        return
    _require(
        bool(v.dataset_path),
        "validation.dataset_path",
        "is empty; set it to the held-out data (a file, or a folder of validation.dataset files)",
    )
    for key in ("freq", "steps"):
        _require(getattr(v, key) >= 1, f"validation.{key}", "must be >= 1")
    for key in ("local_batch_size", "seq_len"):
        _require(getattr(v, key) >= 0, f"validation.{key}", f"must be >= 0 (0: training.{key})")
    _require(
        v.seq_len <= cfg.training.seq_len,
        "validation.seq_len",
        f"{v.seq_len} exceeds training.seq_len {cfg.training.seq_len}, the positions the model is built for",
    )
    mbs = cfg.parallelism.pipeline_parallel_microbatch_size  # "auto" picks one that divides both
    local = v.local_batch_size or cfg.training.local_batch_size
    _require(
        cfg.parallelism.pipeline_parallel_degree == 1 or mbs == "auto" or local % mbs == 0,
        "validation.local_batch_size",
        f"{local} is not a multiple of parallelism.pipeline_parallel_microbatch_size {mbs}",
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def dump_config(cfg: JobConfig) -> str:
    """The effective recipe (file + overrides) as TOML that ``load_config`` reads back unchanged."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
