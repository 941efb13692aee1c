"""One optimizer step: forward/backward micro-steps, then finishing the step.

Finishing is where the layouts differ: the vocab-parallel head's gradient is completed,
a tied head copy is kept equal to the embedding, the whole model's gradient is clipped,
the non-finite policy decides whether to step, the optimizers step, and float8 weights get
their next scales.
"""

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from config.job_config import JobConfig
from parallelisms.compute_weights import ComputeWeights
from parallelisms.float8 import Float8ScaleUpdate
from parallelisms.grad_clip import clip_divisor, total_grad_norm
from parallelisms.parallel_dims import ParallelDims
from parallelisms.tied_embeddings import TiedEmbeddingSync
from parallelisms.vocab_parallel import finalize_head_grads
from training.token_normalization import GlobalTokenMeanLoss

logger = logging.getLogger("train")

NONFINITE_ADVICE = (
    "try a lower optimizer.lr, more lr_scheduler.warmup_steps, training.max_norm > 0, "
    "or training.mixed_precision_param = 'float32'"
)


class NonFiniteLossError(RuntimeError):
    """The non-finite policy stopped the run (the same on every rank)."""


@dataclass(frozen=True)
class QueuedStep:
    """A step whose work is queued on the device; ``TrainStep.settle`` reads its figures."""

    step: int
    loss: torch.Tensor  # float64, this rank's share summed over the data-parallel ranks
    grad_norm: torch.Tensor
    lr: float
    verdict: torch.Tensor  # the non-finite policy's, from UpdatesToSkip: [update skipped, run ended]


@dataclass(frozen=True)
class StepOutcome:
    step: int
    loss: float  # the global batch's token mean, the same on every rank
    grad_norm: float  # the whole model's, before clipping
    lr: float  # the learning rate the step used
    updated: bool  # False: the non-finite policy skipped the update


class UpdatesToSkip:
    """The non-finite policy on the device: ``found_inf`` for each step's update, 1 where the step is not finite
    and for every step after one that ends the run, so that steps queued before the host reads that one
    change nothing (``TrainStep.settle`` raises when it reads it)."""

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.skipped: Optional[torch.Tensor] = None  # non-finite steps so far
        self.halted: Optional[torch.Tensor] = None  # 1 once the run has ended

    def __call__(self, nonfinite: torch.Tensor) -> torch.Tensor:
        """``nonfinite``: 1.0 or 0.0 for this step, a float tensor on the device."""
        if self.halted is None:
            self.halted, self.skipped = torch.zeros_like(nonfinite), torch.zeros_like(nonfinite)
        ends_run = nonfinite if self.policy == "stop" else nonfinite * (self.skipped >= self.max_skips)
        torch.maximum(self.halted, ends_run, out=self.halted)
        self.skipped += nonfinite
        return torch.maximum(nonfinite, self.halted)


class TrainStep:
    """``step(local_batch)`` queues one optimizer step of this rank's share of the global batch; ``settle``
    reads what it did. Nothing in between makes the host wait for the GPU, so the training loop can queue
    the next step before reading this one and the GPU never idles while the host prepares it.

    ``parts`` are this rank's model stages, run on ``compute_weights`` (a no-op under FSDP); ``schedule``
    the pipeline schedule (None without PP); ``loss`` the global-token-mean loss on the last stage's hidden
    states.
    """

    def __init__(
        self,
        *,
        cfg: JobConfig,
        dims: ParallelDims,
        parts: list[nn.Module],
        compute_weights: ComputeWeights,
        schedule,
        loss: GlobalTokenMeanLoss,
        optimizers: list[torch.optim.Optimizer],
        schedulers: list,
        tied: Optional[TiedEmbeddingSync],
        float8_scales: Optional[Float8ScaleUpdate],
        mesh,
        dp_group: dist.ProcessGroup,
    ):
        self.t = cfg.training
        self.ignore_index = cfg.loss.ignore_index
        self.dims, self.parts, self.schedule, self.loss = dims, parts, schedule, loss
        self.compute_weights = compute_weights
        self.optimizers, self.schedulers, self.tied = optimizers, schedulers, tied
        self.float8_scales = float8_scales
        self.params = [p for part in parts for p in part.parameters()]
        self.head = next((p.output for p in parts if p.output is not None), None)
        self.vocab_parallel_head = self.head if cfg.parallelism.vocab_parallel else None
        self.has_first_stage = any(p.tok_embeddings is not None for p in parts)
        self.fsdp_mesh, self.dp_group = dims.fsdp_mesh(mesh), dp_group
        self.pp_group = mesh["pp"].get_group() if schedule is not None else None
        self.skipped = 0  # updates dropped for a non-finite loss or gradient, as settled (for the messages)
        self.updates_to_skip = UpdatesToSkip(cfg.training.nonfinite_policy, cfg.training.nonfinite_max_skips)

    def __call__(self, local_batch: torch.Tensor, step: int) -> QueuedStep:
        self.loss.set_global_batch(local_batch, self.ignore_index)
        step_loss = torch.zeros((), device=local_batch.device, dtype=torch.float64)
        with self.compute_weights:
            for micro in local_batch.split(self.t.local_batch_size):
                step_loss += self._forward_backward(micro)
        return self._finish(step_loss, step)

    def _forward_backward(self, micro: torch.Tensor) -> torch.Tensor:
        """One micro-step's loss (its share of the global mean), gradients accumulated."""
        if self.schedule is None:
            loss = self.loss(self.parts[0](micro), micro)
            loss.backward()
            return loss.detach().double()
        losses: list[torch.Tensor] = []
        # Every stage gets its microbatch's share of stage_kwargs (block_causal: document ids).
        self.schedule.step(
            *((micro,) if self.has_first_stage else ()),
            target=micro if self.head is not None else None,
            losses=losses,
            **self.parts[0].stage_kwargs(micro),
        )
        return (
            sum(loss.detach().double() for loss in losses)
            if losses
            else torch.zeros((), dtype=torch.float64, device=micro.device)
        )

    def _finish(self, step_loss: torch.Tensor, step: int) -> QueuedStep:
        if self.vocab_parallel_head is not None:
            finalize_head_grads(self.vocab_parallel_head.weight, self.fsdp_mesh, self.dims.dp)
        if self.tied is not None:
            self.tied.sync_grads()
        duplicate = [self.tied.head_copy] if self.tied is not None and self.tied.head_copy is not None else []
        norm = total_grad_norm(self.params, self.pp_group, skip=duplicate)
        # The loss lives on the last stage, one share per data-parallel rank: sum the shares.
        dist.all_reduce(step_loss, group=self.dp_group)
        if self.pp_group is not None:
            dist.all_reduce(step_loss, group=self.pp_group)
        # The update is skipped on the device where the loss or the gradient is not finite (the fused
        # kernel's found_inf, as GradScaler sets it), and the kernel clips, dividing each gradient by its
        # grad_scale as it reads it: no figure is read here.
        found_inf = self.updates_to_skip(
            (~(torch.isfinite(step_loss) & torch.isfinite(norm.to(step_loss.device)))).float()
        )
        verdict = torch.stack((found_inf, self.updates_to_skip.halted))  # a copy: halted changes in place later
        divisor = clip_divisor(norm, self.t.max_norm) if self.t.max_norm > 0 else None
        for optimizer in self.optimizers:
            optimizer.found_inf, optimizer.grad_scale = found_inf, divisor
            optimizer.step()
        if self.float8_scales is not None:
            self.float8_scales()
        lr = self.schedulers[0].get_last_lr()[0]
        for scheduler in self.schedulers:
            scheduler.step()
            scheduler.optimizer.zero_grad(set_to_none=True)
        return QueuedStep(step, step_loss, norm, lr, verdict)

    def settle(self, queued: QueuedStep) -> StepOutcome:
        """Read ``queued``'s loss and gradient norm (waiting for the device to compute them) and what the
        non-finite policy decided on the device: raise ``NonFiniteLossError`` or count the skipped update."""
        loss, grad_norm = float(queued.loss) / self.dims.dp, float(queued.grad_norm)
        skipped, ended = queued.verdict.tolist()  # the same on every rank
        if ended:
            after = f" after {self.skipped} skipped steps" if self.skipped else ""
            raise NonFiniteLossError(
                f"loss {loss}, grad norm {grad_norm} at step {queued.step}{after}; {NONFINITE_ADVICE}"
            )
        if skipped:
            self.skipped += 1
            logger.warning(
                f"step {queued.step}: loss {loss}, grad norm {grad_norm}; update skipped "
                f"({self.skipped}/{self.t.nonfinite_max_skips})"
            )
        return StepOutcome(queued.step, loss, grad_norm, queued.lr, not skipped)
