"""Validation: the mean next-token loss on held-out data, every ``[validation] freq`` steps and after the last.

The set is the first ``steps`` global batches of the validation data in file order (the
training loader's sequential mode: no shuffle), each data-parallel rank taking its contiguous
slice of every batch as in training. So it is the same windows at every evaluation, and the
same for any dp degree given the global batch size. It is read through its own dataset, so
the training data order, the RNG and a resume are untouched.

The loss is the recipe's loss module on the last stage's hidden states, built with reduction
"sum" (the training loss before ``GlobalTokenMeanLoss`` scales it), under ``torch.no_grad``:
no backward, no ``[tokens, vocab]`` logits. The sums are added over the data-parallel ranks
(the vocab-parallel loss returns 1/n of its group's sum on each rank, so the plain sum counts
every token once) and over the pipeline (only the last stage has them), then divided by the
number of targets: the exact token mean, with ``loss.ignore_index`` as in training.

Under pipeline parallel the stages run a forward-only pass of their own
(``parallelisms/pipeline_forward.py``, which says why not the schedule's ``eval()``): any
schedule's stage placement, virtual stages included.
"""

import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from config.errors import ConfigError
from config.job_config import JobConfig
from data import Tokenizer, build_dataloader
from data.packed_dataset import PackedWindowDataset
from losses.functional import shift_targets
from parallelisms.compute_weights import ComputeWeights
from parallelisms.pipeline import PipelinePlan
from parallelisms.pipeline_forward import pipeline_forward

logger = logging.getLogger("train")


def build_validation_set(
    cfg: JobConfig, tokenizer: Tokenizer, vocab_size: int, global_batch: int, dp_rank: int, dp_degree: int
) -> PackedWindowDataset:
    """This rank's slices of the validation batches (``local_batch(i)``, i < steps), tokenized with the
    run's ``tokenizer``; every problem with the data is a one-line ``ConfigError`` naming the key,
    raised before the model is built."""
    v = cfg.validation
    seq_len = v.seq_len or cfg.training.seq_len
    local_batch = v.local_batch_size or cfg.training.local_batch_size
    share = global_batch // dp_degree
    if share % local_batch:
        raise ConfigError(
            "validation.local_batch_size",
            f"{local_batch} does not divide each data-parallel rank's share of a batch, global batch "
            f"{global_batch} / dp {dp_degree} = {share}",
        )
    try:
        windows = build_dataloader(
            dataset=v.dataset,
            dataset_path=v.dataset_path,
            tokenizer=tokenizer,
            seq_len=seq_len,
            global_batch_size=global_batch,
            dp_rank=dp_rank,
            dp_degree=dp_degree,
            seed=cfg.training.seed,
            vocab_size=vocab_size,
            text_column=cfg.training.dataset_text_column,
            shuffle=False,
        ).dataset
    except ValueError as err:
        raise ConfigError("validation.dataset_path", str(err)) from None
    needed = v.steps * global_batch
    if len(windows.windows) < needed:
        raise ConfigError(
            "validation.steps",
            f"{v.dataset_path} holds {len(windows.windows)} windows of seq_len {seq_len}, but "
            f"{v.steps} batches of the global batch {global_batch} need {needed}; lower "
            "validation.steps or add data",
        )
    logger.info(
        f"validation: {v.steps} batches of {global_batch} x {seq_len} tokens from {v.dataset_path}, "
        f"every {v.freq} steps and after the last"
    )
    return windows


class Validator:
    """``run()``: the validation loss and perplexity at the current weights, the same on every rank.

    ``parts`` are this rank's stages, run on ``compute_weights`` as in training, ``plan`` the pipeline
    plan (None without PP), ``loss_sum`` the recipe's loss with reduction "sum" (None on pipeline ranks
    without the last stage), ``hidden_dtype`` the dtype of the hidden states between stages.
    """

    def __init__(
        self,
        *,
        cfg: JobConfig,
        parts: list[nn.Module],
        compute_weights: ComputeWeights,
        plan: Optional[PipelinePlan],
        loss_sum: Optional[nn.Module],
        validation_set: PackedWindowDataset,
        mesh,
        dp_group: dist.ProcessGroup,
        hidden_dtype: torch.dtype,
    ):
        v = cfg.validation
        self.freq, self.batches, self.last_step = v.freq, v.steps, cfg.training.steps
        self.local_batch_size = v.local_batch_size or cfg.training.local_batch_size
        self.microbatch_size = plan.microbatch_size if plan is not None else None
        self.ignore_index = cfg.loss.ignore_index
        self.parts, self.plan, self.loss_sum, self.validation_set = parts, plan, loss_sum, validation_set
        self.compute_weights = compute_weights
        self.dp_group = dp_group
        self.pp_group = mesh["pp"].get_group() if plan is not None else None
        self.hidden_dtype = hidden_dtype

    def due(self, step: int) -> bool:
        return step % self.freq == 0 or step == self.last_step

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        device = next(self.parts[0].parameters()).device
        total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, targets

        def add(hidden: Tensor, tokens: Tensor) -> None:
            total[0] += self.loss_sum(hidden, tokens).double()
            total[1] += (shift_targets(tokens, 1, self.ignore_index) != self.ignore_index).sum()

        with self.compute_weights:
            for i in range(self.batches):
                for chunk in self.validation_set.local_batch(i)["input_ids"].to(device).split(self.local_batch_size):
                    if self.plan is None:
                        add(self.parts[0](chunk), chunk)
                    else:
                        pipeline_forward(
                            self.parts,
                            self.plan,
                            self.pp_group,
                            list(chunk.split(self.microbatch_size)),
                            self.parts[0].args.dim,
                            self.hidden_dtype,
                            add,
                        )
        dist.all_reduce(total, group=self.dp_group)
        if self.pp_group is not None:
            dist.all_reduce(total, group=self.pp_group)
        # Free the weights the forward gathered, as the training step's backward does.
        for module in (m for part in self.parts for m in part.modules()):
            if isinstance(module, FSDPModule):
                module.reshard()
        loss = total[0] / total[1].clamp(min=1)
        return {"validation_loss": loss.item(), "validation_perplexity": loss.exp().item()}
