"""Tokenize a corpus once into the flat uint32 file that ``dataset = "tokens"`` memory-maps.

    python -m scripts.pretokenize --tokenizer path/to/tokenizer.json --input corpus/ --format parquet \\
        --output corpus.tokens [--workers N] [--text_column text] [--eos_token TOKEN] [--force]

Every rank tokenizes text/jsonl/parquet data at start-up, which stops being practical past a few GB.
Here the trainer's own readers and tokenizing (data/) run once, in worker processes, and the batches
are written in input order: the file holds exactly the stream the trainer would build in-process.
It is written to <output>.partial and renamed when complete, so a file under the output name is whole.
"""

import argparse
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from data.documents import DocumentBatch, input_files
from data.token_stream import DOCUMENT_SUFFIXES, document_batches, tokenize_batch
from data.tokenizer import Tokenizer, build_tokenizer

_worker_tokenizer: Tokenizer  # each worker process's, set by _start_worker


def _start_worker(tokenizer: Tokenizer) -> None:
    """Ctrl-C reaches the whole process group: only the parent handles it (and stops the workers)."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = tokenizer


def _tokenize_in_worker(documents: list[str]) -> np.ndarray:
    return tokenize_batch(documents, _worker_tokenizer)


def tokenized_in_order(
    batches: Iterator[DocumentBatch], tokenizer: Tokenizer, workers: int
) -> Iterator[tuple[DocumentBatch, np.ndarray]]:
    """Each batch with its token ids, in input order; at most two batches per worker are read ahead."""
    if workers == 1:
        for batch in batches:
            yield batch, tokenize_batch(batch.documents, tokenizer)
        return
    # fork, before any batch is read: the workers share the parent's imports and tokenizer instead of
    # re-importing torch each, and no reader thread exists yet to be cut off by the fork.
    with multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer,)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((batch, pool.apply_async(_tokenize_in_worker, (batch.documents,))))
            if len(in_flight) == 2 * workers:
                done, pending = in_flight.popleft()
                yield done, pending.get()
        while in_flight:
            done, pending = in_flight.popleft()
            yield done, pending.get()


class Progress:
    """One stderr line: documents, tokens, tokens/s, share of the input bytes read and the ETA.

    On a terminal it is rewritten in place at most 4 times a second; elsewhere (a job log) it is a
    plain line every 30 s, and always a plain final line.
    """

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes
        self.interactive = sys.stderr.isatty()
        self.interval = 0.25 if self.interactive else 30.0
        self.start = self.last_shown = time.monotonic()
        self.documents = self.tokens = self.bytes_read = 0

    def update(self, batch: DocumentBatch, num_tokens: int) -> None:
        self.documents += len(batch.documents)
        self.tokens += num_tokens
        self.bytes_read = batch.bytes_read
        now = time.monotonic()
        if now - self.last_shown >= self.interval:
            self.last_shown = now
            self._show(self._line(now, eta=True), final=False)

    def finish(self) -> None:
        self.bytes_read = self.total_bytes  # trailing blank lines are read but end no document
        self._show(self._line(time.monotonic(), eta=False), final=True)

    def _line(self, now: float, eta: bool) -> str:
        elapsed = max(now - self.start, 1e-9)
        share = self.bytes_read / self.total_bytes
        line = (
            f"pretokenize: {self.documents:,} documents, {self.tokens:,} tokens, "
            f"{self.tokens / elapsed:,.0f} tokens/s, {share:.0%} of the input"
        )
        if eta:
            return line + f", ETA {_clock(elapsed * (1 - share) / share) if share else '?'}"
        return line + f", {_clock(elapsed)}"

    def _show(self, line: str, final: bool) -> None:
        if self.interactive:
            sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def write_tokens(tokenized: Iterator[tuple[DocumentBatch, np.ndarray]], path: Path, progress: Progress) -> int:
    """Appends each batch's ids to ``path`` as little-endian uint32; returns the largest id written."""
    max_id = 0
    with path.open("wb") as f:
        for batch, ids in tokenized:
            f.write(ids.astype("<u4", copy=False).tobytes())
            max_id = max(max_id, int(ids.max()))
            progress.update(batch, len(ids))
    progress.finish()
    return max_id


def abandon(partial: Path, reason: str, exit_code: int) -> int:
    """Removes the unfinished file, so no file that looks complete is left behind, and says why in one line."""
    partial.unlink(missing_ok=True)
    print(("\n" if sys.stderr.isatty() else "") + f"pretokenize: {reason}; removed {partial}", file=sys.stderr)
    return exit_code


def parse_args(argv: list[str]) -> argparse.Namespace:
    default_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parser = argparse.ArgumentParser(description='Tokenize a corpus once into a dataset = "tokens" file.')
    parser.add_argument("--tokenizer", required=True, help='"bytes", a tokenizer.json, or a folder holding one')
    parser.add_argument("--input", required=True, help="a file, or a folder of *.txt/*.jsonl/*.parquet files (sorted)")
    parser.add_argument("--format", required=True, choices=list(DOCUMENT_SUFFIXES))
    parser.add_argument("--output", required=True, help="the tokens file to write")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers,
        help=f"tokenizing processes (default {default_workers}, the CPUs this process may use)",
    )
    parser.add_argument("--text_column", default="text", help="the JSONL field or Parquet column holding the text")
    parser.add_argument("--eos_token", default="", help="a tokenizer.json's end-of-sequence token, if not a common one")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    try:
        if output.exists() and not args.force:
            raise ValueError(f"{output}: already exists; pass --force to overwrite it, or choose another --output")
        if not output.parent.is_dir():
            raise ValueError(f"{output.parent}: no such folder for --output; create it first")
        tokenizer = build_tokenizer(args.tokenizer, args.eos_token)
        files = input_files(Path(args.input), DOCUMENT_SUFFIXES[args.format])
        batches = document_batches(args.format, files, args.text_column)
    except ValueError as err:
        print(f"pretokenize: {err}", file=sys.stderr)
        return 2
    progress = Progress(sum(f.stat().st_size for f in files))
    try:
        max_id = write_tokens(tokenized_in_order(batches, tokenizer, args.workers), partial, progress)
        os.replace(partial, output)
    except KeyboardInterrupt:
        return abandon(partial, "interrupted", 130)
    except ValueError as err:  # a reader's: one line naming the file and the fix
        return abandon(partial, str(err), 1)
    except Exception as err:
        return abandon(partial, f"{type(err).__name__}: {err}", 1)
    seconds = time.monotonic() - progress.start
    print(
        f"pretokenize: wrote {progress.tokens:,} tokens ({progress.documents:,} documents, max id {max_id}) to "
        f'{output} in {seconds:.1f} s; train on it with dataset = "tokens" and a model vocab_size >= {max_id + 1}'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
