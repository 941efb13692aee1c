"""Where one chunk of the ``chunked`` loss spends its time on CUDA, kernel by kernel, for loss_bench.

For one chunk as long as ``chunked``'s default for the shape: the logits GEMM, the two passes over the
``[chunk, V]`` block (``losses/kernels/chunked_triton.py``) and the two gradient GEMMs, each GEMM with its
achieved TFLOP/s (2 x chunk x D x V flops), each pass with its GB/s (the bytes it reads and writes); and,
outside the sum, the classifier gradient's GEMM writing instead of adding, which prices its read-back.
"""

import torch

from losses.kernels.chunked import _local_targets, auto_chunk_size


def phases(e, c, targets, ignore_index):
    """[(name, function, flops, bytes moved, in the sum)] for the chunk ``e [chunk, D]``; no bias, softcap
    or smoothing. The last is not part of a chunk: the classifier gradient written instead of added to, as
    only the first chunk does, so the difference is what reading it back costs each of the others."""
    from losses.kernels import chunked_triton

    m, d = e.shape
    v = c.shape[0]
    col, owned, valid = _local_targets(targets, 0, v, ignore_index)
    weight = valid.float() / valid.sum().clamp(min=1)
    logits = e @ c.T
    row_max, sums = chunked_triton.row_stats(logits, col, owned, False, 0.0)
    lse = row_max + sums[0].log()
    scratch = logits.clone()  # the gradient pass writes over its block
    grad_e, grad_c = torch.empty_like(e), torch.zeros_like(c)
    gemm, block = 2 * m * d * v, m * v * e.element_size()
    return [
        ("logits GEMM (cuBLAS)", lambda: torch.mm(e, c.T, out=scratch), gemm, 0, True),
        ("row statistics pass", lambda: chunked_triton.row_stats(logits, col, owned, False, 0.0), 0, block, True),
        (
            "logit gradient pass",
            lambda: chunked_triton.logit_grad(scratch, lse, col, owned, weight, v, 0.0, 0.0, 0.0),
            0,
            2 * block,
            True,
        ),
        ("dH GEMM (cuBLAS)", lambda: torch.mm(logits, c, out=grad_e), gemm, 0, True),
        ("dW GEMM adding to it (cuBLAS)", lambda: grad_c.addmm_(logits.T, e), gemm, 0, True),
        ("(dW GEMM writing it instead)", lambda: torch.mm(logits.T, e, out=grad_c), gemm, 0, False),
    ]


def print_phases(hidden, weight, targets, ignore_index, bench_ms, device):
    """One line per phase for a chunk as long as ``chunked``'s default, and their sum."""
    n, v = hidden.shape[0], weight.shape[0]
    chunk = min(n, auto_chunk_size(v, hidden.element_size()))
    chunks = -(-n // chunk)
    print(f"-- phases of one chunk of {chunk} tokens ({chunks} chunks for N={n}), ms per chunk:")
    total = 0.0
    with torch.no_grad():
        for name, fn, flops, moved, in_sum in phases(hidden[:chunk], weight, targets[:chunk], ignore_index):
            fn()  # compile outside the timing
            ms = bench_ms(fn, [], device)
            total += ms if in_sum else 0.0
            rate = f"{flops / ms / 1e9:7.0f} TFLOP/s" if flops else f"{moved / ms / 1e6:7.0f} GB/s"
            print(f"   {name:32s} {ms:8.3f} ms  {rate}")
    print(f"   {'sum':32s} {total:8.3f} ms  ({total * chunks:.3f} ms for N={n})")
