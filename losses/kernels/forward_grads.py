"""Gradients a loss computes in its forward, handed out by its backward.

With reduction mean/sum a fused loss can compute its input gradients while each chunk's
logits are at hand; the backward then only scales them by the upstream gradient. Used by
the chunked loss's and Liger-Kernel's autograd functions.
"""

from typing import Callable, Optional

import torch
from torch import Tensor


def consumer_runs(ctx, i: int) -> bool:
    """Whether the running backward pass uses this node's gradient for input ``i``
    (a zero-bubble schedule's input-gradient pass skips the classifier's)."""
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # a leaf under autograd.grad(): its gradient is returned, not accumulated
        return False


class ForwardGradients:
    """The gradients of an autograd function's first inputs, computed in its forward.

    Kept as an attribute of ``ctx``, not saved tensors: they are new tensors (no cycle), and
    scaling them in place must not trip autograd's version check on a second backward.
    ``scale`` (if given) multiplies the upstream gradient, e.g. 1/N for a mean over gradients of the sum;
    ``after_scaling`` may replace the list once scaled (e.g. reduce one across ranks).
    """

    def __init__(
        self,
        grads: list[Optional[Tensor]],
        loss_name: str,
        scale: Optional[Tensor] = None,
        after_scaling: Optional[Callable[[list[Optional[Tensor]]], list[Optional[Tensor]]]] = None,
    ):
        self.grads = list(grads)
        self.loss_name = loss_name
        self.scale = scale
        self.after_scaling = after_scaling
        self.applied: Optional[Tensor] = None

    def hand_out(self, ctx, grad_loss: Tensor) -> list[Optional[Tensor]]:
        """The gradients for this backward call, scaled by ``grad_loss`` (in place, once).

        Zero-bubble pipeline schedules run the backward twice over one graph (input grads,
        then weight grads) with the same upstream gradient: the first call's scaled tensors
        are the second's answer. Each gradient is handed out once: without our reference,
        AccumulateGrad takes the tensor as ``.grad`` instead of copying it (a classifier-sized copy).
        """
        if self.applied is None:
            self.applied = grad_loss.detach().clone()
            factor = grad_loss if self.scale is None else grad_loss * self.scale
            for g in self.grads:
                if g is not None:
                    g.mul_(factor.to(g.dtype))
            if self.after_scaling is not None:
                self.grads = self.after_scaling(self.grads)
        elif not torch.equal(grad_loss, self.applied):
            raise RuntimeError(f"the {self.loss_name} loss was backpropagated twice with different upstream gradients")
        grads = list(self.grads)
        for i, grad in enumerate(grads):
            if consumer_runs(ctx, i):
                if grad is None and ctx.needs_input_grad[i]:
                    raise RuntimeError(
                        f"the {self.loss_name} loss's gradients were already handed out; "
                        "recompute the loss to backpropagate again"
                    )
                self.grads[i] = None
        return grads
