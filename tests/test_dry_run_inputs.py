"""``train.py --dry_run`` refuses what the run would refuse at start-up in its output folders, tokenizer and
data files, with the run's one-line errors, without reading the data and still writing nothing."""

import pytest

import train

DEBUG = "configs/debug.toml"

MISTAKES = {  # name: (overrides, the error's start); {t} is the test's folder
    "missing_dataset": (
        ["--training.dataset_path", "{t}/corpus"],
        "config error: training.dataset_path: {t}/corpus: no such file or folder; set dataset_path to an existing",
    ),
    "jsonl_read_as_text": (
        ["--training.dataset_path", "{t}/held_out.jsonl"],
        'config error: training.dataset_path: {t}/held_out.jsonl: a .jsonl file, read as dataset = "text"; set the '
        'format to "jsonl"',
    ),
    "missing_validation_dataset": (
        ["--validation.enable", "--validation.dataset", "jsonl", "--validation.dataset_path", "{t}/missing.jsonl"],
        "config error: validation.dataset_path: {t}/missing.jsonl: no such file or folder",
    ),
    "missing_tokenizer": (
        ["--model.tokenizer", "{t}/tokenizer.json"],
        "config error: model.tokenizer: tokenizer '{t}/tokenizer.json': expected \"bytes\", a path to a Hugging Face",
    ),
    "dump_folder_under_a_file": (
        ["--job.dump_folder", "{t}/held_out.jsonl/run"],
        "config error: job.dump_folder: cannot write to {t}/held_out.jsonl/run ({t}/held_out.jsonl is a file, not a "
        "folder); point job.dump_folder at a writable place",
    ),
    "checkpoint_folder_under_a_file": (
        ["--job.dump_folder", "{t}", "--checkpoint.enable", "--checkpoint.folder", "held_out.jsonl/checkpoint"],
        "config error: checkpoint.folder: cannot write to {t}/held_out.jsonl/checkpoint ({t}/held_out.jsonl is a "
        "file, not a folder); point checkpoint.folder at a writable place",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_dry_run_stops_at_what_the_run_would_refuse(mistake, tmp_path, capsys):
    (tmp_path / "held_out.jsonl").write_text('{"text": "held out"}\n')
    overrides, says = MISTAKES[mistake]
    argv = ["--config", DEBUG, "--job.dump_folder", str(tmp_path / "run"), "--dry_run", "--world_size", "2"]
    assert train.main([*argv, *(o.format(t=tmp_path) for o in overrides)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says.format(t=tmp_path)) and err.count("\n") == 1, err
    assert [p.name for p in tmp_path.iterdir()] == ["held_out.jsonl"]  # nothing written


def test_dry_run_of_good_inputs_passes_and_writes_nothing(tmp_path, capsys):
    argv = ["--config", DEBUG, "--job.dump_folder", str(tmp_path / "run"), "--checkpoint.enable", "--dry_run"]
    assert train.main(argv) == 0
    assert "predicted peak_memory_gib_per_rank" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
