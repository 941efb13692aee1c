"""Time one optimizer step of a recipe's model on one GPU, against the memory-bandwidth floor.

    python benchmarks/optimizer_bench.py                                 # Qwen3-1.7B (configs/qwen3_1p7b.toml)
    python benchmarks/optimizer_bench.py --config configs/qwen3_1p7b.toml --reps 20 --warmup 3

The model is built as train.py builds it on one rank (meta init, ``parallelize`` on a 1-rank mesh,
``to_empty``, ``init_weights``: plain fp32 parameters, no FSDP) and its gradients come from one real
forward and backward of a short batch on its bf16 ``ComputeWeights`` (sum of squared hidden states),
so the optimizer sees train.py's parameters and gradients. Timed with CUDA events around
``optimizer.step()`` (host dispatch included), median of ``--reps`` after ``--warmup``:
- ``torch, fp32 grads``: ``torch.optim.AdamW(fused=True)`` over the parameters (``optimizer.implementation
  = "torch"``);
- ``flat, fp32 grads``: ``training/flat_adamw.py`` (``"flat"``);
- ``flat, bf16 cast``: the bf16 gradients first cast into fp32 ``.grad`` (what one rank did before its
  gradients stayed bf16), then ``flat``;
- ``flat, bf16 grads``: ``flat`` reading the bf16 gradients (training/adamw_kernel.py);
- ``+ copies cast``: that, then the bf16 compute weights cast from the new fp32 ones (``_foreach_copy_``), as
  one rank's forward did before the optimizer wrote them;
- ``+ copies written``: ``flat`` writing the bf16 copies as it updates (what one rank runs,
  parallelisms/compute_weights.py);
- ``floor``: ``torch._fused_adamw_`` (and its step increment) on fresh plain tensors of the same shapes,
  what the kernel takes without anything around it.
GB moved per step: every element's parameter and two moments read and written, its gradient read, at their
dtype's size (and the gradient cast's bf16 read and fp32 write, the copies' fp32 read and bf16 write, or
their bf16 write). Also prints the largest parameter differences after
3 steps from the same weights and gradients between ``torch`` and ``flat``, and between the bf16 rows.
Without CUDA it prints one line and exits 0.
"""

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config.job_config import JobConfig
from models import Transformer, build_model_args
from models.initialize import init_weights
from parallelisms.compute_weights import ComputeWeights
from parallelisms.distributed import close_distributed, init_distributed
from parallelisms.local_tensor import local_tensor
from parallelisms.parallel_dims import ParallelDims
from parallelisms.parallelize import parallelize
from training.optimizer import build_optimizer
from training.recipe import load_recipe

CHECK_STEPS = 3


def build_model(cfg: JobConfig, device: torch.device) -> Transformer:
    """The recipe's model on one rank, as train.py builds it, with gradients from one forward and backward."""
    dims = ParallelDims.from_config(cfg.parallelism, 1)
    mesh, _ = dims.build_mesh(device.type)
    args = replace(build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size), max_seq_len=512)
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, cfg, dims.fsdp_mesh(mesh), cfg.training.mixed_precision_param, pp_enabled=False)
    model.to_empty(device=device)
    init_weights(model, cfg.training.seed, device)
    tokens = torch.randint(0, args.vocab_size, (1, args.max_seq_len), device=device)
    dtype, reshard = getattr(torch, cfg.training.mixed_precision_param), cfg.parallelism.fsdp_reshard_after_forward
    with ComputeWeights([model], dtype, reshard, pp_enabled=False):
        model(tokens).float().square().mean().backward()
    return model


def time_ms(step, reps: int, warmup: int) -> float:
    """Median milliseconds of ``step()`` between CUDA events."""
    times = []
    for _ in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[warmup:])


def floor_step(params: list[torch.Tensor], cfg: JobConfig):
    """A step of ``torch._fused_adamw_`` on fresh plain tensors shaped as ``params``' local shards."""
    locals_ = [local_tensor(p).detach().clone() for p in params]
    grads = [local_tensor(p.grad).clone() for p in params]
    exp_avgs, exp_avg_sqs = [torch.zeros_like(t) for t in locals_], [torch.zeros_like(t) for t in locals_]
    steps = [torch.zeros((), device=t.device) for t in locals_]
    o = cfg.optimizer

    def step() -> None:
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(
            locals_,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=o.lr,
            beta1=o.betas[0],
            beta2=o.betas[1],
            weight_decay=o.weight_decay,
            eps=o.eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/qwen3_1p7b.toml")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("optimizer_bench: no CUDA device, nothing timed")
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    init_distributed(device, 600)
    try:
        # Nothing is compiled: the forward only makes the gradients.
        cfg = load_recipe(["--config", args.config, "--compile.enable", "false"])
        model = build_model(cfg, device)
        params = list(model.parameters())
        start = [local_tensor(p).detach().clone() for p in params]
        fp32_grads = [p.grad for p in params]
        bf16_grads = [g.bfloat16() for g in fp32_grads]
        for p in params:
            p.grad_dtype = None  # the bf16 rows hand them bf16 gradients, as ComputeWeights does
        # Parameter and both moments read and written, the gradient read (and, for the cast, written in fp32 too).
        numel = sum(local_tensor(p).numel() for p in params)
        moved = {
            "fp32 grads": 28 * numel,
            "bf16 cast": (28 + 6) * numel,
            "bf16 grads": 26 * numel,
            "bf16 grads + copies cast": (26 + 6) * numel,
            "bf16 grads + copies written": (26 + 2) * numel,
        }
        copies = {p: torch.empty_like(local_tensor(p), dtype=torch.bfloat16) for p in params}

        def cast_then(step):
            def run() -> None:
                for p, g in zip(params, bf16_grads):
                    p.grad = g.to(torch.float32)
                step()

            return run

        def then_cast_copies(step):
            def run() -> None:
                step()
                torch._foreach_copy_(list(copies.values()), [local_tensor(p) for p in copies])

            return run

        def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            return max((x - y).abs().max().item() for x, y in zip(a, b))

        # Parameters after CHECK_STEPS steps, kept only while a later row is compared with them (each is the
        # model's size: every row's at once would not fit beside the optimizer on an 80 GB GPU).
        rows, kept, bf16_difference = [], {}, 0.0
        for implementation, grads in (
            ("torch", "fp32 grads"),
            ("flat", "fp32 grads"),
            ("flat", "bf16 cast"),
            ("flat", "bf16 grads"),
            ("flat", "bf16 grads + copies cast"),
            ("flat", "bf16 grads + copies written"),
        ):
            with torch.no_grad():
                for p, s in zip(params, start):
                    local_tensor(p).copy_(s)
            for p, g32, g16 in zip(params, fp32_grads, bf16_grads):  # the cast row casts its own before each step
                p.grad = g16 if grads.startswith("bf16 grads") else g32
            written = copies if grads.endswith("written") else None
            optimizer = build_optimizer(params, replace(cfg.optimizer, implementation=implementation), written)
            step = {"bf16 cast": cast_then, "bf16 grads + copies cast": then_cast_copies}.get(grads, lambda f: f)(
                optimizer.step
            )
            for _ in range(CHECK_STEPS):
                step()
            after = [local_tensor(p).detach().clone() for p in params]
            if implementation == "torch":
                kept["torch"] = after
                largest = max(t.abs().max().item() for t in after)
            elif grads == "fp32 grads":
                difference = max_difference(kept.pop("torch"), after)
            elif grads == "bf16 cast":
                kept["bf16 cast"] = after
            else:
                bf16_difference = max(bf16_difference, max_difference(kept["bf16 cast"], after))
            del after
            rows.append((f"{implementation}, {grads}", time_ms(step, args.reps, args.warmup), moved[grads]))
            del optimizer
        copies_equal = all(torch.equal(c, local_tensor(p).bfloat16()) for p, c in copies.items())
        del start, kept
        for p, g in zip(params, fp32_grads):
            p.grad = g
        rows.append(("floor", time_ms(floor_step(params, cfg), args.reps, args.warmup), moved["fp32 grads"]))
        print(
            f"{cfg.model.name} {cfg.model.flavor}: {numel / 1e9:.3f} B parameters in "
            f"{len(params)} tensors, {torch.cuda.get_device_name(device)}, torch {torch.__version__}; "
            f"median of {args.reps} steps"
        )
        print(f"{'optimizer, gradients':<36}{'ms':>8}{'GB moved':>10}{'GB/s':>8}")
        for name, ms, nbytes in rows:
            print(f"{name:<36}{ms:>8.2f}{nbytes / 1e9:>10.1f}{nbytes / 1e6 / ms:>8.0f}")
        print(
            f"max |torch - flat| over the parameters after {CHECK_STEPS} steps: {difference:.3g}; "
            f"max |bf16 cast - bf16 grads rows|: {bf16_difference:.3g} (largest |parameter| {largest:.3g}); "
            f"written copies are the parameters' casts: {copies_equal}"
        )
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
