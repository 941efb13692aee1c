"""Steady-state training throughput of a recipe: tokens/s/GPU, MFU and peak memory per rank.

    python benchmarks/train_bench.py --nproc 1 --config configs/qwen3_1p7b.toml --steps 30 --warmup 10 \
        -- --loss.name cce
    python benchmarks/train_bench.py --nproc 1 --config configs/qwen3_1p7b.toml --steps 20 --warmup 8 \
        --variants "causal=--model.attn_mask_type causal;block_causal=--model.attn_mask_type block_causal"

Runs ``train.py`` under torchrun with ``--metrics.log_freq 1``, drops the first
``--warmup`` steps (compilation, allocator growth), and reports the median of the
rest from ``metrics.jsonl``; peak memory per rank comes from ``memory.json``,
which train.py writes at the end. Figures go to docs/performance.md with the
command, GPU and versions.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, nproc: int, steps: int, warmup: int, extra: list[str], label: str, log_dir: Path) -> dict:
    dump = Path(tempfile.mkdtemp(prefix="train_bench_"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        "train.py",
        "--config",
        config,
        "--training.steps",
        str(steps),
        "--metrics.log_freq",
        "1",
        "--job.dump_folder",
        str(dump),
        *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    log_path = log_dir / f"{label}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        return {"label": label, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "loss" in r]  # a fresh folder: the run's start record, then steps
    steady = [r for r in rows if r["step"] > warmup] or rows
    memory = json.loads((dump / "memory.json").read_text())
    mfu = [r["mfu_percent"] for r in steady if r["mfu_percent"] is not None]
    return {
        "label": label,
        "tokens_per_second_per_gpu": statistics.median(r["tokens_per_second"] for r in steady),
        "mfu_percent": statistics.median(mfu) if mfu else None,
        "peak_memory_gib_per_rank": memory["peak_memory_gib_per_rank"],
        "stages_per_rank": memory["stages_per_rank"],
        "losses": [r["loss"] for r in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--variants",
        default="",
        help="';'-separated label=overrides, e.g. 'cce=--loss.name cce;ce=--loss.name cross_entropy'",
    )
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "."), help="each variant's train.py output")
    parser.add_argument("extra", nargs="*", help="overrides applied to every variant (after --)")
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in args.variants.split(";") if v] or [["run", ""]]
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    results = []
    for label, overrides in variants:
        result = run(
            args.config, args.nproc, args.steps, args.warmup, args.extra + overrides.split(), label, Path(args.log_dir)
        )
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{args.config}, {args.nproc} process(es), median of steps {args.warmup + 1}..{args.steps}")
    print(f"{'variant':<24}{'tok/s/GPU':>12}{'MFU %':>8}  peak GiB per rank (stages)")
    for r in results:
        if "error" in r:
            print(f"{r['label']:<24}  FAILED {r['error'][:300]}")
            continue
        mem = ", ".join(
            f"{m:.1f}" + (f" {s}" if s else "") for m, s in zip(r["peak_memory_gib_per_rank"], r["stages_per_rank"])
        )
        mfu = f"{r['mfu_percent']:.1f}" if r["mfu_percent"] is not None else "-"
        print(f"{r['label']:<24}{r['tokens_per_second_per_gpu']:>12,.0f}{mfu:>8}  {mem}")


if __name__ == "__main__":
    main()
