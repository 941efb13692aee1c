"""AdamW whose state lives in flat buffers and whose step is one fused kernel call per (device, dtype).

``torch.optim.AdamW(fused=True)`` over FSDP2's DTensor parameters reaches the kernel through
DTensor's dispatch, with each moment a separate allocation. Here the kernel
(``torch._fused_adamw_``, the one torch's fused AdamW calls, on CPU as on CUDA) gets the local shards
directly, and each state (``exp_avg``, ``exp_avg_sq``, ``step``) is one buffer per (param group, device,
dtype) that the per-parameter state entries are views of. Those entries are torch's: DTensors with
their parameter's mesh, placements, shape and stride (plain tensors for plain parameters), so
``state_dict``, DCP's ``get/set_optimizer_state_dict`` and checkpoints have torch's AdamW's format,
and each loads the other's.
"""

from collections import defaultdict
from typing import Any, Optional

import torch
from torch.distributed.tensor import DTensor

from losses.kernels.chunked import triton_available
from parallelisms.local_tensor import local_tensor

# Where each parameter's slice of a buffer starts, in bytes: the CUDA caching allocator's block
# alignment, so a view is as aligned as a tensor of its own.
_ALIGN_BYTES = 512


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as a state entry of ``param``: a DTensor laid out as ``param`` is, or ``local`` itself."""
    if not isinstance(param, DTensor):
        return local
    # A DTensor takes the storage offset of the tensor it is made from, and deepcopy (DCP's staging of an
    # async save on the CPU) fails on one with a nonzero offset. So it is made from an empty tensor and then
    # given ``local``, as DCP's staging and FSDP2 give a DTensor a new local tensor.
    entry = DTensor.from_local(
        local.new_empty(0),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
    entry._local_tensor = local
    return entry


class _Bucket:
    """The parameters of one param group on one (device, dtype): their steps and moments, views into flat buffers."""

    def __init__(self, group_index: int, params: list[torch.Tensor], copies: list[Optional[torch.Tensor]]):
        self.group_index, self.params, self.copies = group_index, params, copies
        locals_ = [local_tensor(p) for p in params]
        for p, local in zip(params, locals_):
            if not local.is_contiguous():  # the kernel pairs the parameter's and its moments' elements in memory order
                raise ValueError(f"FlatAdamW needs contiguous (local) parameters, got shape {tuple(p.shape)} strided")
        device, dtype = locals_[0].device, locals_[0].dtype
        self.device, self.dtype = device, dtype
        self.bf16_grads = None  # training/adamw_kernel.py's launcher, made at the first bf16 gradient on CUDA
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        starts, total = [], 0
        for local in locals_:
            starts.append(total)
            total += -(-local.numel() // align) * align
        moments = {name: torch.zeros(total, device=device, dtype=dtype) for name in ("exp_avg", "exp_avg_sq")}
        # The fused kernel reads a float32 step per parameter from its device, as torch's fused AdamW keeps it.
        self.steps = steps = torch.zeros(len(params), device=device, dtype=torch.float32)
        self.views = [
            {
                "step": steps[i],
                **{name: flat[start : start + local.numel()].view(local.shape) for name, flat in moments.items()},
            }
            for i, (start, local) in enumerate(zip(starts, locals_))
        ]
        # What ``optimizer.state`` holds: the step a plain scalar tensor, as torch keeps it.
        self.entries = [
            {name: view if name == "step" else _like(p, view) for name, view in views.items()}
            for p, views in zip(params, self.views)
        ]

    def step(
        self, group: dict[str, Any], grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]
    ) -> None:
        """One AdamW update of the parameters that have a gradient (the others are left alone, as torch does),
        with ``group``'s hyperparameters (the LR schedule changes its ``lr``), each gradient divided by
        ``grad_scale``; none where ``found_inf`` is nonzero, decided by the kernel on the device."""
        chosen = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not chosen:
            return
        params = [self.params[i] for i in chosen]
        for p in params:
            if isinstance(p, DTensor) and p.grad.placements != p.placements:
                raise ValueError(
                    f"a gradient placed {p.grad.placements} for a parameter placed {p.placements}: "
                    "their local tensors do not hold the same elements"
                )
        steps = [self.views[i]["step"] for i in chosen]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"])
        # An fp32 parameter's gradient may be in bf16 (one data-parallel rank keeps the backward's:
        # parallelisms/compute_weights.py). On CUDA those are read as they are.
        lower = [
            i
            for i in chosen
            if self.dtype == torch.float32 and local_tensor(self.params[i].grad).dtype == torch.bfloat16
        ]
        if lower and self.device.type == "cuda" and triton_available():
            if self.bf16_grads is None:
                from training.adamw_kernel import Bf16GradAdamW  # imports triton: only where it runs

                self.bf16_grads = Bf16GradAdamW(
                    [local_tensor(p) for p in self.params],
                    [v["exp_avg"] for v in self.views],
                    [v["exp_avg_sq"] for v in self.views],
                    self.steps,
                )
            grads = [local_tensor(self.params[i].grad) for i in lower]
            copies = [self._held_copy(i) for i in lower]
            self.bf16_grads.step(lower, grads, copies, **hyper, grad_scale=grad_scale, found_inf=found_inf)
            updated = set(lower)
            chosen = [i for i in chosen if i not in updated]
        if chosen:  # the rest, and every gradient elsewhere, through torch's kernel, in the parameter's dtype
            torch._fused_adamw_(
                [local_tensor(self.params[i]) for i in chosen],
                [local_tensor(self.params[i].grad).to(self.dtype) for i in chosen],
                [self.views[i]["exp_avg"] for i in chosen],
                [self.views[i]["exp_avg_sq"] for i in chosen],
                [],
                [self.views[i]["step"] for i in chosen],
                amsgrad=False,
                maximize=False,
                grad_scale=grad_scale,
                found_inf=found_inf,
                **hyper,
            )
            held = [i for i in chosen if self._held_copy(i) is not None]
            if held:  # as the kernel writes them; torch's kernel moves no version counter its owner could see
                torch._foreach_copy_([self.copies[i] for i in held], [self.params[i] for i in held])
        if found_inf is not None:  # a skipped update is no step (torch's fused AdamW undoes the count the same way)
            torch._foreach_sub_(steps, [found_inf] * len(steps))

    def _held_copy(self, i: int) -> Optional[torch.Tensor]:
        """Parameter ``i``'s copy to write, if it has one and it is held (not freed until its next cast)."""
        copy = self.copies[i]
        return copy if copy is not None and copy.untyped_storage().size() > 0 else None

    def adopt(self, state: dict) -> None:
        """Copy what ``Optimizer.load_state_dict`` put into ``state`` into the buffers (zeros for a parameter
        without state: torch's AdamW makes it at its first gradient) and put the views back in its place."""
        for p, views, entry in zip(self.params, self.views, self.entries):
            loaded = state.get(p) or {}
            for name, view in views.items():
                if name in loaded:
                    view.copy_(local_tensor(loaded[name]))
                else:
                    view.zero_()
            state[p] = entry


class FlatAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (fused, no amsgrad, not maximizing) with its state in flat buffers, made for every
    parameter at construction; a parameter without gradient is skipped, as torch does.

    ``copies``: per parameter, a copy in the compute dtype (one rank's compute weights,
    ``ComputeWeights.copies()``) that each update leaves holding the new values, unless it is freed: written by
    the same kernel where it reads a bf16 gradient on CUDA, else cast after torch's kernel."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        copies: Optional[dict[torch.Tensor, torch.Tensor]] = None,
    ):
        self._buckets: list[_Bucket] = []
        self._copies = copies or {}
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.register_load_state_dict_post_hook(FlatAdamW._adopt_loaded_state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        by_kind = defaultdict(list)
        for p in self.param_groups[-1]["params"]:
            by_kind[(local_tensor(p).device, local_tensor(p).dtype)].append(p)
        for params in by_kind.values():
            bucket = _Bucket(len(self.param_groups) - 1, params, [self._copies.get(p) for p in params])
            self._buckets.append(bucket)
            self.state.update(zip(params, bucket.entries))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by the caller as GradScaler sets them for torch's fused optimizers: the gradients are divided by
        # grad_scale, and a nonzero found_inf skips this step.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for bucket in self._buckets:
            device = bucket.views[0]["step"].device
            scale, skip = (
                None if t is None else t.to(device, torch.float32, non_blocking=True) for t in (grad_scale, found_inf)
            )
            bucket.step(self.param_groups[bucket.group_index], scale, skip)
        return loss

    @staticmethod
    def _adopt_loaded_state(optimizer: "FlatAdamW") -> None:
        """``load_state_dict`` replaced the state's tensors (and the param group dicts, which buckets know by
        index): back into the buffers."""
        for bucket in optimizer._buckets:
            bucket.adopt(optimizer.state)
