"""Tokenize a corpus once into the flat uint32 file that ``dataset = "tokens"`` memory-maps.

    python -m scripts.pretokenize --tokenizer path/to/tokenizer.json --input corpus/ --format parquet \\
        --output corpus.tokens [--workers N] [--text_column text] [--eos_token TOKEN] [--force]

Every rank tokenizes text/jsonl/parquet data at start-up, which stops being practical past a few GB.
Here the trainer's own readers and tokenizing (data/) run once, in worker processes, and the batches
are written in input order: the file holds exactly the stream the trainer would build in-process.
It is written to <output>.partial and renamed when complete, so a file under the output name is whole;
Ctrl-C, SIGTERM or an error removes it. An --output that is a folder or one of the inputs is refused
before any work, even with --force.
"""

import argparse
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

import numpy as np

from data.documents import DocumentBatch
from data.token_stream import DOCUMENT_SUFFIXES, dataset_files, document_batches, tokenize_batch
from data.tokenizer import Tokenizer, build_tokenizer


class Terminated(BaseException):
    """SIGTERM in the parent, raised where it is as Ctrl-C raises KeyboardInterrupt, so that the same clean-up runs."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one while cleaning up changes nothing
    raise Terminated


def _serve(own: int, pipes: list[tuple[Connection, Connection]], tokenizer: Tokenizer) -> None:
    """A worker: the token ids (or the exception) of each batch of documents received, until None.

    Ctrl-C and SIGTERM may reach the whole process group: only the parent acts on them, killing its
    workers. Each worker keeps its own end of its own pipe only, so that the end of any process is
    seen by the others as the end of their pipe, never as a wait."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for index, (parent_end, worker_end) in enumerate(pipes):
        parent_end.close()
        if index != own:
            worker_end.close()
    conn = pipes[own][1]
    try:
        while (documents := conn.recv()) is not None:
            try:
                conn.send(tokenize_batch(documents, tokenizer))
            except Exception as err:  # re-raised in the parent, which stops and says so
                conn.send(err)
    except EOFError:  # the parent is gone
        pass


def tokenized_in_order(
    batches: Iterator[DocumentBatch], tokenizer: Tokenizer, workers: int
) -> Iterator[tuple[DocumentBatch, np.ndarray]]:
    """Each batch with its token ids, in input order; one batch per worker is read ahead.

    Batch k goes to worker k % workers once that worker's previous batch, the oldest in flight, is
    collected, so no worker is ever sent work while it writes a result (two full pipes, each side
    waiting on the other). The workers are killed when this ends early (an error, Ctrl-C, SIGTERM).
    """
    if workers == 1:
        for batch in batches:
            yield batch, tokenize_batch(batch.documents, tokenizer)
        return
    # fork, before any batch is read: the workers share the parent's imports and tokenizer instead of
    # re-importing torch each, and no reader thread exists yet to be cut off by the fork.
    context = multiprocessing.get_context("fork")
    pipes = [context.Pipe() for _ in range(workers)]
    processes = [context.Process(target=_serve, args=(w, pipes, tokenizer), daemon=True) for w in range(workers)]
    conns = [parent_end for parent_end, _ in pipes]
    try:
        for process in processes:
            process.start()
        for _, worker_end in pipes:
            worker_end.close()
        in_flight: deque = deque()  # (batch, its worker), oldest first
        for index, batch in enumerate(batches):
            if len(in_flight) == workers:
                yield _collect(*in_flight.popleft(), conns)
            conns[index % workers].send(batch.documents)
            in_flight.append((batch, index % workers))
        while in_flight:
            yield _collect(*in_flight.popleft(), conns)
        for conn in conns:
            conn.send(None)
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
        for conn in conns:
            conn.close()


def _collect(batch: DocumentBatch, worker: int, conns: list[Connection]) -> tuple[DocumentBatch, np.ndarray]:
    ids = conns[worker].recv()
    if isinstance(ids, Exception):
        raise ids
    return batch, ids


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
    removed = partial.exists()
    partial.unlink(missing_ok=True)
    line = f"pretokenize: {reason}" + (f"; removed {partial}" if removed else "")
    print(("\n" if sys.stderr.isatty() else "") + line, file=sys.stderr)
    return exit_code


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse, before any work, an ``--output`` that would replace an input or cannot become a file."""
    if output.is_dir():
        raise ValueError(
            f"{output}: is a folder; --output names the tokens file to write, e.g. {output / 'corpus.tokens'}"
        )
    for file in inputs:
        if file.resolve() == output.resolve():
            raise ValueError(
                f"{output}: is an input file ({file}), which the tokens would replace; "
                f"write them elsewhere, e.g. --output {output.with_suffix('.tokens')}"
            )
    if output.exists() and not force:
        raise ValueError(f"{output}: already exists; pass --force to overwrite it, or choose another --output")
    if not output.parent.is_dir():
        raise ValueError(f"{output.parent}: no such folder for --output; create it first")


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
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return pretokenize(args, output, partial)
    except KeyboardInterrupt:
        return abandon(partial, "interrupted", 128 + signal.SIGINT)
    except Terminated:
        return abandon(partial, "terminated (SIGTERM)", 128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def pretokenize(args: argparse.Namespace, output: Path, partial: Path) -> int:
    """Check everything, then write ``partial`` and rename it to ``output``; the exit code."""
    try:
        files = dataset_files(args.format, Path(args.input))
        check_output(output, files, args.force)
        tokenizer = build_tokenizer(args.tokenizer, args.eos_token)
        batches = document_batches(args.format, files, args.text_column)
    except ValueError as err:
        print(f"pretokenize: {err}", file=sys.stderr)
        return 2
    progress = Progress(sum(f.stat().st_size for f in files))
    try:
        with closing(tokenized_in_order(batches, tokenizer, args.workers)) as tokenized:  # workers ended on any exit
            max_id = write_tokens(tokenized, partial, progress)
        os.replace(partial, output)
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
