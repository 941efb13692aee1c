"""Mixed precision without FSDP, for a rank whose parameters no other rank shares (data-parallel degree 1).

FSDP2 on a one-rank mesh still runs its collectives' copies: every step it casts each parameter to bf16
into an all-gather buffer and copies it out (twice per block that reshards after its forward) and
copies the bf16 gradients into an fp32 reduce-scatter buffer, 22 ms of Qwen3-1.7B's 408 ms step on an
H100 that move nothing between GPUs (docs/performance.md). Here the fp32 parameters stay the model's
own, so the state dict, the optimizer, checkpoints and clipping see them as ever. ``ComputeWeights``
casts them into bf16 parameters that it puts in their place for the forward and backward (FSDP2's
parameter swap, without the buffers), and as autograd finishes each bf16 gradient it is added in fp32
to the fp32 parameter's ``.grad``. Those are the numbers FSDP2 computes on one rank: the same casts,
the same fp32 accumulation over micro-steps.

Where the optimizer can do the casts (``optimizer_casts``: FlatAdamW on one rank, training/adamw_kernel.py),
it does: a parameter's one gradient of the step reaches it in bf16 as the backward made it, and it writes
the copies as it updates the weights, from the values in its registers, so neither cast is a pass of its
own. The copies are then kept from the backward through the optimizer step to their next forward.

What FSDP would reshard after its forward (``fsdp_groups``: by default every block but the last) has
its copy freed after the forward and cast again when its backward starts, as FSDP frees and
re-gathers it, so the memory is FSDP's; the rest is cast once at the start of the step. All are freed
at its end, before the optimizer step, unless the optimizer writes them.

A copy is cast only where it does not hold its weight's values: where it was freed, or where the weight
changed since its cast in a way that moved the weight's version counter (in-place torch ops do, a
checkpoint load's ``copy_`` among them). The optimizer's writes move none (its Triton kernel's, and torch's
fused AdamW's too), so it leaves every copy it holds current itself: written in the kernel's pass, or cast
after torch's kernel.
"""

from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_leaves

from config.job_config import JobConfig
from models.transformer import Transformer
from parallelisms.fsdp import fsdp_groups
from parallelisms.parallel_dims import ParallelDims


def optimizer_can_cast(cfg: JobConfig, dims: ParallelDims, tie_word_embeddings: bool) -> bool:
    """Whether the optimizer does one rank's casts (``ComputeWeights(optimizer_casts=...)``): ``FlatAdamW``
    on one data-parallel rank, unless a tied head is a separate copy (pipeline stages, the vocab-parallel
    head) whose gradient is summed with the embedding's in fp32."""
    separate_tied_head = tie_word_embeddings and (dims.pp > 1 or cfg.parallelism.vocab_parallel)
    return dims.dp == 1 and cfg.optimizer.implementation == "flat" and not separate_tied_head


class _Copies:
    """The bf16 copies of one group's parameters (of a module FSDP would shard on its own), and whether they
    hold their values now."""

    def __init__(self, masters: list[nn.Parameter], copies: list[nn.Parameter], resharded: bool, kept: bool):
        self.masters, self.copies, self.resharded = masters, copies, resharded
        self.kept = kept  # held from the backward to the next forward: the optimizer writes them
        self.active = False  # inside ``with compute_weights``: the model runs on the copies
        self.held = False
        self.versions: list[int] = []  # the masters' version counters when the copies were made
        self.pending = 0  # gradients of this backward still to come before the copies may go

    def cast(self) -> None:
        """Make the copies hold the masters' values, casting only those that do not."""
        if self.held:
            stale = [i for i, (m, v) in enumerate(zip(self.masters, self.versions)) if m._version != v]
        else:
            stale = range(len(self.copies))
            for copy in self.copies:
                copy.untyped_storage().resize_(copy.numel() * copy.itemsize)
            self.pending = len(self.copies)
        if stale:
            # Through ``.data``: the backward may have saved a copy that was freed after its forward, and
            # refilling it is no change autograd must refuse (FSDP2 refills its gathered parameters the same way).
            torch._foreach_copy_([self.copies[i].data for i in stale], [self.masters[i] for i in stale])
        self.versions = [m._version for m in self.masters]
        self.held = True

    def free(self) -> None:
        for copy in self.copies:
            copy.untyped_storage().resize_(0)
        self.held = False

    @torch._dynamo.disable
    def before_forward(self, module: nn.Module, args) -> None:
        if self.active:
            self.cast()

    @torch._dynamo.disable
    def after_forward(self, module: nn.Module, args, output):
        if not self.active:
            return output
        if torch.is_grad_enabled():  # cast again when the backward reaches this module's outputs
            for t in tree_leaves(output):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._before_backward)
        self.free()
        return output

    def _before_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.cast()
        return grad

    def gradient_done(self) -> None:
        """One of the copies' gradients is accumulated: after the last, a resharded group lets them go."""
        self.pending -= 1
        if self.resharded and not self.kept and self.pending == 0:
            self.free()


def _accumulate_into(master: nn.Parameter, group: _Copies, compute: nn.Parameter) -> None:
    """``compute``'s gradient, now complete for this backward, added to ``master``'s in ``master``'s dtype; where
    the optimizer casts (``group.kept``) the first is taken as it is, and cast only when a second comes to be
    added to it."""
    if master.grad is None:
        master.grad = compute.grad if group.kept else compute.grad.to(master.dtype)
    else:
        if master.grad.dtype != master.dtype:
            master.grad = master.grad.to(master.dtype)
        master.grad += compute.grad
    compute.grad = None
    group.gradient_done()


class ComputeWeights:
    """``with compute_weights:`` runs the model parts' forward and backward on ``dtype`` copies of their
    parameters; outside it they hold their own. A parameter already in ``dtype`` (fp32 training on CPU)
    or a DTensor (the vocab-parallel head, kept fp32 as FSDP keeps it) is used as it is, so with nothing
    to cast this is a no-op. ``reshard_after_forward`` and ``pp_enabled`` choose what is freed after its
    forward, as for FSDP (``parallelism.fsdp_reshard_after_forward``).

    ``optimizer_casts`` (``optimizer_can_cast``): a parameter whose step brings it one gradient keeps it in
    ``dtype`` as its ``.grad`` (``grad_dtype`` None allows it), for the optimizer to read so; a second
    gradient in the step (micro-steps, pipeline microbatches) is added in fp32 to the first, cast. And the
    copies stay held after the backward, for the optimizer to write (``copies()``). The numbers are the same
    either way: both casts are exact, and rounded alike."""

    def __init__(
        self,
        parts: list[Transformer],
        dtype: torch.dtype,
        reshard_after_forward: str,
        pp_enabled: bool,
        optimizer_casts: bool = False,
    ):
        self._slots: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []  # module, name, master, compute
        self._groups: list[_Copies] = []
        copies: dict[int, nn.Parameter] = {}  # id(master) -> its copy; a tied weight has one, in each place
        for part in parts:
            taken: set[int] = set()  # modules of the groups made so far (children before the root)
            for group in fsdp_groups(part, reshard_after_forward, pp_enabled, vocab_parallel_head=False):
                module = part.get_submodule(group.name)
                masters, computes = [], []
                for owner in module.modules():
                    if id(owner) in taken:
                        continue
                    taken.add(id(owner))
                    for name, master in owner._parameters.items():
                        if master is None or master.dtype == dtype or isinstance(master, DTensor):
                            continue
                        if id(master) not in copies:
                            copies[id(master)] = nn.Parameter(
                                torch.empty_like(master, dtype=dtype), master.requires_grad
                            )
                            masters.append(master)
                            computes.append(copies[id(master)])
                        self._slots.append((owner, name, master, copies[id(master)]))
                if not computes:
                    continue
                resharded = group.reshard_after_forward and group.kind != "root"
                copies_of_group = _Copies(masters, computes, resharded, kept=optimizer_casts)
                for master, compute in zip(masters, computes):
                    if optimizer_casts:
                        master.grad_dtype = None
                    compute.register_post_accumulate_grad_hook(partial(_accumulate_into, master, copies_of_group))
                if resharded:
                    copies_of_group.free()
                    module.register_forward_pre_hook(copies_of_group.before_forward)
                    module.register_forward_hook(copies_of_group.after_forward)
                self._groups.append(copies_of_group)

    def copies(self) -> dict[nn.Parameter, nn.Parameter]:
        """Each master's copy, for the optimizer to write as it updates the master (none unless
        ``optimizer_casts``)."""
        return {m: c for group in self._groups if group.kept for m, c in zip(group.masters, group.copies)}

    def __enter__(self) -> "ComputeWeights":
        for group in self._groups:
            group.active = True
            if not group.resharded:  # the others are cast before their forward
                group.cast()
        for module, name, _, compute in self._slots:
            module._parameters[name] = compute
        return self

    def __exit__(self, *exc) -> None:
        for module, name, master, _ in self._slots:
            module._parameters[name] = master
        for group in self._groups:
            group.active = False
            if not group.kept:  # as FSDP reshards after the backward: the optimizer step needs none of them
                group.free()
