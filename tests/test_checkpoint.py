"""Checkpoints: exact resume, loading into another layout, and refusing bad checkpoints."""

import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from config.errors import CheckpointError, ConfigError
from data import ByteTokenizer
from data.token_stream import load_token_stream
from tests.dist_utils import run_distributed
from tests.weights import loaded_parameters, refusal, whole_parameters
from train import train
from training.checkpoint import CheckpointManager
from training.checksums import damaged_files
from training.recipe import load_recipe

pytestmark = pytest.mark.multiprocess


def _argv(folder, steps, *extra):
    # Constant LR after an 8-step warm-up: the schedule does not depend on training.steps, so a
    # 5-step run is the first half of a 10-step one (and the restored warm-up position matters).
    return [
        "--config",
        "configs/debug.toml",
        "--model.vocab_size",
        "515",
        "--training.seq_len",
        "32",
        "--training.global_batch_size",
        "8",
        "--training.local_batch_size",
        "2",
        "--training.steps",
        str(steps),
        "--lr_scheduler.decay_type",
        "constant",
        "--lr_scheduler.warmup_steps",
        "8",
        "--job.dump_folder",
        str(folder),
        "--checkpoint.enable",
        "--checkpoint.interval",
        "5",
        *extra,
    ]


def _losses(rank, world_size, argv):
    return train(load_recipe(argv)).losses


def _run(world_size, argv):
    return run_distributed(_losses, world_size, argv, timeout_s=300)[0]


ASYNC = ["--checkpoint.async_mode", "async"]

LAYOUTS = {
    "single": (1, []),
    "dp_shard2": (2, []),
    "pp2_dp_shard2": (4, ["--parallelism.pipeline_parallel_degree", "2"]),
}


def _validate_every(freq):
    return [
        "--validation.enable",
        "--validation.dataset_path",
        "data/corpus",
        "--validation.steps",
        "2",
        "--validation.freq",
        str(freq),
    ]


def _losses_and_validation_of_each(rank, world_size, argvs):
    """Each recipe trained in turn in this launch: its losses and {step: validation loss}."""
    results = [train(load_recipe(argv)) for argv in argvs]
    return [
        (result.losses, {step: figures["validation_loss"] for step, figures in result.validation.items()})
        for result in results
    ]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bitwise_identical(layout, tmp_path):
    """With validation on, at other steps in the two runs (every 2 steps; every 3 and at the end of each part):
    the training losses stay bitwise equal, and at the steps both validate (the same weights) so do the
    validation losses. One launch trains the first part, then the straight run, then resumes the first part's
    checkpoint: what the process holds at the resume is the end of a 10-step run, not the saved step's."""
    world, extra = LAYOUTS[layout]

    def argv(folder, steps, freq):
        return _argv(tmp_path / folder, steps, *extra, *_validate_every(freq))

    runs = [argv("resumed", 5, 3), argv("straight", 10, 2), argv("resumed", 10, 3)]
    runs = run_distributed(_losses_and_validation_of_each, world, runs, timeout_s=300)[0]
    (first, first_validation), (straight, straight_validation), (second, second_validation) = runs
    assert first + second == straight
    assert list(straight_validation) == [2, 4, 6, 8, 10]
    assert list(first_validation) == [3, 5] and list(second_validation) == [6, 9, 10]
    assert [second_validation[s] for s in (6, 10)] == [straight_validation[s] for s in (6, 10)]


def _train_each(rank, world_size, runs):
    """Each (argv, copy) of ``runs`` trained in turn in this launch, ``copy`` (a checkpoint and where to, or
    None) copied by rank 0 first: their losses."""
    losses = []
    for argv, copy in runs:
        if copy is not None:
            if rank == 0:
                shutil.copytree(*copy)
            dist.barrier()
        losses.append(train(load_recipe(argv)).losses)
    return losses


def _saved_then_continued_elsewhere(tmp_path, world, extra, targets):
    """A source run of ``world`` ranks saves step 5 and resumes it to step 6; each (name, world, extra) of
    ``targets`` continues a copy of its step-5 checkpoint to step 6 and must give the same step-6 loss.
    The targets of the source's world size continue in its launch, after it."""
    source = tmp_path / "source"
    launches = {world: [(_argv(source, 5, *extra), None), (_argv(source, 6, *extra), None)]}
    names = {world: ["source", "source resumed"]}
    for name, target_world, target_extra in targets:
        copy = (source / "checkpoint" / "step-5", tmp_path / name / "checkpoint" / "step-5")
        launches.setdefault(target_world, []).append((_argv(tmp_path / name, 6, *target_extra), copy))
        names.setdefault(target_world, []).append(name)
    losses = {}
    for launch_world, runs in launches.items():  # the source's first
        losses.update(zip(names[launch_world], run_distributed(_train_each, launch_world, runs, timeout_s=300)[0]))
    (expected,) = losses["source resumed"]
    for name, _, _ in targets:
        (next_loss,) = losses[name]
        assert next_loss == pytest.approx(expected, rel=1e-6), name


VP = ["--parallelism.vocab_parallel", "--loss.name", "auto"]


def _split(point: int) -> list[str]:
    return [
        "--parallelism.pipeline_parallel_degree",
        "2",
        "--parallelism.pipeline_parallel_stage_split_points",
        f"[{point}]",
    ]


def test_pipeline_checkpoint_loads_into_other_layouts_and_splits(tmp_path):
    """Saved by pp=2 x dp_shard=2 with 1/3 layers per stage and the vocab-parallel head; continued by one
    process, by dp_shard=4 with the vocab-parallel head, and by pp=2 with the other split (3/1)."""
    _saved_then_continued_elsewhere(
        tmp_path, 4, [*_split(1), *VP], [("single", 1, []), ("dp_shard4_vp", 4, VP), ("pp2_split_3", 2, _split(3))]
    )


def test_vocab_parallel_checkpoint_over_4_ranks_loads_into_2_and_into_no_vocab_parallel(tmp_path):
    _saved_then_continued_elsewhere(tmp_path, 4, VP, [("dp_shard2_vp", 2, VP), ("single", 1, [])])


def _overwrite_4kb(file: Path) -> None:
    with file.open("r+b") as f:
        f.seek(file.stat().st_size // 2)
        f.write(random.Random(0).randbytes(4096))


def _blocked_save(rank, world_size, root, *extra):
    """Save steps 2 and 4, step-4's folder taken by a file (a folder that cannot take the save): the error
    on each rank, what the checkpoint folder holds after, and whether step-2 still checks out."""
    folder = root / "checkpoint"
    if rank == 0:
        folder.mkdir(parents=True)
        (folder / "step-4.partial").write_text("in the way")
    dist.barrier()
    error = refusal(_argv(root, 4, "--checkpoint.interval", "2", *extra))
    return error, sorted(p.name for p in folder.iterdir()), damaged_files(folder / "step-2", set())


@pytest.mark.parametrize("world, extra", [(1, []), (2, ASYNC)], ids=["sync_1_rank", "async_2_ranks"])
def test_a_save_the_folder_refuses_stops_every_rank_with_one_line(tmp_path, world, extra):
    ranks = run_distributed(_blocked_save, world, tmp_path, *extra, timeout_s=300)
    (error,) = {error for error, _, _ in ranks}
    folder = tmp_path / "checkpoint"
    assert re.fullmatch(
        rf"cannot save step-4 in {folder} \(\[Errno 17\] File exists: '{folder}/step-4\.partial'\); "
        r"make it writable \(or free space\) and rerun, which resumes the newest complete checkpoint",
        error,
    ), error
    assert ranks[0][1:] == (["step-2", "step-4.partial"], [])  # the saved step-2 is whole


def _bad_resumes(rank, world_size, root):
    """The error of each resume that must be refused (step-5, then step-4 damaged in between), and what is left."""
    folder = root / "checkpoint"
    train(load_recipe(_argv(root, 5, "--checkpoint.interval", "2")))
    errors = [
        refusal(_argv(root, 6, *extra))
        for extra in (
            ["--training.global_batch_size", "4"],
            ["--checkpoint.load_step", "3"],
            ["--checkpoint.load_step", "4", "--training.steps", "4"],  # nothing to train, nothing moved
        )
    ]
    for data_file in (folder / "step-5").glob("*.distcp"):
        data_file.write_bytes(data_file.read_bytes()[:100])  # truncated
    errors.append(refusal(_argv(root, 6)))
    _overwrite_4kb(folder / "step-4" / "__0_0.distcp")  # the same size, every item where .metadata says
    errors.append(refusal(_argv(root, 6, "--checkpoint.load_step", "4")))
    return errors, sorted(p.name for p in folder.iterdir())


def test_bad_checkpoints_are_refused_with_the_reason(tmp_path):
    ((errors, left),) = run_distributed(_bad_resumes, 1, tmp_path, timeout_s=300)
    # Another model's resume runs in a process of its own: that failure leaves gloo worker threads behind.
    with pytest.raises(Exception, match=r"vocab_size: checkpoint '515' vs recipe '600'"):
        _run(1, _argv(tmp_path, 6, "--model.vocab_size", "600", "--checkpoint.load_step", "2"))
    expected = [
        r"step-5 saved its data position for other data \(global_batch_size: saved 8, now 4\); .*"
        r"--checkpoint\.restart_data_order",
        r"no complete checkpoint step-3 in .*complete ones: \[2, 4, 5\]",
        r"checkpoint\.load_step: step 4 is not before training\.steps 4: nothing would be trained",
        r"step-5 is corrupt \(__0_0\.distcp: truncated \(100 of \d+ bytes\)\); "
        r"resume another complete one with --checkpoint\.load_step N \(N: 2, 4\), delete it",
        r"step-4 is corrupt \(__0_0\.distcp: damaged \(crc32 [0-9a-f]{8}, saved as [0-9a-f]{8}\)\); "
        r"resume another complete one with --checkpoint\.load_step N \(N: 2, 5\), delete it",
    ]
    for error, pattern in zip(errors, expected, strict=True):
        assert re.search(pattern, error) and "\n" not in error, error
    assert left == ["step-2", "step-4", "step-5"]  # refused, not touched


def _refused_folder(rank, world_size, argv):
    try:
        train(load_recipe(argv))
    except ConfigError as err:
        return str(err)
    return "not refused"


def test_a_folder_that_cannot_be_written_stops_the_run_before_anything_is_built(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder's parent should be")
    checkpoint = _argv(tmp_path, 5, "--checkpoint.folder", "taken/checkpoint")
    dump = _argv(tmp_path, 5) + ["--job.dump_folder", str(tmp_path / "taken" / "run")]
    for argv, key in ((checkpoint, "checkpoint.folder"), (dump, "job.dump_folder")):
        (error,) = set(run_distributed(_refused_folder, 2, argv, timeout_s=300))  # every rank, the same line
        assert re.fullmatch(
            rf"config error: {key}: cannot write to \S*taken/\S+ \(.*Not a directory.*\); "
            rf"point {key} at a writable place",
            error,
        ), error
    assert not (tmp_path / "metrics.jsonl").exists()


def _sync_and_async(rank, world_size, root):
    sync = train(load_recipe(_argv(root / "sync", 10))).losses
    in_background = train(load_recipe(_argv(root / "async", 10, *ASYNC))).losses
    resumed = train(load_recipe(_argv(root / "async", 10, *ASYNC, "--checkpoint.load_step", "5"))).losses
    if rank == 1:  # rank 1's file of the sync step-10, 4 KB overwritten in place: rank 1 checks it, both refuse
        _overwrite_4kb(root / "sync" / "checkpoint" / "step-10" / "__1_0.distcp")
    dist.barrier()
    return sync, in_background, resumed, refusal(_argv(root / "sync", 11))


def test_async_saves_resume_like_sync_ones(tmp_path):
    """The step-5 save is written while steps 6-10 run; resuming it continues bitwise, as a sync save does.
    A damaged file is named by every rank, whichever rank checked it."""
    ranks = run_distributed(_sync_and_async, 2, tmp_path, timeout_s=300)
    sync, in_background, resumed, _ = ranks[0]
    assert in_background == sync and resumed == sync[5:]
    (damaged,) = {refused for *_, refused in ranks}
    assert re.search(r"step-10 is corrupt \(__1_0\.distcp: damaged \(crc32 .*load_step N \(N: 5\)", damaged), damaged
    folder = tmp_path / "async" / "checkpoint"
    (aside,) = folder.glob("abandoned-from-step-5-*")  # the first step-10, set aside by the rollback to step-5
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-10", "step-5"]
    assert [p.name for p in aside.iterdir()] == ["step-10"]


def _roll_back(rank, world_size, root):
    """Save steps 2, 4, 6, 8; rerun from step-2 to step 5 saving every step and keeping 2; rerun to step 6."""
    warnings = []  # what rank 0 logs at warning level
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("train").addHandler(handler)
    folder, every_step = root / "checkpoint", ["--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2"]
    first = train(load_recipe(_argv(root, 8, "--checkpoint.interval", "2"))).losses
    rolled_back = train(load_recipe(_argv(root, 5, *every_step, "--checkpoint.load_step", "2"))).losses
    (aside,) = folder.glob("abandoned-from-step-2-*")
    left = sorted(p.name for p in folder.iterdir() if p != aside), sorted(p.name for p in aside.iterdir())
    rerun = train(load_recipe(_argv(root, 6, *every_step))).losses
    return first, rolled_back, left, rerun, str(aside), warnings


def test_a_rollback_sets_the_abandoned_branch_aside(tmp_path):
    """Resuming an older step moves the newer checkpoints aside before the first save, so pruning keeps this
    branch's saves and the next rerun continues it."""
    ((first, rolled_back, (left, set_aside), rerun, aside, warnings),) = run_distributed(
        _roll_back, 1, tmp_path, timeout_s=300
    )
    assert rolled_back == first[2:5]  # resumed from step-2
    assert left == ["step-4", "step-5"] and set_aside == ["step-4", "step-6", "step-8"]
    assert rerun == first[5:6]  # resumed the new step-5, not the abandoned step-8
    assert any(aside in line for line in warnings), warnings


MODEL_ONLY = [
    "--checkpoint.interval",
    "3",
    "--checkpoint.last_save_model_only",
    "--checkpoint.export_dtype",
    "bfloat16",
]


def _model_only_and_initial_loads(rank, world_size, root):
    out = {"resume_error": "no CheckpointError"}
    first = train(load_recipe(_argv(root / "a", 5, *MODEL_ONLY)))  # step-3 complete, step-5 weights only
    out["losses"], out["trained"] = first.losses, whole_parameters(first.model_parts)
    try:
        train(load_recipe(_argv(root / "a", 6, *MODEL_ONLY)))
    except CheckpointError as err:
        out["resume_error"] = str(err)
    (out["initial"],) = loaded_parameters(
        [
            _argv(
                root / "b",
                1,
                "--lr_scheduler.warmup_steps",
                "1",
                "--checkpoint.initial_load_path",
                str(root / "a" / "checkpoint" / "step-5"),
            )
        ]
    )
    complete = [
        "--checkpoint.initial_load_path",
        str(root / "a" / "checkpoint" / "step-3"),
        "--checkpoint.initial_load_model_only",
        "false",
    ]
    out["continued"] = train(load_recipe(_argv(root / "c", 5, *complete))).losses
    out["rerun"] = train(load_recipe(_argv(root / "c", 6, *complete))).losses  # its own step-5 wins
    return out


def test_model_only_last_save_and_initial_loads(tmp_path):
    """A bfloat16 weights-only final save refuses to resume but starts another run; a complete checkpoint
    as initial_load_path with initial_load_model_only = false continues as a resume, until the run has its own."""
    (out,) = run_distributed(_model_only_and_initial_loads, 1, tmp_path, timeout_s=300)
    assert "holds only model weights" in out["resume_error"] and "initial_load_path" in out["resume_error"]
    bf16 = {name: t.to(torch.bfloat16).float() for name, t in out["trained"].items()}
    assert sorted(out["initial"]) == sorted(bf16)
    assert all(torch.equal(out["initial"][name], bf16[name]) for name in bf16)
    assert out["continued"] == out["losses"][3:]  # a complete checkpoint with model_only false: a resume
    assert len(out["rerun"]) == 1


def _log_lines() -> list[str]:
    """What the run logs from now on, info lines included."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return lines


def _logged_lrs(folder: Path) -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [record["lr"] for record in records if "lr" in record]


# Every optimizer and LR schedule key changed from _argv's (debug.toml's, and constant after an 8-step warm-up).
RECIPE_CHANGED = [
    *("--optimizer.lr", "1e-3", "--optimizer.weight_decay", "0.05", "--optimizer.betas", "[0.8, 0.9]"),
    *("--optimizer.eps", "1e-6", "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_type", "linear"),
    *("--lr_scheduler.min_lr_factor", "0.2"),
]
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def _resume_with_changed_settings(rank, world_size, root):
    lines = _log_lines()
    train(load_recipe(_argv(root / "fresh", 6, *RECIPE_CHANGED)))
    train(load_recipe(_argv(root / "resumed", 3, "--checkpoint.interval", "3")))
    groups, load = [], CheckpointManager.load

    def capture(self):
        step = load(self)
        groups.extend({k: g[k] for k in HYPERPARAMETERS} for opt in self.optimizers for g in opt.param_groups)
        return step

    CheckpointManager.load = capture
    try:
        train(load_recipe(_argv(root / "resumed", 6, *RECIPE_CHANGED)))
    finally:
        CheckpointManager.load = load
    return _logged_lrs(root / "fresh"), _logged_lrs(root / "resumed"), groups, lines


def test_a_resume_takes_the_optimizer_and_schedule_settings_from_the_recipe(tmp_path):
    """3 steps, then resumed to 6 with every optimizer and schedule key changed: each resumed step's LR is a
    fresh 6-step run's, the optimizer runs on the recipe's hyperparameters, and each change is one log line."""
    ((fresh, resumed, groups, lines),) = run_distributed(_resume_with_changed_settings, 1, tmp_path, timeout_s=300)
    assert len(resumed) == 6 and resumed[3:] == fresh[3:]
    expected = {"lr": fresh[3], "initial_lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05}
    assert groups and all(group == expected for group in groups), groups
    changed = [m.group(1) for line in lines if (m := re.match(r"resuming with the recipe's (\S+) = ", line))]
    assert sorted(changed) == [
        "lr_scheduler.decay_type",
        "lr_scheduler.min_lr_factor",
        "lr_scheduler.warmup_steps",
        "optimizer.betas",
        "optimizer.eps",
        "optimizer.lr",
        "optimizer.weight_decay",
        "training.steps",
    ]


def _as_saved_before_checksums(step: Path) -> None:
    """Rewrite checkpoint ``step`` as it was saved before checksums, LR schedule settings and token digests:
    no manifest, no ``settings`` in the schedule's state, a data fingerprint naming the data by its path."""
    metadata = dcp.FileSystemReader(str(step)).read_metadata()
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        for key, md in metadata.state_dict_metadata.items()
    }
    dcp.load(state, checkpoint_id=str(step))
    old = {k: v for k, v in state.items() if ".settings." not in k and not k.endswith(".tokens_sha256")}
    assert len(old) == len(state) - 5
    shutil.rmtree(step)
    dcp.save(old, storage_writer=dcp.FileSystemWriter(str(step)))


def _data_known_by_content(rank, world_size, root):
    """One 8-step run, and the same in three parts, each on another copy or spelling of the corpus: the first
    part's checkpoint rewritten as saved before checksums and digests, the second on its pre-tokenized copy
    elsewhere, the third on its absolute path. Then other tokens: refused, and with restart_data_order taken."""
    lines = _log_lines()
    corpus = load_token_stream("text", Path("data/corpus"), ByteTokenizer(), 515)
    (root / "moved").mkdir(parents=True)
    corpus.tofile(root / "moved" / "corpus.tokens")
    corpus[::-1].tofile(root / "other.tokens")  # as many tokens, others
    tokens = ["--training.dataset", "tokens", "--training.dataset_path"]
    straight = train(load_recipe(_argv(root / "straight", 8))).losses
    parts = train(load_recipe(_argv(root / "run", 3, "--checkpoint.interval", "3"))).losses
    _as_saved_before_checksums(root / "run" / "checkpoint" / "step-3")
    parts += train(load_recipe(_argv(root / "run", 6, *tokens, str(root / "moved" / "corpus.tokens")))).losses
    absolute = ["--training.dataset_path", str(Path("data/corpus").resolve())]
    parts += train(load_recipe(_argv(root / "run", 8, *absolute))).losses
    other = [*tokens, str(root / "other.tokens")]
    refused = refusal(_argv(root / "run", 9, *other))
    restart = ["--checkpoint.restart_data_order"]
    restarted = [train(load_recipe(_argv(root / "run", n, *other, *restart))).losses for n in (9, 10)]
    return straight, parts, refused, restarted, lines


def test_data_is_known_by_its_tokens_and_old_checkpoints_still_resume(tmp_path):
    ((straight, parts, refused, restarted, lines),) = run_distributed(
        _data_known_by_content, 1, tmp_path, timeout_s=300
    )
    assert parts == straight
    step_3 = tmp_path / "run" / "checkpoint" / "step-3"
    for said in (
        f"{step_3} has no checksums (saved before checkpoints carried them): its files are not verified",
        f"{step_3} names its data by path (saved before data fingerprints held a digest of the tokens): "
        "matched on token count, seq_len, global batch size and seed",
        f"{step_3} does not record its LR schedule's settings (saved before it did): the schedule is the "
        "recipe's (steps 6, warmup_steps 8, decay_type constant, min_lr_factor 0.1)",
    ):
        assert lines.count(said) == 1, (said, lines)
    other_data = (
        r"tokens: saved 465,725 tokens of '\S+/data/corpus' \(text, tokenizer bytes\), now 465,725 tokens of "
        r"'\S+/other\.tokens' \(tokens, tokenizer bytes\) \(as many, other tokens\)"
    )
    assert re.fullmatch(
        rf"\S+/step-8 saved its data position for other data \({other_data}\); resume on that data, or pass "
        r"--checkpoint\.restart_data_order to start this data's order from its first batch",
        refused,
    ), refused
    assert [len(losses) for losses in restarted] == [1, 1]
    restarts = [line for line in lines if "its order starts from its first batch" in line]
    assert len(restarts) == 1 and re.search(other_data, restarts[0]), restarts  # the rerun continues the new order
