"""Reading documents (strings) from text and JSONL files, with errors that name the fix."""

import json
import re
from pathlib import Path

BLANK_LINES = re.compile(r"\n\s*\n")


def input_files(path: Path, suffix: str) -> list[Path]:
    """The file itself, or the folder's ``*suffix`` files in sorted order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob(f"*{suffix}") if p.is_file())
        if not files:
            raise ValueError(f"{path}: folder holds no *{suffix} files; put the data there or point dataset_path at a file")
        return files
    raise ValueError(f"{path}: no such file or folder; set dataset_path to an existing file or folder (relative to {Path.cwd()})")


def read_utf8(path: Path) -> str:
    """The whole file as text; an empty file or bad UTF-8 is an error that says where."""
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}: empty file (no text); remove it or fill it")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (byte 0x{raw[e.start]:02x}); "
            "re-encode the file as UTF-8"
        ) from None


def text_documents(files: list[Path]) -> list[str]:
    """Plain text: documents are separated by one or more blank (whitespace-only) lines.

    Each document is stripped of leading and trailing whitespace.
    """
    docs: list[str] = []
    for file in files:
        docs.extend(d.strip() for d in BLANK_LINES.split(read_utf8(file)) if d.strip())
    return docs


def jsonl_documents(files: list[Path]) -> list[str]:
    """JSONL: one JSON object per line, its ``text`` field a document; blank lines skipped.

    Split on "\\n" only: str.splitlines would also break at U+2028, which JSON strings may hold.
    """
    docs: list[str] = []
    for file in files:
        for line_no, line in enumerate(read_utf8(file).split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: line {line_no} is not valid JSON ({e.msg}); each line must be one JSON object") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file}: line {line_no} has no string \"text\" field; each line must look like {{\"text\": \"...\"}}")
            docs.append(text)
    return docs
