"""Forward + backward of the output loss per rank, classifier gathered vs vocab-parallel.

    torchrun --nproc_per_node=2 benchmarks/vocab_parallel_bench.py [--tokens 8192 --dim 2048 --vocab 151936]

Each rank holds N tokens of hidden states (bf16) and its FSDP shard of the
classifier (fp32 master rows). Three ways to get the loss and all gradients:
- gathered + cce: all-gather the classifier (bf16), cut-cross-entropy on the full
  matrix, reduce-scatter its gradient (fp32) — what FSDP does around the `cce` loss;
- gathered + cross_entropy: the same gather, materialized fp32 logits;
- vocab-parallel: all-gather the hidden states and labels, the vocab-parallel loss
  (CCE kernels) on this rank's rows, reduce-scatter the hidden-state gradient.
Prints the median time (CUDA events) and the peak extra memory, maximum over ranks.
"""

import argparse
import os
import statistics

import torch
import torch.distributed as dist
import torch.nn.functional as F

from losses.vocab_parallel import VocabParallelOptions, vocab_parallel_linear_cross_entropy
from parallelisms.vocab_parallel import gather_rows


def gathered(loss_kind: str, e, shard, targets, group):
    n = dist.get_world_size(group)
    full = torch.empty(shard.shape[0] * n, shard.shape[1], device=e.device, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(full, shard.detach().to(torch.bfloat16), group=group)
    full.requires_grad_()
    if loss_kind == "cce":
        from cut_cross_entropy import linear_cross_entropy

        loss = linear_cross_entropy(e, full, targets, reduction="sum")
    else:
        loss = F.cross_entropy(F.linear(e, full).float(), targets, reduction="sum")
    loss.backward()
    grad = torch.empty_like(shard)
    dist.reduce_scatter_tensor(grad, full.grad.float(), group=group)
    return loss


def vocab_parallel(e, shard, targets, group):
    rank = dist.get_rank(group)
    rows = shard.shape[0]
    options = VocabParallelOptions(rank * rows, (rank + 1) * rows, group, reduce_e_grad=False)
    e_all = gather_rows(e, group)
    t_all = gather_rows(targets, group)
    loss = vocab_parallel_linear_cross_entropy(
        e_all, shard.to(torch.bfloat16), t_all, options, reduction="sum", impl="cce"
    )
    loss.backward()
    return loss


def measure(fn, reset, repeats: int = 10) -> tuple[float, float]:
    """Median ms of ``fn`` and its peak memory beyond what exists before it (inputs, no grads)."""
    for _ in range(3):
        reset()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    reset()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.tensor([(torch.cuda.max_memory_allocated() - base) / 2**20], device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return statistics.median(times), peak.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="per rank")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    args = parser.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    group, n, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    assert args.vocab % n == 0, "use a vocabulary that divides the world size for this benchmark"
    gen = torch.Generator(device="cuda").manual_seed(rank)
    e = torch.randn(args.tokens, args.dim, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
    shard_gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    shard = (torch.randn(args.vocab // n, args.dim, device="cuda", generator=shard_gen) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=gen)

    def reset():
        e.grad = shard.grad = None

    rows = []
    for label, fn in [
        ("gathered classifier + cce", lambda: gathered("cce", e, shard, targets, group)),
        ("gathered classifier + cross_entropy", lambda: gathered("ce", e, shard, targets, group)),
        ("vocab-parallel head (cce kernels)", lambda: vocab_parallel(e, shard, targets, group)),
    ]:
        ms, mib = measure(fn, reset)
        rows.append((label, ms, mib))
    if rank == 0:
        print(
            f"{n} ranks x {args.tokens} tokens, dim {args.dim}, vocab {args.vocab}, bf16; "
            f"torch {torch.__version__}, {torch.cuda.get_device_name()}"
        )
        print(f"{'loss':<38}{'ms':>9}{'peak extra MiB':>16}")
        for label, ms, mib in rows:
            print(f"{label:<38}{ms:>9.2f}{mib:>16,.0f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
