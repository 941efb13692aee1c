"""docs/config.md is what ``python -m scripts.config_docs`` writes, and that documents every recipe key.

The page is generated from config/job_config.py (types, defaults, rules, attribute docstrings) and
the registries; the first tests hold the file to the generator. The others read the page back:
its ``## [section]`` headings and the key tables under them (tables whose header starts with
``| key |``, so the same key name in two sections is checked per section), each documented default
against the dataclass, every choice the loader accepts, and the [loss] support matrix against the
registry. No model, process group or device is touched.
"""

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import tomli

from config.job_config import JobConfig, PipelineSchedule
from losses.options import OPTIONS
from losses.registry import LOSS_NAMES, loss_option_names
from models.flavors import MODEL_FLAVORS
from parallelisms.pipeline import PIPELINE_SCHEDULES
from scripts import config_docs

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"

_SECTION = re.compile(r"^## \[(\w+)\]\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a "\|" inside a cell is a literal pipe
_CODE = re.compile(r"^`([^`]+)`$")


def test_the_page_is_what_the_generator_writes():
    assert DOC.read_text() == config_docs.render(), "docs/config.md is out of date: python -m scripts.config_docs"


def test_check_mode_exits_1_on_drift_and_writes_nothing(tmp_path, monkeypatch, capsys):
    assert config_docs.main(["--check"]) == 0
    stale = tmp_path / "config.md"
    stale.write_text(DOC.read_text().replace("Peak learning rate", "Learning rate"))
    monkeypatch.setattr(config_docs, "PAGE", stale)
    monkeypatch.setattr(config_docs, "ROOT", tmp_path)
    assert config_docs.main(["--check"]) == 1
    assert "config.md is out of date; run: python -m scripts.config_docs" in capsys.readouterr().err
    assert "Learning rate" in stale.read_text()


def test_a_key_without_a_docstring_is_named():
    _, fields = config_docs.docstrings()["Optimizer"]
    with pytest.raises(ValueError, match=r"Optimizer\.eps has no docstring; document it under the field"):
        config_docs.key_table("optimizer", type(JobConfig().optimizer), {k: v for k, v in fields.items() if k != "eps"})


def test_every_key_has_a_docstring():
    docs = config_docs.docstrings()
    for section in dataclasses.fields(JobConfig):
        prose, fields = docs[section.default_factory.__name__]
        assert prose, f"[{section.name}] has no class docstring"
        missing = [f.name for f in dataclasses.fields(section.default_factory) if not fields.get(f.name)]
        assert not missing, f"[{section.name}]: no docstring under {missing}"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]]


def _tables(text: str) -> list[tuple[str | None, list[str], list[list[str]]]]:
    """(section or None, header cells, body rows) for every table in the doc."""
    tables, section, lines = [], None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            m = _SECTION.match(line)
            section = m.group(1) if m else None
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|\s*-", lines[i + 1]):
            header, rows = _cells(line), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((section, header, rows))
            continue
        i += 1
    return tables


def _documented() -> dict[tuple[str, str], list[str]]:
    """(section, key) -> the row's cells, from every key table under a ``## [section]``."""
    rows: dict[tuple[str, str], list[str]] = {}
    for section, header, body in _tables(DOC.read_text()):
        if section is None or header[0] != "key":
            continue
        assert header == ["key", "type", "default", "allowed values", "what it does"], (section, header)
        for cells in body:
            m = _CODE.match(cells[0])
            assert m, f"[{section}]: key cell {cells[0]!r} is not a `code` span"
            key = (section, m.group(1))
            assert key not in rows, f"{section}.{key[1]} is documented twice"
            assert len(cells) == 5 and all(cells), f"{section}.{key[1]}: row needs five non-empty cells"
            rows[key] = cells
    return rows


DOCUMENTED = _documented()


def _fields() -> dict[tuple[str, str], dataclasses.Field]:
    out = {}
    for section in dataclasses.fields(JobConfig):
        for f in dataclasses.fields(section.default_factory()):
            out[(section.name, f.name)] = f
    return out


FIELDS = _fields()
_ids = [f"{s}.{k}" for s, k in FIELDS]


@pytest.mark.parametrize("key", list(FIELDS), ids=_ids)
def test_every_key_is_documented_in_its_section(key):
    assert key in DOCUMENTED, f"docs/config.md: no row | `{key[1]}` | under ## [{key[0]}]"


def test_no_stale_keys():
    stale = sorted(f"{s}.{k}" for s, k in DOCUMENTED if (s, k) not in FIELDS)
    assert not stale, f"docs/config.md documents keys the config does not have: {stale}"


def test_every_section_has_a_heading():
    sections = {f.name for f in dataclasses.fields(JobConfig)}
    headings = {m.group(1) for line in DOC.read_text().splitlines() if (m := _SECTION.match(line))}
    assert headings == sections


@pytest.mark.parametrize("key", list(FIELDS), ids=_ids)
def test_documented_default_matches(key):
    default = getattr(getattr(JobConfig(), key[0]), key[1])
    m = _CODE.match(DOCUMENTED[key][2]) if key in DOCUMENTED else None
    assert m, f"{key[0]}.{key[1]}: default cell must be one `TOML value`"
    assert tomli.loads(f"v = {m.group(1)}")["v"] == default


def test_every_loss_option_is_documented():
    for option in OPTIONS:
        assert ("loss", option) in DOCUMENTED, f"loss option {option!r} is not documented under ## [loss]"


def _allowed(section: str, key: str) -> str:
    return DOCUMENTED[(section, key)][3]


def _choices(tp) -> tuple:
    """The values of a ``Literal`` field (or of a list of them); () for other types."""
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else ()


_TYPES = {key: typing.get_type_hints(type(getattr(JobConfig(), key[0])))[key[1]] for key in FIELDS}
CHOICES = {key: _choices(tp) for key, tp in _TYPES.items() if _choices(tp)}


@pytest.mark.parametrize("key", list(CHOICES), ids=[f"{s}.{k}" for s, k in CHOICES])
def test_every_choice_is_listed(key):
    for value in CHOICES[key]:
        assert f'`"{value}"`' in _allowed(*key), f"{key}: choice {value!r} not in the allowed-values cell"


def test_the_types_choices_are_the_registries_names():
    assert sorted(typing.get_args(PipelineSchedule)) == sorted(PIPELINE_SCHEDULES)


def test_loss_names_flavors_and_schedules_are_listed():
    for name in LOSS_NAMES:
        assert f'`"{name}"`' in _allowed("loss", "name")
    for flavors in MODEL_FLAVORS.values():
        for flavor in flavors:
            assert f'`"{flavor}"`' in _allowed("model", "flavor")
    for schedule in PIPELINE_SCHEDULES:
        assert f'`"{schedule}"`' in _allowed("parallelism", "pipeline_parallel_schedule")


def test_loss_support_matrix_matches_registry():
    matrices = [(h, b) for s, h, b in _tables(DOC.read_text()) if s == "loss" and h[0] == "option"]
    assert len(matrices) == 1, "expected one | option | ... | support matrix under ## [loss]"
    header, body = matrices[0]
    assert sorted(header[1:]) == sorted(LOSS_NAMES)
    rows = {_CODE.match(cells[0]).group(1): cells[1:] for cells in body}
    assert sorted(rows) == sorted(OPTIONS)
    for option, marks in rows.items():
        documented = {entry for entry, mark in zip(header[1:], marks) if mark == "✓"}
        actual = {entry for entry in LOSS_NAMES if option in loss_option_names(entry)}
        assert documented == actual, (
            f"support matrix row {option!r}: doc {sorted(documented)}, registry {sorted(actual)}"
        )
