"""Every parallel layout trains and validates exactly like one process on the same global batch.

Each case runs 3 steps on CPU with gloo and compares with a single-process run:
the per-step losses and gradient norms (before clipping, which is on) within
1e-5 relative, the validation loss after steps 2 and 3 within 1e-5, and the full
(gathered) parameters within 1e-5, in fp32. The vocabulary (515) splits unevenly
over 2 ranks. The single-process validation loss itself is checked against a
float64 materialized-logits reference of the final weights. The block_causal cases
compare with a single-process block_causal run on a corpus of documents short enough
that every window packs several, so stages that masked wrongly would not match. Every
pipeline schedule the recipe's "auto" can choose, and "auto" itself, runs in one launch of
the processes (causal, then block_causal).
"""

import random
import string
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from data import ByteTokenizer
from data.token_stream import load_token_stream
from models import Transformer, build_model_args
from models.initialize import canonical_name
from parallelisms.pipeline import ZERO_BUBBLE
from planning.schedule_search import torch_splits_function_backward
from tests.dist_utils import run_distributed
from tests.reference import reference
from train import train
from training.recipe import load_recipe

pytestmark = pytest.mark.multiprocess

GLOBAL_BATCH = 8
SEQ_LEN = 32
VALIDATION_BATCHES = 2  # of GLOBAL_BATCH windows: the corpus's first 16 windows, in file order


def _base(tmp, model):
    return [
        "--config",
        "configs/debug.toml",
        "--model.name",
        model,
        "--model.vocab_size",
        "515",
        "--training.steps",
        "3",
        "--training.seq_len",
        str(SEQ_LEN),
        "--training.global_batch_size",
        str(GLOBAL_BATCH),
        "--training.max_norm",
        "0.5",
        "--optimizer.lr",
        "0.003",
        "--lr_scheduler.warmup_steps",
        "0",
        # Adam's eps bounds how much it amplifies float noise in near-zero gradient entries.
        "--optimizer.eps",
        "1e-6",
        "--loss.name",
        "chunked",
        "--loss.chunk_size",
        "40",
        "--job.dump_folder",
        str(tmp),
        "--validation.enable",
        "--validation.dataset_path",
        "data/corpus",
        "--validation.freq",
        "2",
        "--validation.steps",
        str(VALIDATION_BATCHES),
    ]


def _train_and_gather(rank, world_size, argv):
    result = train(load_recipe(argv))
    params = {}
    for part in result.model_parts:
        for fqn, p in part.named_parameters():
            params[canonical_name(fqn)] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    validation = {step: figures["validation_loss"] for step, figures in result.validation.items()}
    return (result.losses, result.grad_norms, validation), params


def _train_each(rank, world_size, argvs):
    """Several runs, one after another, in one launch of the processes (start-up is most of a run's time)."""
    return [_train_and_gather(rank, world_size, argv) for argv in argvs]


def _merged(outputs):
    losses = outputs[0][0]
    for other, _ in outputs[1:]:
        assert other == losses  # every rank reports the same reduced loss
    params = {}
    for _, p in outputs:
        params.update(p)
    return losses, params


def _run(world_size, argv):
    return _merged(run_distributed(_train_and_gather, world_size, argv, timeout_s=300))


def _run_each(world_size, argvs):
    per_rank = run_distributed(_train_each, world_size, argvs, timeout_s=600)
    return [_merged([runs[i] for runs in per_rank]) for i in range(len(argvs))]


_REFERENCE = {}


def _reference(tmp_path_factory, model, recipe=()):
    """The single-process run; ``recipe``: overrides that the layouts compared with it share."""
    key = (model, *recipe)
    if key not in _REFERENCE:
        argv = _base(tmp_path_factory.mktemp("ref"), model) + [
            *recipe,
            "--training.local_batch_size",
            str(GLOBAL_BATCH),
        ]
        _REFERENCE[key] = _run(1, argv)
    return _REFERENCE[key]


_VP = ["--parallelism.vocab_parallel", "--loss.chunk_size", "0"]  # back to the default: the head takes no chunk size
# The recipe's schedule keys default to "auto"; these cases name theirs.
_1F1B = [
    "--parallelism.pipeline_parallel_schedule",
    "1F1B",
    "--parallelism.pipeline_parallel_virtual_stages",
    "1",
    "--parallelism.pipeline_parallel_microbatch_size",
    "1",
]

CASES = {
    # name: (model, world size, overrides)
    "dp_shard2_accumulate2": ("qwen3", 2, ["--training.local_batch_size", "2"]),
    "dp_replicate2": (
        "qwen3",
        2,
        ["--training.local_batch_size", "4", "--parallelism.data_parallel_replicate_degree", "2"],
    ),
    "pp2_dp_shard2": (
        "qwen3",
        4,
        [*_1F1B, "--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"],
    ),
    # An uneven split (3 layers, then 1 with the head), as the balanced default gives.
    "pp2_dp_shard2_split_3_1": (
        "qwen3",
        4,
        [
            *_1F1B,
            "--training.local_batch_size",
            "4",
            "--parallelism.pipeline_parallel_degree",
            "2",
            "--parallelism.pipeline_parallel_stage_split_points",
            "[3]",
        ],
    ),
    "pp2_1F1B_untied": (
        "llama3",
        2,
        [
            *_1F1B,
            "--training.local_batch_size",
            "8",
            "--parallelism.pipeline_parallel_degree",
            "2",
            "--parallelism.pipeline_parallel_microbatch_size",
            "2",
        ],
    ),
    # The vocab-parallel head (classifier sharded over dp_shard, hidden states gathered).
    "vocab_parallel_dp_shard2": ("qwen3", 2, [*_VP, "--training.local_batch_size", "4"]),
    "vocab_parallel_dp_shard2_untied": ("llama3", 2, [*_VP, "--training.local_batch_size", "2"]),
    "vocab_parallel_pp2_dp_shard2": (
        "qwen3",
        4,
        [*_VP, *_1F1B, "--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"],
    ),
    "vocab_parallel_hsdp": (
        "qwen3",
        4,
        [*_VP, "--training.local_batch_size", "2", "--parallelism.data_parallel_replicate_degree", "2"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(case, tmp_path, tmp_path_factory):
    model, world_size, overrides = CASES[case]
    _assert_same_training(_run(world_size, _base(tmp_path, model) + overrides), _reference(tmp_path_factory, model))


def _schedule(name: str, stages_per_rank) -> list[str]:
    return [
        "--parallelism.pipeline_parallel_schedule",
        name,
        "--parallelism.pipeline_parallel_virtual_stages",
        str(stages_per_rank),
    ]


# Every schedule "auto" may choose, on 2 pipeline ranks, 8 sequences in microbatches of 2 (DualPipeV needs
# as many microbatches as stages); "auto" itself as the run chooses it (without a GPU size: by time alone).
# The zero-bubble schedules only where torch can run them with these losses (2.13, not 2.11).
PP2_SCHEDULES = {
    "GPipe": _schedule("GPipe", 1),
    "Interleaved1F1B": _schedule("Interleaved1F1B", 2),
    **{name: _schedule(name, 2) for name in ZERO_BUBBLE if torch_splits_function_backward()},
}
_PP2 = ["--training.local_batch_size", "8", "--parallelism.pipeline_parallel_degree", "2"]
_MICROBATCH_2 = ["--parallelism.pipeline_parallel_microbatch_size", "2"]


def _pp2_schedule_runs(tmp_path, extra=()):
    """One argv per schedule of PP2_SCHEDULES, then "auto" for all three keys."""
    argvs = [
        _base(tmp_path / name, "qwen3") + [*extra, *_PP2, *keys, *_MICROBATCH_2] for name, keys in PP2_SCHEDULES.items()
    ]
    return argvs + [_base(tmp_path / "auto", "qwen3") + [*extra, *_PP2]]


def test_every_schedule_and_auto_match_single_process(tmp_path, tmp_path_factory):
    reference = _reference(tmp_path_factory, "qwen3")
    for name, run in zip([*PP2_SCHEDULES, "auto"], _run_each(2, _pp2_schedule_runs(tmp_path))):
        _assert_same_training(run, reference, name)


@pytest.fixture(scope="module")
def block_causal(tmp_path_factory):
    """block_causal on a corpus of 2-19 byte documents, so that every 32-token window packs several."""
    rng = random.Random(0)
    docs = ["x" + "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(1, 18))) for _ in range(500)]
    path = tmp_path_factory.mktemp("documents") / "short_documents.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return ["--model.attn_mask_type", "block_causal", "--training.dataset_path", str(path)]


def test_block_causal_pp2_dp_shard2_matches_single_process(block_causal, tmp_path, tmp_path_factory):
    """The stages after the first get the document ids from the schedule."""
    overrides = [*_1F1B, "--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"]
    _assert_same_training(
        _run(4, _base(tmp_path, "qwen3") + block_causal + overrides),
        _reference(tmp_path_factory, "qwen3", block_causal),
    )


def test_block_causal_every_schedule_and_auto_match_single_process(block_causal, tmp_path, tmp_path_factory):
    reference = _reference(tmp_path_factory, "qwen3", block_causal)
    for name, run in zip([*PP2_SCHEDULES, "auto"], _run_each(2, _pp2_schedule_runs(tmp_path, block_causal))):
        _assert_same_training(run, reference, name)


def _assert_same_training(run, reference, name=""):
    (*losses, validation), params = run
    (*ref_losses, ref_validation), ref_params = reference
    # Adam is blind to a wrong gradient scale, so the gradient norms are compared too.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0, msg=name or None)
    assert losses[0][-1] < losses[0][0], name
    assert list(validation) == list(ref_validation) == [2, 3], name
    torch.testing.assert_close(
        torch.tensor(list(validation.values())),
        torch.tensor(list(ref_validation.values())),
        rtol=1e-5,
        atol=0,
        msg=name or None,
    )
    tied_copy = "output.weight" not in ref_params
    assert set(params) == set(ref_params) | ({"output.weight"} if tied_copy and "output.weight" in params else set())
    for key, value in params.items():
        expected = ref_params["tok_embeddings.weight" if key == "output.weight" and tied_copy else key]
        torch.testing.assert_close(
            value, expected, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{name} {key}: {m}".strip()
        )


@pytest.mark.parametrize("model", ["qwen3", "llama3"])  # tied and untied head
def test_validation_loss_is_the_float64_token_mean_of_the_final_weights(model, tmp_path_factory):
    """The single-process run's last validation (after step 3) recomputed from its final weights: a float64
    model, materialized logits (tests/reference.py), the corpus's first windows in file order."""
    (*_, validation), params = _reference(tmp_path_factory, model)
    args = replace(build_model_args(model, "debug", 515), max_seq_len=SEQ_LEN)
    net = Transformer(args).double()
    weights = {name: p.double() for name, p in params.items()}
    weights.setdefault("output.weight", weights["tok_embeddings.weight"])  # tied: one parameter
    net.load_state_dict(weights)
    n_windows = VALIDATION_BATCHES * GLOBAL_BATCH
    tokens = load_token_stream("text", Path("data/corpus"), ByteTokenizer(), 515)[: n_windows * SEQ_LEN]
    windows = torch.from_numpy(tokens.astype("int64")).view(n_windows, SEQ_LEN)
    with torch.no_grad():
        total = reference(net(windows), weights["output.weight"], windows, shift=1, reduction="sum")
    expected = total.item() / (n_windows * (SEQ_LEN - 1))
    assert validation[3] == pytest.approx(expected, rel=1e-5)
    assert validation[3] < validation[2]  # the model learns the corpus it is validated on
