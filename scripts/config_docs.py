"""Write docs/config.md from the recipe's dataclasses: ``python -m scripts.config_docs`` (``--check``: exit 1
if the file differs from what would be written, changing nothing).

Every key's row comes from ``config/job_config.py``: its type and default, its allowed values (a
``Literal``'s choices, the rules in its ``Annotated`` type) and its attribute docstring, read with
``ast``; a section's prose is its dataclass's docstring. The flavors and the ``[loss]`` support matrix
come from the registries that own them. The page's own prose, how recipes are written and where
they are checked, is ``PREAMBLE`` below. A new key needs nothing here, only its docstring.
"""

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

from config.job_config import JobConfig
from config.loader import toml_value
from losses.registry import ENTRIES, LOSS_NAMES, loss_option_names
from models.flavors import MODEL_FLAVORS

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "config" / "job_config.py"
PAGE = ROOT / "docs" / "config.md"

PREAMBLE = """\
# Recipe configuration reference

Every key a TOML recipe (`configs/*.toml`) can set, by section. The dataclasses are in
`config/job_config.py` (a key's choices are its `Literal` type, its range a rule in its type, its
documentation the docstring under it); parsing and checks in `config/loader.py`, the checks against
other packages' facts in `training/recipe.py`. This page is generated from them by
`python -m scripts.config_docs`; `tests/test_config_docs.py` fails when it differs.

## Using recipes

```sh
torchrun --nproc_per_node=8 train.py --config configs/qwen3_1p7b_pp4.toml --training.steps 50 --loss.name=chunked
NGPU=8 CONFIG_FILE=configs/qwen3_1p7b_pp4.toml ./run_train.sh --training.steps 50   # same, via the wrapper
python train.py --config configs/debug.toml                                        # one process, world of one
```

- `--config PATH` names the recipe (also `--config=PATH`). Without it every key
  keeps its default below. Each TOML table is a section; a key outside a
  `[section]` table is an error.
- Overrides are `--section.key value` or `--section.key=value`, in any order
  relative to `--config`; they are applied after the recipe.
- A command-line value is read as a TOML value; if it is not valid TOML it is
  taken as a bare string, so `--model.flavor 1.7B` and `--loss.name cce` need no
  quotes. For a string key the text is kept verbatim even when it looks like a
  number (`--activation_checkpoint.selective_ac_option 2` gives `"2"`).
- Lists: `[a, b]` or `a,b`; each item is read like a scalar value, so
  `--optimizer.betas 0.8,0.95`, `--parallelism.pipeline_parallel_stage_split_points "[7, 14, 21]"`
  and `--compile.components "[model, loss]"` all work.
- A bare flag means `true`: `--compile.enable` (also when it is the last
  argument or followed by another `--...`). On a non-boolean key it is an
  error asking for a value.
- A `float` key accepts a TOML integer (`max_norm = 1`) but not `inf` or `nan`;
  an `int` key does not accept a float or a boolean.
- Every mistake is a `ConfigError`: rank 0 prints one line,
  `config error: <section.key>: <what is wrong and the fix>`, and the process
  exits with status 2. An unknown section or key close to a real one gets a "did you mean".
- `--dry_run [--world_size N] [--gpu h100|h200] [--gpu_memory_gib G]` (not recipe keys) checks
  the recipe and layout for N ranks (default: `$WORLD_SIZE`, else 1), prints the predicted peak
  memory per rank against the GPU (`--gpu`'s rate table and memory, default h100's 79.2 GiB; G
  GiB instead) and, under pipeline parallel, each rank's predicted compute, the split and the
  schedule's bubble, and exits 0, with no GPU and no process group
  ([docs/performance.md](performance.md#predicting-memory-before-a-run)).

Where the checks run, all before any model weight or GPU memory exists unless
noted:

1. `load_recipe` (`training/recipe.py`), before the process group starts. First
   `config/loader.py`: TOML syntax, unknown sections/keys, types, the choices and
   ranges in the tables below (the pipeline schedule name, `compile.components`, ...),
   that no float is `inf` or `nan`, then each section's rules between its keys
   (`pipeline_parallel_layers_per_stage` vs `pipeline_parallel_stage_split_points`)
   and the rules between sections (`[validation]` vs `[training]`). Then what other
   packages own: the flavor of the chosen model, every `[loss]` option against the
   chosen entry and the vocab-parallel head, that `checkpoint.initial_load_path` is a
   checkpoint or Hugging Face folder.
2. `train()`: before the process group starts, that the packages of the enabled
   metrics backends are installed (`tensorboard`, `wandb`); once it has started,
   that no other run holds `job.dump_folder` (its `run.lock`; README "Reading the
   metrics"), then, before data or model: the degrees against the world size,
   `global_batch_size` divisibility, `seq_len` against the flavor, the pipeline
   split and microbatch rules, that `job.dump_folder` and, with `checkpoint.enable`,
   `checkpoint.folder` can be created and written, the tokenizer, the dataset (path,
   enough tokens for one window, tokenizer ids fit `vocab_size`).
3. When the loss is built (after the model is materialized and initialized): that
   the named entry can compute the loss on the run's device and dtype (e.g. `cce`
   on a CPU, or with `float32` params), with one line naming why and what to use.
4. When the checkpoint is loaded: that it was written for this model, and that its data
   position fits this recipe. Only then does the run write `config.toml` and append to
   `metrics.jsonl`: a run refused by any check leaves them as they were.

Not a `ConfigError`: `training.device = "cuda"` with no visible GPU
(`RuntimeError`). A non-finite loss stops the run with `stopped: ...` and exit
status 1.
"""

HEADER = ("key", "type", "default", "allowed values", "what it does")
_TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "string"}
# What a key of the type takes when nothing narrows it: alone, as a list's items, in a union.
_ANY = {bool: "`true`, `false`", int: "any integer", float: "any finite number", str: "any string"}
_ITEMS = {int: "integers", float: "finite numbers", str: "strings"}
_ONE = {int: "an integer", float: "a finite number", str: "a string"}


def _choices(values) -> str:
    return ", ".join(f"`{toml_value(v)}`" for v in values)


# Allowed values that a registry of another package owns, not the key's type.
OWNED_ELSEWHERE: dict[tuple[str, str], Callable[[], str]] = {
    ("model", "flavor"): lambda: "; ".join(f"{name}: {_choices(flavors)}" for name, flavors in MODEL_FLAVORS.items()),
    ("loss", "name"): lambda: _choices(LOSS_NAMES),
}


def docstrings(source: Path = SOURCE) -> dict[str, tuple[str, dict[str, str]]]:
    """class name -> (its docstring, field name -> the attribute docstring under the field), read with ``ast``."""
    out = {}
    for node in ast.parse(source.read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields, body = {}, node.body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
        out[node.name] = (ast.get_docstring(node) or "", fields)
    return out


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _TYPE_NAMES[type(args[0])]
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is Union:
        return " or ".join(type_name(a) for a in args)
    return _TYPE_NAMES[tp]


def allowed_values(section: str, key: str, tp: Any, rules: tuple) -> str:
    """The "allowed values" cell: another registry's names, else the key's last rule, else its type's values."""
    if (section, key) in OWNED_ELSEWHERE:
        return OWNED_ELSEWHERE[(section, key)]()
    if rules:
        return rules[-1].allowed()
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return _choices(args)
    if origin is list:
        (item,) = args
        if typing.get_origin(item) is Literal:
            return "items " + _choices(typing.get_args(item))
        return "a list of " + _ITEMS[item]
    if origin is Union:
        return " or ".join(_ONE[a] for a in args)
    return _ANY[tp]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def key_table(section: str, cls: type, docs: dict[str, str]) -> list[str]:
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = cls()
    lines = [_row(HEADER), _row(["---"] * len(HEADER))]
    for f in dataclasses.fields(cls):
        if f.name not in docs:
            raise ValueError(
                f"{SOURCE.relative_to(ROOT)}: {cls.__name__}.{f.name} has no docstring; document it under the field"
            )
        tp, rules = hints[f.name], ()
        if typing.get_origin(tp) is typing.Annotated:
            tp, rules = typing.get_args(tp)[0], tp.__metadata__
        cells = [
            f"`{f.name}`",
            type_name(tp),
            f"`{toml_value(getattr(defaults, f.name))}`",
            allowed_values(section, f.name, tp, rules),
            _cell(docs[f.name]),
        ]
        lines.append(_row(cells))
    return lines


def loss_support_matrix(cls: type) -> list[str]:
    """Which entry of ``losses/registry.py`` honours which ``[loss]`` option."""
    options = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    lines = [
        "Which entry honours which option, from the registry (`losses/registry.py`):",
        "",
        _row(["option", *LOSS_NAMES]),
        _row(["---"] * (len(LOSS_NAMES) + 1)),
    ]
    for option in options:
        lines.append(_row([f"`{option}`", *("✓" if option in loss_option_names(e) else "" for e in LOSS_NAMES)]))
    return lines


def loss_entries() -> list[str]:
    """Each registry entry as the first paragraph of its class's docstring says what it computes."""
    lines = ["The entries, each as its own class (`losses/entries/`) describes it:", ""]
    for name, cls in ENTRIES.items():
        summary = " ".join(inspect.getdoc(cls).split("\n\n")[0].split()).replace("``", "`")
        lines.append(f"- `{name}`: {summary}")
    return lines


def render() -> str:
    """docs/config.md as it should be."""
    docs = docstrings()
    parts = [PREAMBLE]
    for section in dataclasses.fields(JobConfig):
        cls = section.default_factory
        prose, fields = docs[cls.__name__]
        block = [f"## [{section.name}]", "", prose, "", *key_table(section.name, cls, fields)]
        if section.name == "loss":
            block += ["", *loss_entries(), "", *loss_support_matrix(cls)]
        parts.append("\n".join(block) + "\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not what would be written")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            print(f"{PAGE.relative_to(ROOT)} is out of date; run: python -m scripts.config_docs", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
