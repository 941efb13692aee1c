"""Checkpoints: exact resume, loading into another layout, and refusing bad checkpoints."""

import shutil

import pytest

from tests.dist_utils import run_distributed
from train import train
from training.config_loader import load_config

pytestmark = pytest.mark.multiprocess


def _argv(folder, steps, *extra):
    # Constant LR after an 8-step warm-up: the schedule does not depend on training.steps, so a
    # 5-step run is the first half of a 10-step one (and the restored warm-up position matters).
    return ["--config", "configs/debug.toml", "--model.vocab_size", "515", "--training.seq_len", "32",
            "--training.global_batch_size", "8", "--training.local_batch_size", "2", "--training.steps", str(steps),
            "--lr_scheduler.decay_type", "constant", "--lr_scheduler.warmup_steps", "8",
            "--job.dump_folder", str(folder), "--checkpoint.enable", "--checkpoint.interval", "5", *extra]


def _losses(rank, world_size, argv):
    return train(load_config(argv)).losses


def _run(world_size, argv):
    return run_distributed(_losses, world_size, argv, timeout_s=300)[0]


LAYOUTS = {
    "single": (1, []),
    "dp_shard2": (2, []),
    "pp2_dp_shard2": (4, ["--parallelism.pipeline_parallel_degree", "2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bitwise_identical(layout, tmp_path):
    world, extra = LAYOUTS[layout]
    straight = _run(world, _argv(tmp_path / "straight", 10, *extra))
    first = _run(world, _argv(tmp_path / "resumed", 5, *extra))
    second = _run(world, _argv(tmp_path / "resumed", 10, *extra))
    assert first + second == straight


def _continue_elsewhere(tmp_path, source, expected, targets):
    for name, world, extra in targets:
        target = tmp_path / name
        shutil.copytree(source / "checkpoint" / "step-5", target / "checkpoint" / "step-5")
        (next_loss,) = _run(world, _argv(target, 6, *extra))
        assert next_loss == pytest.approx(expected, rel=1e-6), name


VP = ["--parallelism.vocab_parallel", "--loss.name", "auto"]


def test_pipeline_checkpoint_loads_into_other_layouts(tmp_path):
    """Saved by pp=2 x dp_shard=2 (vocab-parallel head); continued by 1 process and by dp_shard=4."""
    source = tmp_path / "source"
    pp = ["--parallelism.pipeline_parallel_degree", "2"]
    _run(4, _argv(source, 5, *pp, *VP))
    (expected,) = _run(4, _argv(source, 6, *pp, *VP))
    _continue_elsewhere(tmp_path, source, expected, [("single", 1, []), ("dp_shard4", 4, []),
                                                     ("dp_shard4_vp", 4, VP)])


def test_vocab_parallel_checkpoint_over_4_ranks_loads_into_2_and_into_no_vocab_parallel(tmp_path):
    source = tmp_path / "source"
    _run(4, _argv(source, 5, *VP))
    (expected,) = _run(4, _argv(source, 6, *VP))
    _continue_elsewhere(tmp_path, source, expected, [("dp_shard2_vp", 2, VP), ("single", 1, [])])


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    _run(1, _argv(tmp_path, 5))
    with pytest.raises(Exception, match=r"vocab_size: checkpoint '515' vs recipe '600'"):
        _run(1, _argv(tmp_path, 6, "--model.vocab_size", "600"))
    with pytest.raises(Exception, match=r"data position does not fit this recipe"):
        _run(1, _argv(tmp_path, 6, "--training.global_batch_size", "4"))
    with pytest.raises(Exception, match=r"no complete checkpoint step-3 in .*complete ones: \[5\]"):
        _run(1, _argv(tmp_path, 6, "--checkpoint.load_step", "3"))
    for data_file in (tmp_path / "checkpoint" / "step-5").glob("*.distcp"):
        data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    with pytest.raises(Exception, match="step-5 (cannot be read|does not match)"):
        _run(1, _argv(tmp_path, 6))
