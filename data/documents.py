"""Reading documents (strings) from text and JSONL files, streamed in batches, with errors that name the fix.

Files are read a line at a time, so a corpus larger than memory can be tokenized batch by batch.
"""

import json
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

# A document and the input bytes read by the end of it.
Documents = Iterator[tuple[str, int]]

# Input bytes per batch of documents: one unit of work for a pretokenize worker, and its progress line's step.
BATCH_BYTES = 1 << 20


class DocumentBatch(NamedTuple):
    """Consecutive documents, and the input bytes read by the end of the last one (progress of a long read)."""

    documents: list[str]
    bytes_read: int


def input_files(path: Path, suffix: str) -> list[Path]:
    """The file itself, or the folder's ``*suffix`` files in sorted order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob(f"*{suffix}") if p.is_file())
        if not files:
            raise ValueError(
                f"{path}: folder holds no *{suffix} files; put the data there or point dataset_path at a file"
            )
        return files
    raise ValueError(
        f"{path}: no such file or folder; set dataset_path to an existing file or folder (relative to {Path.cwd()})"
    )


def utf8_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, line without its "\\n", bytes read so far) for each line, split on "\\n" only.

    Bad UTF-8 is an error naming its byte offset; a file with no text is an error once read.
    """
    offset, has_text = 0, False
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").removesuffix("\n")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}: not valid UTF-8 at byte offset {offset + e.start} (byte 0x{raw[e.start]:02x}); "
                    "re-encode the file as UTF-8"
                ) from None
            offset += len(raw)
            has_text = has_text or bool(line.strip())
            yield line_no, line, offset
    if not has_text:
        raise ValueError(f"{path}: empty file (no text); remove it or fill it")


def text_file_documents(path: Path) -> Documents:
    """Plain text: documents are separated by one or more blank (whitespace-only) lines.

    Each document is stripped of leading and trailing whitespace.
    """
    lines: list[str] = []
    for _, line, offset in utf8_lines(path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines).strip(), offset
            lines = []
    if lines:
        yield "\n".join(lines).strip(), path.stat().st_size


def jsonl_file_documents(path: Path, text_column: str) -> Documents:
    """JSONL: one JSON object per line, its ``text_column`` field a document; blank lines skipped.

    Split on "\\n" only: str.splitlines would also break at U+2028, which JSON strings may hold.
    """
    for line_no, line, offset in utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: line {line_no} is not valid JSON ({e.msg}); each line must be one JSON object"
            ) from None
        text = record.get(text_column) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise ValueError(
                f'{path}: line {line_no} has no string "{text_column}" field; each line must look like '
                f'{{"{text_column}": "..."}} (dataset_text_column names the field)'
            )
        yield text, offset


def across_files(files: list[Path], read_file: Callable[[Path], Documents]) -> Documents:
    """Each file's (document, bytes read in that file) in turn, the bytes counted from the start of the first file."""
    done = 0
    for file in files:
        for document, offset in read_file(file):
            yield document, done + offset
        done += file.stat().st_size


def in_batches(documents: Documents) -> Iterator[DocumentBatch]:
    """(document, bytes read) pairs grouped into batches of about BATCH_BYTES of input."""
    batch: list[str] = []
    start = 0
    for document, bytes_read in documents:
        batch.append(document)
        if bytes_read - start >= BATCH_BYTES:
            yield DocumentBatch(batch, bytes_read)
            batch, start = [], bytes_read
    if batch:
        yield DocumentBatch(batch, bytes_read)
