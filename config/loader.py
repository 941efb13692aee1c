"""Turn a TOML recipe plus ``--section.key value`` overrides into a checked JobConfig, and back.

What it checks needs only the dataclasses: TOML syntax, unknown sections and keys, types (a
``Literal``'s choices), that every float is finite, each key's rules (``config/rules.py``), each
section's ``check()``, then ``JobConfig.check()``. Every mistake is a ``ConfigError`` naming the
key. Facts other packages own (the flavor exists, the ``[loss]`` options, the initial load
folder) are checked by ``training/recipe.py``, which is how a run loads a recipe.
"""

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Sequence

import tomli

from config.errors import ConfigError, did_you_mean
from config.job_config import JobConfig


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
            f"{did_you_mean(str(value), [str(a) for a in allowed])}",
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
            section, f"unknown section{did_you_mean(section, sections)}; sections are {', '.join(sections)}"
        )
    target = getattr(cfg, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints:
        raise ConfigError(
            f"{section}.{key}", f"unknown key{did_you_mean(key, hints)}; [{section}] has {', '.join(hints)}"
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
    check_config(cfg)
    return cfg


def _non_finite(value: Any) -> bool:
    """An inf or nan float, or a list holding one: refused for every key, whatever its rules."""
    return any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value]))


def check_config(cfg: JobConfig) -> None:
    """The rules of every key and section, section by section in recipe order, then those between sections.

    Per section: each key in order (finite when a float, then the rules in its type), then the
    section's ``check()``.
    """
    for section in dataclasses.fields(cfg):
        target = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(target), include_extras=True)
        for f in dataclasses.fields(target):
            key, value = f"{section.name}.{f.name}", getattr(target, f.name)
            if _non_finite(value):
                what = "hold finite numbers" if isinstance(value, list) else "be a finite number"
                raise ConfigError(key, f"must {what}, got {value!r}")
            for rule in getattr(hints[f.name], "__metadata__", ()):
                problem = rule.problem(value)
                if problem is not None:
                    raise ConfigError(key, problem)
        if hasattr(target, "check"):
            target.check()
    cfg.check()


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (what ``dump_config`` writes, and docs/config.md's defaults)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def dump_config(cfg: JobConfig) -> str:
    """The effective recipe (file + overrides) as TOML that ``load_config`` reads back unchanged."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
