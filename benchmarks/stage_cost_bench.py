"""Time the pieces of a pipeline stage on one GPU and print the rates planning/cost.py should use.

    python benchmarks/stage_cost_bench.py                                  # Qwen3-1.7B, 1 x 4096
    python benchmarks/stage_cost_bench.py --flavor 0.6B
    python benchmarks/stage_cost_bench.py --model llama3 --flavor 8B --seq-len 8192 --ac full
    python benchmarks/stage_cost_bench.py --out stage_cost.json
    python benchmarks/stage_cost_bench.py --losses chunked,cce,cross_entropy,cce_torch_compile,liger --write
    python benchmarks/stage_cost_bench.py --active-vocab 257 --losses cce --write   # cce's trained-model rate

Each piece forward + backward in bf16, built from the repository's modules as a run builds
them: one ``TransformerBlock`` with the recipe's activation checkpointing, compiled
(``parallelisms/activation_checkpoint.py``, ``parallelisms/compile.py``), and again with
``[float8]`` tensorwise linear layers (``parallelisms/float8.py``) where torchao and an sm_89+
GPU allow; the embedding; the
final norm (eager, as in the model); the ``OutputHead`` with each loss entry
(``losses.build_loss``, reduction "sum" as train.py) and one plain [T, D] x [D, V] GEMM,
which splits ``cross_entropy`` into its GEMMs and its logits traffic. Median of repeats
(``triton.testing.do_bench``, else CUDA events) after warm-up calls (compilation is not
timed). Prints each piece in ms and in decoder layers, the rate it achieved on the work the
cost model assigns it, and the model's current prediction; ``--write`` puts the achieved rates
into this GPU kind's table, ``planning/rates/<kind>.json`` (the cost model's rates for that GPU).

The head's random logits (std ``--logit-std``) are spread out, so ``cce``'s gradient filter
skips little; ``--active-vocab 257`` makes every id past the first 257 about 30 below the
rest, as a model trained with the byte tokenizer predicts, and draws targets among them.
"""

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from loss_bench import bench_ms, versions

from config.job_config import ActivationCheckpoint, Float8
from losses import ENTRIES, build_loss
from models import build_model_args
from models.output_head import OutputHead
from models.rope import rope_cos_sin
from models.transformer import TransformerBlock
from parallelisms.activation_checkpoint import apply_activation_checkpointing
from parallelisms.compile import apply_compile
from parallelisms.float8 import check_float8, convert_to_float8
from planning.cost import (
    DEFAULT_GPU,
    RATES,
    RATES_FOLDER,
    AchievedRates,
    StageCostInputs,
    embedding_bytes,
    head_flops,
    head_time,
    layer_flops,
    logits_bytes,
    norm_bytes,
    recomputed_blocks,
    stage_time,
)
from planning.gpu import gpu_kind

DTYPE = torch.bfloat16
LOSSES = tuple(ENTRIES)
DEFAULT_LOSSES = ("chunked", "cce", "cross_entropy")
GEMM_KEY = "head_matmul"  # the plain [T, D] x [D, V] GEMM's rate, a key of AchievedRates.head_tflops
_AC = {"none": ("none", "op"), "op": ("selective", "op"), "full": ("full", "op")}


def _time(fn, params) -> float:
    fn()  # compile, autotune, allocate
    torch.cuda.synchronize()
    return bench_ms(fn, params, torch.device("cuda"))


FLOAT8 = Float8(enable=True)  # tensorwise, as the recipes that turn it on


def float8_problem(device) -> str | None:
    """Why the float8 block cannot be timed here, or None."""
    try:
        check_float8(FLOAT8, device)
    except ValueError as err:
        return str(err)
    return None


def time_layer(c: StageCostInputs, device, float8: bool = False) -> float:
    a = c.model
    holder = nn.Module()  # the helpers walk a model's .layers, as train.py applies them
    holder.layers = nn.ModuleDict({"0": TransformerBlock(a).to(device, DTYPE)})
    if float8:
        convert_to_float8(holder, FLOAT8, dp_shard=1)
    apply_activation_checkpointing(holder, ActivationCheckpoint(c.ac_mode, c.ac_option))
    apply_compile(holder)
    block = holder.layers["0"]
    cos_sin = rope_cos_sin(a.head_dim, c.seq_len, a.rope_theta, a.rope_scaling, device)
    x = torch.randn(c.microbatch_size, c.seq_len, a.dim, device=device, dtype=DTYPE, requires_grad=True)
    grad = torch.randn_like(x)
    return _time(lambda: block(x, cos_sin).backward(grad), [x, *block.parameters()])


def time_embedding(c: StageCostInputs, device) -> float:
    a = c.model
    embedding = nn.Embedding(a.vocab_size, a.dim).to(device, DTYPE)
    tokens = torch.randint(0, a.vocab_size, (c.microbatch_size, c.seq_len), device=device)
    grad = torch.randn(c.microbatch_size, c.seq_len, a.dim, device=device, dtype=DTYPE)
    return _time(lambda: embedding(tokens).backward(grad), [embedding.weight])


def time_norm(c: StageCostInputs, device) -> float:
    a = c.model
    norm = nn.RMSNorm(a.dim, eps=a.norm_eps).to(device, DTYPE)
    x = torch.randn(c.microbatch_size, c.seq_len, a.dim, device=device, dtype=DTYPE, requires_grad=True)
    grad = torch.randn_like(x)
    return _time(lambda: norm(x).backward(grad), [x, norm.weight])


def head_inputs(c: StageCostInputs, device, logit_std: float, active_vocab: int):
    """The head (logits of std ``logit_std``), hidden states and labels; see the module doc for ``active_vocab``."""
    a = c.model
    head = OutputHead(a.dim, a.vocab_size).to(device, DTYPE)
    nn.init.normal_(head.weight, std=logit_std / a.dim**0.5)
    hidden = torch.randn(c.microbatch_size, c.seq_len, a.dim, device=device, dtype=DTYPE)
    labels = torch.randint(0, active_vocab or a.vocab_size, (c.microbatch_size, c.seq_len), device=device)
    if active_vocab:
        with torch.no_grad():
            hidden[..., 0] = 6.0
            head.weight[:active_vocab, 0] = 0.0
            head.weight[active_vocab:, 0] = -5.0
    return head, hidden.requires_grad_(), labels


def time_head(c: StageCostInputs, head, hidden, labels, device) -> float:
    loss = build_loss(c.loss, head, {}, reduction="sum", device=device)
    return _time(lambda: loss(hidden, labels).backward(), [hidden, head.weight])


def time_head_gemm(c: StageCostInputs, head, hidden) -> float:
    e = hidden.detach().flatten(0, 1)
    with torch.no_grad():
        return _time(lambda: torch.mm(e, head.weight.T), [])


def measure(c: StageCostInputs, device, logit_std: float, active_vocab: int, losses) -> dict[str, float]:
    """Median ms of every piece."""
    ms = {"layer": time_layer(c, device)}
    if (problem := float8_problem(device)) is None:
        ms["layer_float8"] = time_layer(c, device, float8=True)
    else:
        print(f"stage_cost_bench: float8 block not timed: {problem}")
    ms |= {"embedding": time_embedding(c, device), "norm": time_norm(c, device)}
    head, hidden, labels = head_inputs(c, device, logit_std, active_vocab)
    ms["head_gemm"] = time_head_gemm(c, head, hidden)
    for loss in losses:
        ms[loss] = time_head(dataclasses.replace(c, loss=loss), head, hidden, labels, device)
    return ms


def _head_key(loss: str) -> str:
    """The ``rates`` key of a loss entry's piece: the logits rate for an entry that moves bytes per
    logit beyond its GEMMs (its GEMMs run at its rate key's rate, timed alone), else its head rate."""
    facts = ENTRIES[loss].facts
    return "logits_gbs" if any(facts.logit_bytes) else f"head_tflops[{facts.rate_key}]"


def rates(c: StageCostInputs, ms: dict[str, float]) -> dict[str, float]:
    """What each piece achieved on the work the cost model assigns it (TFLOP/s or GB/s), keyed by
    ``AchievedRates``'s fields (``head_tflops[key]`` for its head rates)."""
    a, t = c.model, c.tokens
    fwd, bwd = layer_flops(a, c.seq_len, t)
    out = {
        "layer_tflops": (fwd + bwd + recomputed_blocks(c, 1) * fwd) / ms["layer"] / 1e9,
        **(
            {"layer_tflops_float8": (fwd + bwd + recomputed_blocks(c, 1) * fwd) / ms["layer_float8"] / 1e9}
            if "layer_float8" in ms
            else {}
        ),
        "embedding_gbs": sum(embedding_bytes(a, t)) / ms["embedding"] / 1e6,
        "norm_gbs": sum(norm_bytes(a, t)) / ms["norm"] / 1e6,
        f"head_tflops[{GEMM_KEY}]": 2 * t * a.dim * a.vocab_size / ms["head_gemm"] / 1e9,
    }
    for loss in [piece for piece in ms if piece in ENTRIES]:
        key, flops = _head_key(loss), sum(head_flops(a, loss, t))
        if key != "logits_gbs":
            out[key] = flops / ms[loss] / 1e9
            continue
        gemm_key = f"head_tflops[{ENTRIES[loss].facts.rate_key}]"
        gemm_ms = flops / out[gemm_key] / 1e9 if gemm_key in out else None
        if gemm_ms is not None and ms[loss] > gemm_ms:
            out[key] = sum(logits_bytes(a, loss, t)) / (ms[loss] - gemm_ms) / 1e6
    return out


def predicted(c: StageCostInputs, losses) -> dict[str, float]:
    """The current constants' prediction of each piece, ms."""
    middle = stage_time(c, 1, False, False).total_ms
    out = {
        "layer": middle,
        "layer_float8": stage_time(dataclasses.replace(c, float8=True), 1, False, False).total_ms,
        "embedding": stage_time(c, 1, True, False).total_ms - middle,
        "norm": sum(norm_bytes(c.model, c.tokens)) / c.rates.norm_gbs / 1e6,
        "head_gemm": 2 * c.tokens * c.model.dim * c.model.vocab_size / c.rates.head_tflops[GEMM_KEY] / 1e9,
    }
    for loss in losses:
        out[loss] = head_time(dataclasses.replace(c, loss=loss)).total_ms
    return out


def write_table(path: Path, achieved: dict[str, float], gpu: str, memory_gib: float, how: str) -> list[str]:
    """Put the achieved rates on ``gpu`` into its table ``path`` (planning/rates/<kind>.json), creating it, each
    figure with ``how`` it was measured in the table's notes; returns the keys written. Rates this run did
    not time (another run's losses, e.g. ``--active-vocab 257`` for cce) are kept as they are."""
    table = json.loads(path.read_text()) if path.is_file() else {"head_tflops": {}, "notes": {}}
    table["gpu"], table["memory_gib"] = gpu, round(memory_gib, 1)
    table["notes"]["memory_gib"] = "total_memory as torch reports it"
    written = []
    for key, value in achieved.items():
        if key.startswith("head_tflops["):
            name = key[len("head_tflops[") : -1]
            table["head_tflops"][name] = float(round(value))
            note = f"head_tflops.{name}"
        else:
            table[key] = float(round(value))
            note = key
        table["notes"][note] = how
        written.append(note)
    fields = [f.name for f in dataclasses.fields(AchievedRates)]
    table = {k: table[k] for k in (*fields, "notes") if k in table}
    required = {f.name for f in dataclasses.fields(AchievedRates) if f.default is dataclasses.MISSING}
    if missing := required - set(table):
        sys.exit(f"stage_cost_bench: {path} would lack {sorted(missing)}; time them in this run (--losses, defaults)")
    path.write_text(json.dumps(table, indent=1) + "\n")
    return written


def report(c: StageCostInputs, ms: dict, achieved: dict, model: dict, title: str) -> list[str]:
    unit = {"layer": "layer_tflops", "layer_float8": "layer_tflops_float8", "embedding": "embedding_gbs"}
    unit |= {"norm": "norm_gbs"}
    unit |= {"head_gemm": f"head_tflops[{GEMM_KEY}]"} | {loss: _head_key(loss) for loss in ENTRIES}
    lines = [title, f"{'piece (fw + bw)':<32}{'ms':>9}{'layers':>8}{'achieved':>16}{'model now':>11}"]
    for piece, value in ms.items():
        key = unit[piece]
        rate = f"{achieved[key]:,.0f} {'GB/s' if key.endswith('gbs') else 'TFLOP/s'}" if key in achieved else "-"
        label = {"head_gemm": "head GEMM [T,D]x[D,V] (fw)"}.get(
            piece, piece if piece in ("layer", "layer_float8", "embedding", "norm") else f"head + {piece}"
        )
        if key == "logits_gbs":
            label += " (traffic)"
        lines.append(f"{label:<32}{value:>9.3f}{value / ms['layer']:>8.3f}{rate:>16}{model[piece]:>11.3f}")
    for loss in [piece for piece in ms if piece in LOSSES]:
        lines.append(f"head + {loss} = {ms[loss] / ms['layer']:.2f} decoder layers (fw + bw) measured")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3", choices=["qwen3", "llama3"])
    parser.add_argument("--flavor", default="1.7B")
    parser.add_argument("--microbatch", type=int, default=1, help="sequences per microbatch")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--ac", default="op", choices=list(_AC), help="the block's activation checkpointing")
    parser.add_argument("--losses", default=",".join(DEFAULT_LOSSES), help=f"subset of {','.join(LOSSES)}")
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--active-vocab", type=int, default=0, help="e.g. 257 (see above); 0: all ids")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--write",
        action="store_true",
        help="put the achieved rates into this GPU's table, planning/rates/<h100|h200|...>.json (created if new)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("stage_cost_bench: needs a CUDA GPU (it times bf16 compiled blocks and cce's Triton kernels)")
    losses = [x for x in args.losses.split(",") if x]
    if unknown := set(losses) - set(LOSSES):
        parser.error(f"--losses: unknown {sorted(unknown)}; choose from {','.join(LOSSES)}")
    device = torch.device("cuda")
    mode, option = _AC[args.ac]
    env = versions(device)
    kind = gpu_kind(env["gpu"])
    c = StageCostInputs(
        build_model_args(args.model, args.flavor),
        args.seq_len,
        args.microbatch,
        "chunked",
        mode,
        option,
        rates=RATES.get(kind, RATES[DEFAULT_GPU]),  # "model now": this GPU's table, if it has one
    )
    torch.manual_seed(0)
    title = (
        f"{args.model} {args.flavor}, {args.microbatch} x {args.seq_len} tokens, AC {args.ac}, bf16, "
        f"logit std {args.logit_std}, active vocab {args.active_vocab or 'all'}; "
        + ", ".join(f"{k} {v}" for k, v in env.items())
    )
    ms = measure(c, device, args.logit_std, args.active_vocab, losses)
    achieved = rates(c, ms)
    model = predicted(c, losses)
    print("\n".join(report(c, ms, achieved, model, title)))
    if args.write:
        path = RATES_FOLDER / f"{kind}.json"
        how = f"{title}; {datetime.date.today()}; python benchmarks/stage_cost_bench.py {' '.join(sys.argv[1:])}"
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        print(f"wrote {', '.join(write_table(path, achieved, env['gpu'], memory, how))} to {path}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"out": str(args.out)},
                    "versions": env,
                    "ms": ms,
                    "layers": {k: v / ms["layer"] for k, v in ms.items()},
                    "achieved": achieved,
                    "model_now_ms": model,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
