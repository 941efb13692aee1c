"""End to end on one CPU process: the quick-start command, loss entries agreeing, user errors."""

import json
import os
import re
import sys

import pytest
import torch

from config.errors import ConfigError
from config.job_config import Parallelism
from parallelisms.parallel_dims import ParallelDims
from tests.dist_utils import Launched, run_distributed
from train import train
from training.metrics.records import read_metrics
from training.recipe import load_recipe
from training.step import UpdatesToSkip


def _train_py(folder, *overrides) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/debug.toml", "--job.dump_folder", str(folder), *overrides]


def _out_of_memory_at_the_first_forward(folder) -> list[str]:
    script = (
        "import sys, torch\n"
        "from models.transformer import Transformer\n"
        "def oom(self, x):\n    raise torch.cuda.OutOfMemoryError('CUDA out of memory')\n"
        "Transformer.forward = oom\n"
        "import train\n"
        f"sys.exit(train.main(['--config', 'configs/debug.toml', '--job.dump_folder', r'{folder}']))\n"
    )
    return [sys.executable, "-c", script]


NON_FINITE = ["--optimizer.lr", "1e30", "--training.max_norm", "0"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """{name: (its launch, its dump folder)}: every command of this module, as a user starts it, all started
    together when the first test asks. Each spends ~5 s importing on one core; the others, and the in-process
    comparisons below, use the other core meanwhile."""
    root = tmp_path_factory.mktemp("launched")
    commands = {
        "run_train_sh": ["./run_train.sh", "--training.steps", "12", "--job.dump_folder", str(root / "run_train_sh")]
        + ["--metrics.enable_tensorboard"],
        "non_finite": _train_py(root / "non_finite", "--training.steps", "5", *NON_FINITE),
        "non_finite_skip": _train_py(root / "non_finite_skip", "--training.steps", "8", *NON_FINITE)
        + ["--training.nonfinite_policy", "skip", "--training.nonfinite_max_skips", "2"],
        "out_of_memory": _out_of_memory_at_the_first_forward(root / "out_of_memory"),
        "world_size": _train_py(root / "world_size", "--parallelism.pipeline_parallel_degree", "2"),
    }
    env = {**os.environ, "NGPU": "1"}  # run_train.sh's process count; train.py does not read it
    launches = {name: (Launched(command, root / name, env=env), root / name) for name, command in commands.items()}
    yield launches
    for launch, _ in launches.values():
        launch.stop()


def test_run_train_sh_trains_the_default_recipe_and_the_loss_falls(launched):
    launch, folder = launched["run_train_sh"]
    result = launch.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_second", "mfu_percent", "peak_memory_gib"}
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "step 12/12" in result.stdout
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert (folder / "config.toml").is_file() and (folder / "memory.json").is_file()


def _losses_of_each(rank, world_size, root, runs):
    """Each run of ``runs`` ({name: overrides of configs/debug.toml}) trained in turn in this process: its losses."""
    return {
        name: train(
            load_recipe(["--config", "configs/debug.toml", "--job.dump_folder", str(root / name), *overrides])
        ).losses
        for name, overrides in runs.items()
    }


def test_loss_entries_train_identically(tmp_path):
    """Same seed, fp32 CPU: the first 5 step losses of every CPU entry agree within 1e-4 relative."""
    names = ("cross_entropy", "chunked", "cce_torch_compile")
    runs = {name: ["--training.steps", "5", "--loss.name", name] for name in names}
    (losses,) = run_distributed(_losses_of_each, 1, tmp_path, runs, timeout_s=300)
    reference = losses.pop("cross_entropy")
    assert len(reference) == 5, reference
    for name, got in losses.items():
        assert len(got) == len(reference), (name, got, reference)
        for g, want in zip(got, reference):
            assert abs(g - want) <= 1e-4 * abs(want), (name, got, reference)


def test_activation_checkpointing_and_compile_do_not_change_the_numbers(tmp_path):
    """Every wrapping against the plain run, all in one process (start-up would be most of each run's time)."""
    variants = {
        "full_ac": (["--activation_checkpoint.mode", "full"], 1e-6),
        "selective_op": (
            ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
            1e-6,
        ),
        "every_2nd": (
            ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"],
            1e-6,
        ),
        "compiled": (["--compile.enable", "--activation_checkpoint.mode", "full"], 1e-4),
    }
    runs = {"base": [], **{label: overrides for label, (overrides, _) in variants.items()}}
    (losses,) = run_distributed(
        _losses_of_each, 1, tmp_path, {name: ["--training.steps", "3", *o] for name, o in runs.items()}, timeout_s=300
    )
    reference = losses["base"]
    assert len(reference) == 3, reference
    for label, (_, rtol) in variants.items():
        got = losses[label]
        assert len(got) == len(reference), (label, got, reference)
        for g, want in zip(got, reference):
            assert abs(g - want) <= rtol * abs(want), (label, g, want)


def test_non_finite_loss_stops_with_the_step_and_what_to_try(launched):
    result = launched["non_finite"][0].result()
    assert result.returncode == 1
    assert "at step" in result.stderr and "optimizer.lr" in result.stderr
    assert "Traceback" not in result.stderr


def test_nonfinite_skip_mode_counts_then_stops(launched):
    launch, folder = launched["non_finite_skip"]
    result = launch.result()
    assert result.returncode == 1
    assert len(re.findall(r"update skipped \([12]/2\)", result.stdout)) == 2
    assert "after 2 skipped steps" in result.stderr
    # metrics.jsonl stays strict JSON: the skipped steps' non-finite figures are null, and their
    # console lines say which and why
    rows = [json.loads(line, parse_constant=_no_nan) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows[1:] if r["grad_norm"] is None]  # after the run's start record
    assert len(skipped) == 2 and all(r["lr"] is not None for r in skipped)
    assert len(re.findall(r"\(non-finite [a-z_, ]*grad_norm[a-z_, ]*: update skipped", result.stdout)) == 2


@pytest.mark.parametrize(
    "policy, max_skips, nonfinite, skipped",
    [
        ("stop", 10, [0, 1, 0, 0], [0, 1, 1, 1]),
        ("skip", 1, [0, 1, 0, 1, 0, 0], [0, 1, 0, 1, 1, 1]),
        ("skip", 0, [1, 0], [1, 1]),
    ],
)
def test_no_update_after_the_step_that_ends_the_run(policy, max_skips, nonfinite, skipped):
    """The host reads a step's loss after queuing the next, so the policy also runs on the device: a step that
    ends the run (any non-finite one under "stop", the one past the allowed skips under "skip") skips its
    update and every later one, and the run raises when the host reads it, its model as before that step."""
    rule = UpdatesToSkip(policy, max_skips)
    assert [rule(torch.tensor(float(x))).item() for x in nonfinite] == skipped


def _no_nan(constant: str):
    raise AssertionError(f"metrics.jsonl holds a bare {constant}")


def test_out_of_memory_names_the_knobs_that_reduce_memory(launched):
    result = launched["out_of_memory"][0].result()
    assert result.returncode == 1
    for knob in ("local_batch_size", "activation_checkpoint.mode", "loss.name = 'cce'", "vocab_parallel"):
        assert knob in result.stderr
    assert "Traceback" not in result.stderr


def test_a_world_size_that_does_not_factor_fails_before_training(launched):
    launch, folder = launched["world_size"]
    result = launch.result()
    assert result.returncode == 2
    assert result.stderr.strip().startswith("config error: parallelism.pipeline_parallel_degree:")
    assert "does not divide the world size 1" in result.stderr
    assert not (folder / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "degrees, world, message",
    [
        (dict(pipeline_parallel_degree=2, data_parallel_shard_degree=3), 8, "= 6 ranks, but the world size is 8"),
        (dict(pipeline_parallel_degree=3), 8, "does not divide the world size 8"),
    ],
)
def test_parallel_dims_validation(degrees, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims.from_config(Parallelism(**degrees), world)


def test_parallel_dims_fill_the_shard_degree():
    dims = ParallelDims.from_config(Parallelism(pipeline_parallel_degree=4, data_parallel_replicate_degree=1), 8)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.dp) == (4, 1, 2, 2)


def test_vocab_parallel_without_ranks_to_shard_over_says_so(caplog):
    with caplog.at_level("WARNING", logger="train"):
        dims = ParallelDims.from_config(Parallelism(vocab_parallel=True), 1)
    assert dims.dp_shard == 1
    assert "parallelism.vocab_parallel: data_parallel_shard_degree is 1" in caplog.text
