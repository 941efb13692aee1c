"""Where a profiled step's GPU time went: ``python scripts/trace_summary.py <rank0_trace.json> [--top 15]``.

Reads a trace written by ``[profiling]`` (``training/profiling.py``) and prints the step's
wall time, the GPU's busy time (kernels and copies, overlaps merged) and the idle rest, GPU
time by kind of kernel (matmul, attention, communication, Triton, optimizer, casts, other), the
longest kernels with their kind, and the longest idle gaps: the kernels on either side and the
host op that launched the one after (what the GPU waited for). Communication overlaps compute on
its own stream, so kinds add up to more than the busy time when it is hidden.
"""

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

KINDS = [  # (kind, pattern on the kernel name), first match wins
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm\d+_.*(h|b)mma|matmul"),
    # dtype casts and copy kernels: FSDP's per-block casts of the parameters and its gradient concatenation,
    # and torch._foreach_copy_ between dtypes (CopyFunctor: one rank's bf16 copies cast again for a
    # resharded block's backward), which would otherwise count as the optimizer's foreach kernels
    ("casts", r"_copy_kernel|chunk_cat|split_with_sizes_copy|copyfunctor"),
    ("optimizer", r"multi_tensor|adam"),
    ("triton", r"^triton|_kernel$"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other")


# Namespaces that fill a C++ kernel's name before what tells it apart (a foreach kernel's functor comes
# after some 130 characters of them).
_NAMESPACES = re.compile(r"^void |at::native::|\(anonymous namespace\)::|at_cuda_detail::|c10::")


def short_name(name: str) -> str:
    """``name`` without the namespaces, so a printed line of it reaches what the kernel does."""
    return _NAMESPACES.sub("", name)


def _merged_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _launcher(kernel: dict, launches: dict, host_ops: list[dict]) -> str:
    """The innermost host op around the runtime call that launched ``kernel`` (by correlation id), with the
    op around that: "outer > inner"."""
    launch = launches.get((kernel.get("args") or {}).get("correlation"))
    if launch is None:
        return "?"
    around = [op for op in host_ops if op["ts"] <= launch["ts"] <= op["ts"] + op["dur"] and op["tid"] == launch["tid"]]
    around.sort(key=lambda op: op["dur"])
    return " > ".join(str(op["name"])[:60] for op in reversed(around[:2])) or "?"


def idle_gaps(events: list[dict], top: int) -> list[dict]:
    """The ``top`` longest stretches between the trace's first and last kernel with no kernel or copy running:
    their length, the kernel before and after, and what launched the one after."""
    gpu = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
        key=lambda e: e["ts"],
    )
    launches = {
        (e.get("args") or {}).get("correlation"): e for e in events if e.get("cat") == "cuda_runtime" and "dur" in e
    }
    host_ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and "dur" in e]
    gaps, last = [], None  # last: the kernel that ends latest so far
    for e in gpu:
        if last is not None and e["ts"] > last["ts"] + last["dur"]:
            gaps.append({"us": e["ts"] - (last["ts"] + last["dur"]), "before": last, "after": e})
        if last is None or e["ts"] + e["dur"] > last["ts"] + last["dur"]:
            last = e
    gaps = sorted(gaps, key=lambda g: -g["us"])[:top]
    return [
        {
            "us": g["us"],
            "before": g["before"]["name"],
            "after": g["after"]["name"],
            "launched_by": _launcher(g["after"], launches, host_ops),
        }
        for g in gaps
    ]


def summarize(events: list[dict]) -> dict:
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#") and "dur" in e]
    by_kind, by_name = defaultdict(float), {}
    for e in gpu:
        name = e["name"] if e["cat"] == "kernel" else e["cat"]
        kind = kind_of(name) if e["cat"] == "kernel" else "copies"
        by_kind[kind] += e["dur"]
        us, calls, _ = by_name.get(name, (0.0, 0, kind))
        by_name[name] = (us + e["dur"], calls + 1, kind)
    wall = max((e["dur"] for e in steps), default=0.0)
    busy = _merged_length([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    return {"wall_us": wall, "busy_us": busy, "by_kind": dict(by_kind), "by_name": dict(by_name)}


_FIX = "pass a rank<r>_trace.json(.gz) that [profiling] wrote under <dump_folder>/profile_traces/iteration_<N>/"


def _load(path: Path) -> list[dict]:
    """The trace's events; a missing, unreadable or foreign file is a ValueError of one line naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            trace = json.load(f)
    except (OSError, EOFError) as err:  # missing, a folder, unreadable, not gzip or a cut gzip
        raise ValueError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err}); {_FIX}") from None
    except ValueError as err:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not a JSON trace ({err}); {_FIX}") from None
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise ValueError(f"{path}: no traceEvents list, so no profiler trace; {_FIX}")
    return trace["traceEvents"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace", type=Path, help="a rank<r>_trace.json(.gz) from [profiling]")
    parser.add_argument("--top", type=int, default=15, help="how many of the longest kernels to list")
    parser.add_argument("--gaps", type=int, default=8, help="how many of the longest idle gaps to list")
    args = parser.parse_args()
    try:
        events = _load(args.trace)
    except ValueError as err:
        print(f"trace_summary: {err}", file=sys.stderr)
        return 2
    s = summarize(events)
    wall, busy = s["wall_us"], s["busy_us"]
    print(
        f"step wall {wall / 1e3:.1f} ms; GPU busy {busy / 1e3:.1f} ms"
        + (f" ({100 * busy / wall:.0f} %), idle {(wall - busy) / 1e3:.1f} ms" if wall else "")
    )
    print(f"\n{'kind':<14} {'ms':>9} {'% of busy':>9}")
    for kind, us in sorted(s["by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"{kind:<14} {us / 1e3:>9.1f} {100 * us / busy if busy else 0:>8.1f}%")
    print(f"\n{'ms':>9} {'calls':>6}  {'kind':<13} kernel")
    for name, (us, calls, kind) in sorted(s["by_name"].items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{us / 1e3:>9.1f} {calls:>6}  {kind:<13} {short_name(name)[:110]}")
    gaps = idle_gaps(events, args.gaps)
    if gaps:
        print(f"\n{'idle ms':>9}  kernel before -> kernel after, launched by (host op)")
        for g in gaps:
            before, after = (short_name(g[side])[:50] for side in ("before", "after"))
            print(f"{g['us'] / 1e3:>9.2f}  {before} -> {after}, launched by {g['launched_by']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
