"""The validation set (training/validation.py) and what stops a run before training.

The numbers themselves are tested where the layouts run: every case of
tests/test_parallel_equivalence.py validates like one process, whose validation loss is
checked against a float64 reference, and tests/test_checkpoint.py's resume test runs with
validation on.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config.errors import ConfigError
from data import ByteTokenizer
from data.token_stream import load_token_stream
from training.recipe import load_recipe
from training.validation import build_validation_set

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 2048  # the debug flavor's
GLOBAL_BATCH = 8

# torchdata 0.11 calls a torch API that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


def _cfg(*overrides):
    return load_recipe(
        [
            "--config",
            str(ROOT / "configs/debug.toml"),
            "--training.seq_len",
            "32",
            "--training.local_batch_size",
            "2",
            "--validation.enable",
            "--validation.dataset_path",
            str(ROOT / "data/corpus"),
            "--validation.steps",
            "3",
            *overrides,
        ]
    )


def _global_batches(cfg, dp_degree):
    """Validation batch i as the dp ranks together see it: their slices, in rank order."""
    ranks = [build_validation_set(cfg, ByteTokenizer(), VOCAB, GLOBAL_BATCH, r, dp_degree) for r in range(dp_degree)]
    return [torch.cat([rank.local_batch(i)["input_ids"] for rank in ranks]) for i in range(cfg.validation.steps)]


@pytest.mark.parametrize("seq_len", [32, 16])  # 16: validation.seq_len shorter than training's
def test_the_set_is_the_first_windows_in_file_order_whatever_the_dp_degree(seq_len):
    cfg = _cfg("--validation.seq_len", str(seq_len))
    n_windows = cfg.validation.steps * GLOBAL_BATCH
    tokens = load_token_stream("text", ROOT / "data/corpus", ByteTokenizer(), VOCAB)[: n_windows * seq_len]
    expected = torch.from_numpy(tokens.astype("int64")).view(cfg.validation.steps, GLOBAL_BATCH, seq_len)
    for dp_degree in (1, 2, 4):
        batches = _global_batches(cfg, dp_degree)
        assert all(torch.equal(got, want) for got, want in zip(batches, expected, strict=True)), dp_degree
    assert all(torch.equal(a, b) for a, b in zip(_global_batches(cfg, 2), _global_batches(cfg, 2)))  # every time


def _refusal(*overrides, dp_degree=1):
    with pytest.raises(ConfigError) as err:
        build_validation_set(_cfg(*overrides), ByteTokenizer(), VOCAB, GLOBAL_BATCH, 0, dp_degree)
    return err.value


def test_a_missing_path_names_the_key_and_the_path():
    err = _refusal("--validation.dataset_path", "nowhere.txt")
    assert err.key == "validation.dataset_path"
    assert str(err).startswith("config error: validation.dataset_path: nowhere.txt: no such file or folder; set")


def test_a_set_too_small_for_its_batches_says_how_many_windows_it_has_and_needs(tmp_path):
    small = tmp_path / "held_out.txt"
    small.write_text("x" * (32 * 20 + 5))  # with its EOS: 20 windows of 32 tokens and 6 left over
    err = _refusal("--validation.dataset_path", str(small))
    assert err.key == "validation.steps"
    assert f"{small} holds 20 windows of seq_len 32, but 3 batches of the global batch 8 need 24" in str(err)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc")
    assert "only 4 tokens, but seq_len = 32 needs at least 32" in str(_refusal("--validation.dataset_path", str(tiny)))


def test_a_local_batch_that_does_not_divide_a_rank_s_share_names_the_share():
    err = _refusal("--validation.local_batch_size", "3", dp_degree=2)
    assert err.key == "validation.local_batch_size"
    assert "3 does not divide each data-parallel rank's share of a batch, global batch 8 / dp 2 = 4" in str(err)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["--validation.dataset_path", ""], "validation.dataset_path", "is empty; set it to the held-out data"),
        (["--validation.freq", "0"], "validation.freq", "must be >= 1"),
        (["--validation.steps", "0"], "validation.steps", "must be >= 1"),
        (["--validation.local_batch_size", "-1"], "validation.local_batch_size", "must be >= 0"),
        (["--validation.seq_len", "64"], "validation.seq_len", "64 exceeds training.seq_len 32"),
        (["--validation.dataset", "csv"], "validation.dataset", "'text', 'jsonl', 'parquet', 'tokens'"),
        (
            [
                "--parallelism.pipeline_parallel_degree",
                "2",
                "--parallelism.pipeline_parallel_microbatch_size",
                "2",
                "--validation.local_batch_size",
                "3",
            ],
            "validation.local_batch_size",
            "3 is not a multiple of parallelism.pipeline_parallel_microbatch_size 2",
        ),
    ],
)
def test_bad_keys_are_refused_when_the_recipe_loads(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        _cfg(*overrides)
    assert err.value.key == key and words in str(err.value)


def test_train_py_stops_with_one_line_before_the_first_step():
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/debug.toml",
            "--training.steps",
            "2",
            "--validation.enable",
            "--validation.dataset_path",
            "nowhere.txt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("config error: validation.dataset_path: nowhere.txt: no such file")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "step 1" not in result.stdout and "Traceback" not in result.stdout + result.stderr
