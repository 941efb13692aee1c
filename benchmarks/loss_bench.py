"""Time and memory of every output loss against materialized-logits baselines.

For each shape (Qwen3-1.7B, Llama-3-8B, Gemma-2-2B output heads), token count and mode
(``fwd``: inputs without ``requires_grad``; ``fwd_bwd``: forward then ``backward()``), one
run prints a table with, per loss:

* ``ms``: median time (``triton.testing.do_bench``; CUDA events without triton), measured
  after warm-up calls, so compilation and autotuning are not timed;
* ``xfloor``: that time over the matmul floor: one bf16 ``torch.mm`` of [N, D] x [D, V]
  (2·N·D·V flops) for ``fwd``, three of them (6·N·D·V) for ``fwd_bwd``;
* ``MiB``: peak memory allocated by one call beyond what existed before it (hidden, weight,
  labels); in ``fwd_bwd`` this INCLUDES the new ``.grad`` of hidden and weight;
* ``rel_err``: |loss - ref| / |ref| against an fp32 reference computed chunk-wise over tokens
  from the same bf16 inputs; ``gh_err``/``gw_err`` (``fwd_bwd``, N <= 8192 only): max abs error
  of the hidden/weight gradient over the reference's max abs. ``ok`` is FAIL when rel_err >
  1e-3 or a grad error > 2e-2, OOM when the row ran out of memory (the run goes on).

Besides the ``losses`` registry entries that can run on the device (Liger-Kernel's fused linear
cross-entropy among them: the ``liger`` entry, skipped where ``liger-kernel`` is not installed),
two baselines, "materialized (eager)" = ``F.cross_entropy(F.linear(h, w).float(), targets)`` and
the same function under ``torch.compile``, and two peers, each skipped with the reason where it
cannot run: a TorchTitan-style loop over 8 token chunks (logits materialized per chunk, kept for the
backward), and PyTorch's own ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``
(its chunked path; torch 2.13 has it, 2.11 does not). ``chunked_filter`` is ``chunked`` with its gradient
filter on (``filter_eps="high"``). Inputs are random: hidden ~ N(0, 1), weight scaled so the logits have std
``--logit-std``; the gradient filters (cce's by default, ``chunked_filter``'s) skip blocks whose softmax is
below their ``filter_eps``, so their time depends on how peaked the softmax is: random logits skip almost
nothing. On CUDA, after the rows of each shape and token count, where one chunk of ``chunked`` spends its
time (``benchmarks/chunk_phases.py``: each GEMM's ms and TFLOP/s, each pass's ms and GB/s).

Run (GPU, bf16):    python benchmarks/loss_bench.py [--shapes gemma2_2b --tokens 8192 ...]
Smoke (CPU, fp32):  python benchmarks/loss_bench.py --smoke
See ``--help`` for the subsets. Each row prints as it finishes, with its wall time; compiled
entries compile once per shape and mode, so a full run takes minutes: split it with
``--shapes``/``--tokens`` where a run has a time limit. Figures go to docs/performance.md
together with the command line and the versions this script prints first.
"""

import argparse
import dataclasses
import gc
import importlib.metadata
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.chunk_phases import print_phases
from config.errors import ConfigError
from losses import LOSS_NAMES, build_loss
from models.output_head import OutputHead

try:
    import triton.testing
except ImportError:
    triton = None

IGNORE_INDEX = -100
LOSS_TOL, GRAD_TOL = 1e-3, 2e-2
GRAD_CHECK_MAX_TOKENS = 8192
REF_CHUNK = 1024  # tokens per fp32 reference chunk: 1 GiB of logits at V = 256k
SHAPES = {  # key: (name, dim, vocab)
    "qwen3_1p7b": ("Qwen3-1.7B", 2048, 151936),
    "llama3_8b": ("Llama-3-8B", 4096, 128256),
    "gemma2_2b": ("Gemma-2-2B", 2304, 256000),
}
SMOKE_SHAPE, SMOKE_TOKENS = ("tiny", 64, 1000), 256
BASELINES = {
    "materialized_eager": "materialized (eager)",
    "materialized_compile": "materialized (torch.compile)",
    "torchtitan_chunks": "TorchTitan-style 8 chunks",
    "torch_linear_ce": "F.linear_cross_entropy",
    "chunked_filter": "chunked filter_eps=high",
}
PEER_CHUNKS = 8


class Unavailable(Exception):
    """A peer that cannot run here; the message says why."""


def materialized(hidden, weight, labels):
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


materialized_compiled = torch.compile(materialized, dynamic=False)


def shifted_targets(labels):
    """[N] targets of a [1, N] batch: position t predicts labels[t + 1]; the last predicts nothing."""
    return F.pad(labels[0, 1:], (0, 1), value=IGNORE_INDEX)


def torchtitan_chunks(hidden, weight, labels):
    """Logits and cross-entropy chunk by chunk, summed; autograd keeps every chunk's logits."""
    targets, total = shifted_targets(labels), 0.0
    for h, t in zip(hidden[0].chunk(PEER_CHUNKS), targets.chunk(PEER_CHUNKS)):
        total = total + F.cross_entropy(F.linear(h, weight).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum()


def torch_linear_ce(weight):
    if not hasattr(F, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (2.13 has)")
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda hidden, labels: F.linear_cross_entropy(
        hidden[0], weight, shifted_targets(labels), ignore_index=IGNORE_INDEX, options=options
    )


@dataclasses.dataclass
class Entry:
    label: str  # as printed
    key: str  # a BASELINES key or a registry name
    options: dict

    def build(self, head, device):
        """A callable ``loss(hidden [1, N, D], labels [1, N]) -> scalar``."""
        if self.key == "materialized_eager":
            return lambda hidden, labels: materialized(hidden, head.weight, labels)
        if self.key == "materialized_compile":
            return lambda hidden, labels: materialized_compiled(hidden, head.weight, labels)
        if self.key == "torchtitan_chunks":
            return lambda hidden, labels: torchtitan_chunks(hidden, head.weight, labels)
        if self.key == "torch_linear_ce":
            return torch_linear_ce(head.weight)
        if self.key == "chunked_filter":
            return build_loss("chunked", head, {**self.options, "filter_eps": "high"}, device=device)
        return build_loss(self.key, head, self.options, device=device)


def entries(loss_keys, chunk_sizes):
    out = []
    for key in loss_keys:
        if key.startswith("chunked") and chunk_sizes:
            out += [Entry(f"{BASELINES.get(key, key)} cs={cs}", key, {"chunk_size": cs}) for cs in chunk_sizes]
        else:
            out.append(Entry(BASELINES.get(key, key), key, {}))
    return out


def bench_ms(fn, params, device, reps=20, warmup=3):
    """Median milliseconds of ``fn()``; ``params`` get ``.grad = None`` before every call."""
    if device.type == "cuda" and triton is not None:
        return triton.testing.do_bench(fn, grad_to_none=params, return_mode="median")
    times = []
    for _ in range(warmup + reps):
        for p in params:
            p.grad = None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[warmup:])


def reference(hidden, weight, labels, with_grads):
    """fp32 shifted mean cross-entropy (and grads), REF_CHUNK tokens at a time."""
    h, w = hidden[0].float(), weight.float()
    targets = labels[0, 1:]  # position t predicts labels[t + 1]; the last position is ignored
    n = targets.numel()
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    gh = torch.zeros_like(h) if with_grads else None
    gw = torch.zeros_like(w) if with_grads else None
    for s in range(0, n, REF_CHUNK):
        e, t = min(s + REF_CHUNK, n), targets[s : s + REF_CHUNK]
        logits = h[s:e] @ w.T
        lse = logits.logsumexp(-1)
        total += (lse - logits.gather(1, t[:, None])[:, 0]).sum(dtype=torch.float64)
        if with_grads:
            p = logits.sub_(lse[:, None]).exp_()
            p[torch.arange(e - s, device=h.device), t] -= 1
            p /= n
            gh[s:e] = p @ w
            gw.addmm_(p.T, h[s:e])
    return (total / n).item(), gh, gw


def rel_max_err(got, ref):
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def measure(loss_fn, hidden, weight, labels, mode, ref, device):
    """Correctness on the first (warm-up) call, then peak memory of one call, then time."""
    params = [hidden, weight]
    if mode == "fwd":
        step = lambda: loss_fn(hidden, labels)  # noqa: E731
    else:
        step = lambda: loss_fn(hidden, labels).backward()  # noqa: E731
    row = {}
    loss = loss_fn(hidden, labels)
    row["rel_err"] = abs(loss.item() - ref["loss"]) / abs(ref["loss"])
    if mode == "fwd_bwd":
        loss.backward()
        if ref["grad_hidden"] is not None:
            row["gh_err"] = rel_max_err(hidden.grad[0], ref["grad_hidden"])
            row["gw_err"] = rel_max_err(weight.grad, ref["grad_weight"])
    del loss
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        step()  # a second warm-up; no memory figure on the CPU
    row["ms"] = bench_ms(step, params, device)
    bad = row["rel_err"] > LOSS_TOL or max(row.get("gh_err", 0), row.get("gw_err", 0)) > GRAD_TOL
    row["ok"] = "FAIL" if bad else "ok"
    return row


def bench_case(name, head, n, args, device, skipped):
    """Every entry and mode for one shape and token count; yields table rows."""
    vocab, dim = head.weight.shape
    hidden = torch.randn(1, n, dim, device=device, dtype=head.weight.dtype)
    labels = torch.randint(0, vocab, (1, n), device=device)
    with torch.no_grad():
        mm_ms = bench_ms(lambda: torch.mm(hidden[0], head.weight.T), [], device)
        check_grads = "fwd_bwd" in args.modes and n <= GRAD_CHECK_MAX_TOKENS
        loss, gh, gw = reference(hidden, head.weight, labels, check_grads)
    ref = {"loss": loss, "grad_hidden": gh, "grad_weight": gw}
    grads_mib = (hidden.numel() + head.weight.numel()) * hidden.element_size() / 2**20
    print(
        f"\n== {name} D={dim} V={vocab} N={n}: mm {mm_ms:.3f} ms "
        f"({2 * n * dim * vocab / mm_ms / 1e9:.0f} TFLOP/s); floor fwd {mm_ms:.3f} ms, "
        f"fwd_bwd {3 * mm_ms:.3f} ms; grads {grads_mib:.0f} MiB; ref loss {loss:.6f}"
    )
    print(fmt_header())
    for mode in args.modes:
        for p in (hidden, head.weight):
            p.requires_grad_(mode == "fwd_bwd")
        for entry in entries(args.losses, args.chunk_sizes):
            if entry.label in skipped:
                continue
            try:
                loss_fn = entry.build(head, device)
            except (ConfigError, Unavailable) as e:  # e.g. cce without CUDA, a peer not installed
                print(f"skip {entry.label}: {e}")
                skipped.add(entry.label)
                continue
            label = f"auto -> {loss_fn.choice.entry}" if entry.key == "auto" else entry.label
            row = {"shape": name, "tokens": n, "mode": mode, "loss": label}
            t0 = time.perf_counter()
            try:
                row |= measure(loss_fn, hidden, head.weight, labels, mode, ref, device)
                row["floor_ms"] = mm_ms * (3 if mode == "fwd_bwd" else 1)
                row["x_floor"] = row["ms"] / row["floor_ms"]
            except torch.cuda.OutOfMemoryError:
                row["ok"] = "OOM"
            except Exception:  # one broken entry must not cost the rest of a GPU run
                traceback.print_exc()
                row["ok"] = "ERROR"
            del loss_fn
            hidden.grad = head.weight.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(fmt_row(row) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            yield row
    if device.type == "cuda" and triton is not None and any(key.startswith("chunked") for key in args.losses):
        print_phases(hidden[0].detach(), head.weight.detach(), shifted_targets(labels), IGNORE_INDEX, bench_ms, device)


COLUMNS = [  # (key, header, width, format)
    ("shape", "shape", 11, "s"),
    ("tokens", "tokens", 6, "d"),
    ("mode", "mode", 7, "s"),
    ("loss", "loss", 28, "s"),
    ("ms", "ms", 9, ".3f"),
    ("x_floor", "xfloor", 6, ".2f"),
    ("mib", "MiB", 9, ".1f"),
    ("rel_err", "rel_err", 8, ".1e"),
    ("gh_err", "gh_err", 8, ".1e"),
    ("gw_err", "gw_err", 8, ".1e"),
    ("ok", "ok", 5, "s"),
]
LEFT = ("shape", "mode", "loss")


def fmt_row(row):
    cells = [format(row[k], f) if row.get(k) is not None else "-" for k, _, _, f in COLUMNS]
    return " ".join(c.ljust(w) if k in LEFT else c.rjust(w) for c, (k, _, w, _) in zip(cells, COLUMNS))


def fmt_header():
    return " ".join(h.ljust(w) if k in LEFT else h.rjust(w) for k, h, w, _ in COLUMNS)


def versions(device):
    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "none (CPU smoke)"
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": dist("triton"),
        "cut_cross_entropy": dist("cut-cross-entropy"),
        "liger_kernel": dist("liger-kernel"),
        "gpu": gpu,
    }


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ints = lambda s: [int(x) for x in names(s)]  # noqa: E731
    choices = {"--shapes": list(SHAPES), "--losses": [*BASELINES, *LOSS_NAMES], "--modes": ["fwd", "fwd_bwd"]}
    for flag, known in choices.items():
        p.add_argument(flag, type=names, default=known, help=f"subset of {','.join(known)}")
    p.add_argument("--tokens", type=ints, default=[8192, 32768], help="token counts N")
    p.add_argument("--chunk-sizes", type=ints, default=[], help="sweep chunked's chunk_size")
    p.add_argument("--logit-std", type=float, default=1.0, help="std of the random logits")
    p.add_argument("--json", type=Path, help="also write every row to this file as JSON lines")
    p.add_argument("--smoke", action="store_true", help="a tiny fp32 case on the CPU, no memory")
    args = p.parse_args()
    for flag, known in choices.items():
        if unknown := set(getattr(args, flag[2:])) - set(known):
            p.error(f"{flag}: unknown {sorted(unknown)}; choose from {','.join(known)}")
    return args


def print_header(env, args, dtype):
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"dtype {dtype}, batch 1 x N tokens (the loss shifts the labels), logits std {args.logit_std}")
    print("ms: median of repeated calls after warm-up; xfloor: ms / floor, where floor = one mm")
    print("  [N,D]x[D,V] (2NDV flops) for fwd and three (6NDV) for fwd_bwd")
    print("MiB: peak allocated by one call beyond the inputs, INCLUDING the new .grad of hidden")
    print("  and weight in fwd_bwd (their size is the 'grads' figure of each shape)")
    print(
        f"FAIL: loss rel_err > {LOSS_TOL:g} vs an fp32 chunked reference, or gh_err/gw_err > "
        f"{GRAD_TOL:g} (grads checked in fwd_bwd for N <= {GRAD_CHECK_MAX_TOKENS})"
    )


def main():
    args = parse_args()
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shapes, token_counts = [SMOKE_SHAPE], [SMOKE_TOKENS]
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes, token_counts = [SHAPES[k] for k in args.shapes], args.tokens
    else:
        sys.exit("loss_bench: no CUDA device; use --smoke for the CPU check")
    env = versions(device)
    print_header(env, args, dtype)
    torch.set_float32_matmul_precision("highest")  # the reference is true fp32
    # Each shape compiles its own static graph, as a fixed-length training run would.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 64
    torch.manual_seed(0)

    rows, skipped = [], set()
    json_file = args.json.open("w") if args.json else None
    for name, dim, vocab in shapes:
        with torch.device(device):
            head = OutputHead(dim, vocab).to(dtype)
        torch.nn.init.normal_(head.weight, std=args.logit_std / dim**0.5)
        case = {"dim": dim, "vocab": vocab, "dtype": str(dtype), "logit_std": args.logit_std}
        for n in token_counts:
            for row in bench_case(name, head, n, args, device, skipped):
                rows.append(row)
                if json_file:
                    json_file.write(json.dumps(row | case | env) + "\n")
                    json_file.flush()
        del head
    if json_file:
        json_file.close()

    print("\n" + fmt_header())
    for row in rows:
        print(fmt_row(row))
    sys.exit(1 if any(r["ok"] in ("FAIL", "ERROR") for r in rows) else 0)


if __name__ == "__main__":
    main()
