"""scripts/pretokenize.py: its file is the trainer's own stream, it never leaves a file that looks whole, it trains."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as RustTokenizer

from data import build_tokenizer, documents
from data.documents import DocumentBatch
from data.token_stream import DOCUMENT_SUFFIXES, load_token_stream
from scripts import pretokenize
from tests.dist_utils import train_command
from tests.word_tokenizer import write_word_tokenizer
from training.metrics.records import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# Two files of documents; "<END>" is no common EOS name, so --eos_token is needed.
FILES = [["hello world", "world hello hello", "hello"], ["world", "hello, world!", "world world hello"]]


def write_corpus(folder: Path, fmt: str) -> Path:
    """FILES in ``fmt``, the text in a field/column named "body" next to another one."""
    folder.mkdir()
    for i, docs in enumerate(FILES):
        path = folder / f"part{i}{DOCUMENT_SUFFIXES[fmt]}"
        if fmt == "text":
            path.write_text("\n\n".join(docs) + "\n")
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps({"id": n, "body": doc}) + "\n" for n, doc in enumerate(docs)))
        else:
            pq.write_table(pa.table({"id": range(len(docs)), "body": docs}), path, row_group_size=2)
    return folder


def run(tmp_path, *extra, fmt="text", workers=2):
    """pretokenize in this process (so the tests can patch it); returns the exit code."""
    tokenizer = write_word_tokenizer(tmp_path, eos_token="<END>")
    corpus = tmp_path / "corpus" if (tmp_path / "corpus").exists() else write_corpus(tmp_path / "corpus", fmt)
    return pretokenize.main(
        [
            "--tokenizer",
            str(tokenizer),
            "--input",
            str(corpus),
            "--format",
            fmt,
            "--output",
            str(tmp_path / "corpus.tokens"),
            "--workers",
            str(workers),
            "--text_column",
            "body",
            "--eos_token",
            "<END>",
            *extra,
        ]
    )


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_file_is_the_stream_the_trainer_builds(tmp_path, monkeypatch, fmt):
    """One batch per document over two workers: written in input order whichever worker finishes first."""
    monkeypatch.setattr(documents, "BATCH_BYTES", 1)
    assert run(tmp_path, fmt=fmt) == 0
    written = np.fromfile(tmp_path / "corpus.tokens", dtype="<u4").tolist()
    tokenizer_json = str(tmp_path / "tokenizer.json")
    trainer = load_token_stream(
        fmt, tmp_path / "corpus", build_tokenizer(tokenizer_json, eos_token="<END>"), 4, text_column="body"
    )
    assert written == trainer.tolist()
    direct = RustTokenizer.from_file(tokenizer_json)
    assert written == [i for docs in FILES for doc in docs for i in (*direct.encode(doc).ids, 0)]
    assert not (tmp_path / "corpus.tokens.partial").exists()


def test_an_existing_output_is_kept_without_force(tmp_path, capsys):
    (tmp_path / "corpus.tokens").write_bytes(b"keep")
    assert run(tmp_path) == 2
    assert (tmp_path / "corpus.tokens").read_bytes() == b"keep"
    assert (
        capsys.readouterr().err == f"pretokenize: {tmp_path / 'corpus.tokens'}: already exists; pass --force to "
        "overwrite it, or choose another --output\n"
    )
    assert run(tmp_path, "--force") == 0
    assert (tmp_path / "corpus.tokens").stat().st_size == 4 * 20  # 14 words, 6 EOS


OUTPUT_REFUSALS = {  # name: (--input and --output relative to tmp_path, the error after "pretokenize: <output>: ")
    "the_input_file": ("corpus/part0.txt", "corpus/part0.txt", "is an input file ({t}/corpus/part0.txt)"),
    "a_file_of_the_input_folder": ("corpus", "corpus/part1.txt", "is an input file ({t}/corpus/part1.txt)"),
    "a_link_to_an_input": ("corpus", "link.txt", "is an input file ({t}/corpus/part0.txt)"),
    "a_folder": ("corpus/part0.txt", "corpus", "is a folder; --output names the tokens file to write"),
}


@pytest.mark.parametrize("case", list(OUTPUT_REFUSALS))
def test_an_output_that_would_replace_an_input_or_is_a_folder_is_refused_before_any_work(
    tmp_path, monkeypatch, capsys, case
):
    corpus = write_corpus(tmp_path / "corpus", "text")
    (tmp_path / "link.txt").symlink_to(corpus / "part0.txt")
    before = {p.name: p.read_bytes() for p in corpus.iterdir()}
    monkeypatch.setattr(pretokenize, "build_tokenizer", lambda *args: pytest.fail("work started"))
    source, output, says = OUTPUT_REFUSALS[case]
    argv = ["--tokenizer", "bytes", "--input", str(tmp_path / source), "--format", "text"]
    assert pretokenize.main([*argv, "--output", str(tmp_path / output), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pretokenize: {tmp_path / output}: " + says.format(t=tmp_path)) and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == before
    assert not list(tmp_path.glob("*.partial")) and not list(corpus.glob("*.partial"))


# pretokenize with the second file's first document held in a worker until the process is killed.
_HELD_IN_A_WORKER = """
import os, sys, time
from data import documents
from scripts import pretokenize

documents.BATCH_BYTES = 1
tokenize = pretokenize.tokenize_batch

def tokenize_but_hold(docs, tokenizer):
    if docs == ["world"]:
        open(os.path.join(sys.argv[1], f"worker-{os.getpid()}"), "w").close()
        time.sleep(60)
    return tokenize(docs, tokenizer)

pretokenize.tokenize_batch = tokenize_but_hold
sys.exit(pretokenize.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("target", ["the_process", "its_process_group"])
def test_sigterm_leaves_no_file_and_no_worker_behind(tmp_path, target):
    """As Ctrl-C: the workers stopped, the .partial file removed, one line, the exit code of SIGTERM."""
    corpus = write_corpus(tmp_path / "corpus", "text")
    output, partial = tmp_path / "corpus.tokens", tmp_path / "corpus.tokens.partial"
    argv = ["--tokenizer", "bytes", "--input", str(corpus), "--format", "text", "--output", str(output)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_IN_A_WORKER, str(tmp_path), *argv, "--workers", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not workers:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
            workers = [int(p.name.removeprefix("worker-")) for p in tmp_path.glob("worker-*")]
        assert partial.exists()
        (os.kill if target == "the_process" else os.killpg)(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
        assert err == f"pretokenize: terminated (SIGTERM); removed {partial}\n" and out == ""
        assert not partial.exists() and not output.exists()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived pretokenize"
            time.sleep(0.05)
    finally:  # whatever went wrong, nothing of it is left running: it has a session and process group of its own
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_interrupted_run_leaves_no_file(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the third batch, with two written to the .partial file: neither file is left."""
    monkeypatch.setattr(documents, "BATCH_BYTES", 1)
    partial = tmp_path / "corpus.tokens.partial"
    batches_tokenized = []

    def tokenize_then_interrupt(docs, tokenizer):
        batches_tokenized.append(docs)
        if len(batches_tokenized) == 3:
            assert partial.exists()
            raise KeyboardInterrupt
        return np.zeros(2, dtype=np.uint32)

    monkeypatch.setattr(pretokenize, "tokenize_batch", tokenize_then_interrupt)
    assert run(tmp_path, workers=1) == 130
    assert not partial.exists() and not (tmp_path / "corpus.tokens").exists()
    assert capsys.readouterr().err.splitlines()[-1] == f"pretokenize: interrupted; removed {partial}"


def test_bad_document_in_a_later_file_stops_the_workers_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(documents, "BATCH_BYTES", 1)
    corpus = write_corpus(tmp_path / "corpus", "jsonl")
    (corpus / "part2.jsonl").write_text('{"body": "hello"}\n{"text": "hello"}\n')
    assert run(tmp_path, fmt="jsonl") == 1
    assert not (tmp_path / "corpus.tokens.partial").exists() and not (tmp_path / "corpus.tokens").exists()
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(f'pretokenize: {corpus / "part2.jsonl"}: line 2 has no string "body" field')
    )


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_rewritten_in_place_at_most_four_times_a_second(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(pretokenize.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(sys, "stderr", Terminal())
    progress = pretokenize.Progress(total_bytes=100_000)
    for step in range(1, 11):  # a batch of 2 documents and 50 tokens every 0.1 s
        clock[0] = step * 0.1
        progress.update(DocumentBatch(["doc"] * 2, bytes_read=step * 100), 50)
    progress.finish()
    shown = sys.stderr.getvalue()
    assert shown.startswith("\r") and shown.endswith("\n") and shown.count("\n") == 1
    lines = [line.removesuffix("\x1b[K\n").removesuffix("\x1b[K") for line in shown.split("\r")[1:]]
    assert lines == [  # at 0.3, 0.6 and 0.9 s, and the final line
        "pretokenize: 6 documents, 150 tokens, 500 tokens/s, 0% of the input, ETA 0:01:39",
        "pretokenize: 12 documents, 300 tokens, 500 tokens/s, 1% of the input, ETA 0:01:39",
        "pretokenize: 18 documents, 450 tokens, 500 tokens/s, 1% of the input, ETA 0:01:39",
        "pretokenize: 20 documents, 500 tokens, 500 tokens/s, 100% of the input, 0:00:01",
    ]


def test_shipped_corpus_pretokenized_trains_with_dataset_tokens(tmp_path, capsys):
    """Summary and (stderr not a terminal) one plain progress line; then two steps of the debug recipe train on it."""
    tokens = tmp_path / "persuasion.tokens"
    argv = ["--tokenizer", "bytes", "--input", str(ROOT / "data/corpus"), "--format", "text", "--output", str(tokens)]
    assert pretokenize.main(argv) == 0
    out, err = capsys.readouterr()
    assert err.startswith("pretokenize: 1,035 documents, 465,725 tokens, ") and "\r" not in err
    assert err.count("\n") == 1 and ", 100% of the input, 0:00:0" in err
    assert out.startswith(f"pretokenize: wrote 465,725 tokens (1,035 documents, max id 256) to {tokens} in ")
    assert tokens.stat().st_size == 4 * 465_725

    train = train_command(
        1,
        tmp_path / "run",
        "--training.steps",
        "2",
        "--training.local_batch_size",
        "2",
        "--training.dataset",
        "tokens",
        "--training.dataset_path",
        str(tokens),
    )
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
