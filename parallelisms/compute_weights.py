"""Mixed precision without FSDP, for a rank whose parameters no other rank shares (data-parallel degree 1).

FSDP2 on a one-rank mesh still runs its collectives' copies: every step it casts each parameter to bf16
into an all-gather buffer and copies it out (twice per block that reshards after its forward) and
copies the bf16 gradients into an fp32 reduce-scatter buffer, 22 ms of Qwen3-1.7B's 408 ms step on an
H100 that move nothing between GPUs (docs/performance.md). Here the fp32 parameters stay the model's
own, so the state dict, the optimizer, checkpoints and clipping see them as ever. ``ComputeWeights``
casts them once per step into bf16 parameters that it puts in their place for the forward and backward
(FSDP2's parameter swap, without the buffers), and as autograd finishes each bf16 gradient it is added
in fp32 to the fp32 parameter's ``.grad``. Those are the numbers FSDP2 computes on one rank: the same
casts, the same fp32 accumulation over micro-steps.
"""

from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _accumulate_into(master: nn.Parameter, compute: nn.Parameter) -> None:
    """``compute``'s gradient, now complete for this backward, added to ``master``'s in ``master``'s dtype."""
    if master.grad is None:
        master.grad = compute.grad.to(master.dtype)
    else:
        master.grad += compute.grad
    compute.grad = None


class ComputeWeights:
    """``with compute_weights:`` runs the model parts' forward and backward on ``dtype`` copies of their
    parameters; outside it they hold their own. A parameter already in ``dtype`` (fp32 training on CPU)
    or a DTensor (the vocab-parallel head, kept fp32 as FSDP keeps it) is used as it is, so with nothing
    to cast this is a no-op."""

    def __init__(self, parts: list[nn.Module], dtype: torch.dtype):
        self._slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []  # module, name, master, compute
        copies: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (master, compute); a tied weight has
        # one copy, put in each of its places
        for part in parts:
            for module in part.modules():
                for name, master in module._parameters.items():
                    if master is None or master.dtype == dtype or isinstance(master, DTensor):
                        continue
                    if id(master) not in copies:
                        compute = nn.Parameter(torch.empty_like(master, dtype=dtype), master.requires_grad)
                        compute.register_post_accumulate_grad_hook(partial(_accumulate_into, master))
                        copies[id(master)] = (master, compute)
                    self._slots.append((module, name, master, copies[id(master)][1]))
        self._masters = [master for master, _ in copies.values()]
        self._copies = [compute for _, compute in copies.values()]

    def __enter__(self) -> "ComputeWeights":
        if self._copies:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, self._masters)
        for module, name, _, compute in self._slots:
            module._parameters[name] = compute
        return self

    def __exit__(self, *exc) -> None:
        for module, name, master, _ in self._slots:
            module._parameters[name] = master
