"""Recipes parse into dataclasses; user mistakes become one-line errors naming the key."""

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from config.errors import ConfigError
from config.job_config import JobConfig
from config.loader import dump_config
from training.optimizer import warmup_warning
from training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_recipe(["--config", str(ROOT / "configs" / recipe)])
    assert cfg.training.steps > 0


def test_cli_overrides_in_both_forms():
    cfg = load_recipe(
        [
            "--config",
            str(ROOT / "configs/debug.toml"),
            "--training.steps",
            "7",
            "--optimizer.lr=0.01",
            "--loss.name",
            "chunked",
            "--optimizer.betas",
            "[0.8, 0.9]",
            "--compile.enable",
        ]
    )
    assert cfg.training.steps == 7 and cfg.optimizer.lr == 0.01 and cfg.loss.name == "chunked"
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.compile.enable is True


@pytest.mark.parametrize(
    "argv, key, words",
    [
        (["--training.stpes", "3"], "training.stpes", "did you mean 'steps'"),
        (["--trainig.steps", "3"], "trainig", "did you mean 'training'"),
        (["--training.steps", "three"], "training.steps", "expected an integer"),
        (["--training.steps", "0"], "training.steps", "positive"),
        (["--model.flavor", "70B"], "model.flavor", "choose one of"),
        (["--model.name", "qwen"], "model.name", "did you mean 'qwen3'"),
        (["--model.attn_mask_type", "document"], "model.attn_mask_type", "'block_causal'"),
        (["--parallelism.pipeline_parallel_schedule", "1f1b"], "parallelism.pipeline_parallel_schedule", "1F1B"),
        (
            ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "x"],
            "activation_checkpoint.selective_ac_option",
            "positive integer",
        ),
        (["--loss.name", "chunkd"], "loss.name", "did you mean 'chunked'"),
        (["--optimizer.betas", "[0.9]"], "optimizer.betas", "two numbers"),
        (["steps=3"], "steps=3", "--section.key"),
        (["--job.description"], "job.description", "needs a value"),
        (["--training.device", "tpu"], "training.device", "'auto'"),
        (["--checkpoint.async_mode", "on"], "checkpoint.async_mode", "'async'"),
        (["--checkpoint.export_dtype", "bf16"], "checkpoint.export_dtype", "'bfloat16'"),
        (["--training.seq_len", "1"], "training.seq_len", "no next token to predict"),
        (["--config", "configs/debug_pp.toml"], "--config", "debug.toml, configs/debug_pp.toml); pass one recipe"),
    ],
)
def test_bad_values_name_the_key(argv, key, words):
    with pytest.raises(ConfigError) as err:
        load_recipe(["--config", str(ROOT / "configs/debug.toml"), *argv])
    assert err.value.key == key
    assert words in str(err.value)


@pytest.mark.parametrize("text, expected", [("[7, 14]", [7, 14]), ("7,14", [7, 14]), ("7", [7])])
def test_cli_lists_of_numbers(text, expected):
    cfg = load_recipe(["--parallelism.pipeline_parallel_stage_split_points", text])
    assert cfg.parallelism.pipeline_parallel_stage_split_points == expected


@pytest.mark.parametrize("text", ["[model, loss]", "model,loss", "model, loss", '["model","loss"]'])
def test_cli_lists_of_words(text):
    assert load_recipe(["--compile.components", text]).compile.components == ["model", "loss"]


def test_unknown_key_in_a_recipe_file(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[training]\nsteps = 2\nbatch = 4\n")
    with pytest.raises(ConfigError, match=r"training.batch: unknown key"):
        load_recipe(["--config", str(recipe)])


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="no recipe file"):
        load_recipe(["--config", "configs/nope.toml"])


def test_train_py_prints_one_line_and_exits_nonzero_before_building_anything():
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/debug.toml", "--training.seq_len", "-4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: training.seq_len: must be a positive integer"
    assert "Traceback" not in result.stdout + result.stderr


def test_dumped_config_reads_back_unchanged(tmp_path):
    cfg = load_recipe(
        [
            "--config",
            str(ROOT / "configs/qwen3_1p7b_pp4.toml"),
            "--job.description",
            'a "quoted" run',
            "--parallelism.pipeline_parallel_stage_split_points",
            "7,14,21",
            "--loss.filter_eps",
            "0.5",
        ]
    )
    path = tmp_path / "config.toml"
    path.write_text(dump_config(cfg))
    assert load_recipe(["--config", str(path)]) == cfg


def _float_keys() -> list[str]:
    """Every key whose type admits a float (alone, in a list or in a union), from the dataclasses."""
    keys = []
    for section in dataclasses.fields(JobConfig):
        for name, tp in typing.get_type_hints(section.default_factory).items():
            if float in (tp, *typing.get_args(tp)):
                keys.append(f"{section.name}.{name}")
    return keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("text", ["inf", "-inf", "nan"])
def test_every_float_key_refuses_a_non_finite_number(key, text):
    value = f"[0.9, {text}]" if key == "optimizer.betas" else text
    with pytest.raises(ConfigError) as err:
        load_recipe([f"--{key}", value])
    assert err.value.key == key
    assert ("must hold finite numbers" if key == "optimizer.betas" else "must be a finite number") in str(err.value)


def test_the_float_keys_include_the_ones_reported():
    assert {"optimizer.lr", "optimizer.weight_decay", "optimizer.betas", "loss.filter_eps"} <= set(_float_keys())


def test_a_run_ending_inside_its_warmup_is_obeyed_and_said_in_one_line():
    cfg = load_recipe(["--training.steps", "5", "--lr_scheduler.warmup_steps", "6"])
    warning = warmup_warning(cfg.training.steps, cfg.lr_scheduler)
    assert warning.startswith("lr_scheduler.warmup_steps 6 >= training.steps 5: the run ends inside its warmup")
    assert f"at lr x {5 / 7:.2f}" in warning  # the last step's factor, (4 + 1) / (6 + 1)
    assert warmup_warning(6, cfg.lr_scheduler) is not None and warmup_warning(7, cfg.lr_scheduler) is None


def test_an_empty_dump_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^config error: job.dump_folder: is empty; set it to") as err:
        load_recipe(["--job.dump_folder", ""])
    recipe = tmp_path / "empty.toml"
    recipe.write_text('[job]\ndump_folder = ""\n')
    with pytest.raises(ConfigError, match="job.dump_folder: is empty"):
        load_recipe(["--config", str(recipe)])
    assert "\n" not in str(err.value)


_ABOVE_CONFIG = {"data", "models", "parallelisms", "losses", "planning", "training", "scripts", "benchmarks", "train"}


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "config").glob("*.py")))
def test_config_imports_no_other_project_package(module):
    tree = ast.parse((ROOT / "config" / module).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name.split(".")[0] for name in imported} & _ABOVE_CONFIG, f"config/{module} imports {imported}"
