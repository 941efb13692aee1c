"""Time a DCP save and load with and without the per-file crc32 (training/checksums.py).

    python benchmarks/checkpoint_checksum_bench.py                 # 512 MiB of float32 state, 5 repeats
    python benchmarks/checkpoint_checksum_bench.py --mib 2048 --folder /scratch/bench

One process, no process group: ``dcp.save`` with DCP's ``FileSystemWriter`` (files fsynced, as in a run) against
``ChecksummingWriter``, and ``dcp.load`` alone against ``damaged_files`` (reading every file once and checking
its crc32) followed by the same load. The state is tensors of 8 MiB, like a model's and optimizer's shards.
Medians of the repeats, wall-clock and CPU time (all threads of the process: what the checksum costs a busy
host); the load side reads files the save just wrote, so from the page cache: what it measures is the checking's
CPU cost, the reading a cold cache adds is the file system's.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.checksums import ChecksummingWriter, damaged_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="state size in MiB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*assuming the intent is to")
    torch.manual_seed(0)
    state = {f"layer{i}": torch.randn(2 << 20) for i in range(args.mib // 8)}
    root = Path(tempfile.mkdtemp(dir=args.folder))
    names = ("save", "save + crc32", "load", "check + load")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    try:
        for _ in range(args.repeats):
            for name, writer in (("save", dcp.FileSystemWriter), ("save + crc32", ChecksummingWriter)):
                path = root / name.replace(" ", "")
                shutil.rmtree(path, ignore_errors=True)
                start = time.perf_counter(), time.process_time()
                dcp.save(state, storage_writer=writer(path))
                times[name].append((time.perf_counter() - start[0], time.process_time() - start[1]))
            path = root / "save+crc32"
            files = {p.name for p in path.glob("*.distcp")}
            for name in ("load", "check + load"):
                target = {k: torch.empty_like(v) for k, v in state.items()}
                start = time.perf_counter(), time.process_time()
                if name == "check + load":
                    assert damaged_files(path, files) == []
                dcp.load(target, checkpoint_id=str(path))
                times[name].append((time.perf_counter() - start[0], time.process_time() - start[1]))
    finally:
        shutil.rmtree(root)
    print(f"torch {torch.__version__}, {args.mib} MiB, median of {args.repeats}")
    for name, values in times.items():
        wall, cpu = (statistics.median(v) for v in zip(*values))
        print(f"{name:>14}: {wall:6.3f} s wall ({args.mib / 1024 / wall:5.2f} GiB/s), {cpu:6.3f} s CPU")


if __name__ == "__main__":
    main()
