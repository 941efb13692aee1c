"""A crc32 per checkpoint file: computed from the bytes as DCP writes them, checked before anything is loaded.

``ChecksummingWriter`` is DCP's ``FileSystemWriter`` whose streams keep a running ``zlib.crc32`` of what
passes through them, so nothing is read back; once a rank's files are written it writes
``__<rank>.crc32.json`` (``{"files": {name: {"size": bytes, "crc32": value}}}``) beside them. DCP writes
``.metadata`` only after every rank's data is written, so a complete checkpoint holds every writing rank's
manifest. ``damaged_files`` reads each file once, spread over the ranks, and every rank gets the same answer.

zlib's crc32 is in the standard library and runs at a few GB/s on one core, a small share of a save that
also serializes and writes the bytes (docs/performance.md); crc32c would be faster with a dependency more.
"""

import io
import json
import mmap
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Generator, Optional

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

MANIFEST_SUFFIX = ".crc32.json"


class _Crc32Stream:
    """A file open for writing that keeps the crc32 and size of every write passed on to it."""

    def __init__(self, stream: io.IOBase):
        self.stream, self.crc32, self.size = stream, 0, 0

    def write(self, data) -> int:
        written = self.stream.write(data)
        view = memoryview(data).cast("B")[:written]
        self.crc32, self.size = zlib.crc32(view, self.crc32), self.size + len(view)
        return written

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.stream.tell()

    def fileno(self) -> int:  # for fsync
        return self.stream.fileno()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


class _ChecksummingFileSystem(FileSystem):
    """DCP's local file system whose written files' sizes and crc32s are kept in ``written``."""

    def __init__(self):
        super().__init__()
        self.written: dict[str, dict[str, int]] = {}

    @contextmanager
    def create_stream(self, path, mode: str) -> Generator[io.IOBase, None, None]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            summed = _Crc32Stream(stream)
            yield summed  # type: ignore[misc]
            self.written[Path(path).name] = {"size": summed.size, "crc32": summed.crc32}


class ChecksummingWriter(FileSystemWriter):
    """``FileSystemWriter`` that writes a manifest of its files' crc32s once they are written."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.fs = _ChecksummingFileSystem()

    def write_data(self, plan, planner):
        done = super().write_data(plan, planner)
        done.wait()  # written by now (DCP writes in this thread), and raises what writing raised
        rank = dist.get_rank() if dist.is_initialized() else 0
        files = {name: entry for name, entry in self.fs.written.items() if not name.startswith(".metadata")}
        manifest = Path(self.path) / f"__{rank}{MANIFEST_SUFFIX}"
        with manifest.open("w") as f:
            json.dump({"files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        return done


def _check(file: Path, expected: dict[str, int]) -> Optional[str]:
    """What is wrong with ``file`` against its manifest entry (None: nothing)."""
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    if size != expected["size"]:
        return f"truncated ({size} of {expected['size']} bytes)" if size < expected["size"] else "longer than saved"
    crc32 = 0
    if size:
        with file.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            crc32 = zlib.crc32(mapped)  # read in place, not copied
    if crc32 != expected["crc32"]:
        return f"damaged (crc32 {crc32:08x}, saved as {expected['crc32']:08x})"
    return None


def damaged_files(path: Path, data_files: set[str]) -> Optional[list[str]]:
    """``name: what is wrong`` for each file of checkpoint ``path`` that differs from its manifest, in name order;
    None if the checkpoint has no manifest (written before checksums existed). ``data_files``: the files its
    ``.metadata`` refers to, each of which must be in a manifest.

    Collective when a process group is up: rank r checks the files of the manifests of ranks r, r + world, ...,
    which in an unchanged layout are the files it is about to load, so the load then reads them from the page cache.
    """
    manifests = sorted(path.glob(f"__*{MANIFEST_SUFFIX}"))
    if not manifests:
        return None
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    damaged, covered = [], set()
    for manifest in manifests:
        try:
            writer = int(manifest.name[2 : -len(MANIFEST_SUFFIX)])
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            if rank == 0:
                damaged.append(f"{manifest.name}: unreadable ({err})")
            continue
        covered.update(files)
        if writer % world == rank:
            damaged.extend(f"{name}: {problem}" for name, e in files.items() if (problem := _check(path / name, e)))
    if rank == 0:
        damaged.extend(f"{name}: no checksum (its manifest is missing)" for name in data_files - covered)
    if world > 1:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, damaged)
        damaged = [line for lines in everyone for line in lines]
    return sorted(damaged)
