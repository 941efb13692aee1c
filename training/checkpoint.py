"""Distributed checkpoints (torch.distributed.checkpoint): exact resume, any layout.

A checkpoint holds the model and optimizer by fully-qualified parameter name
(layer indices are global, so pipeline stages, FSDP shards and the
vocab-parallel head all map onto the same names and DCP reshards between
layouts), the LR schedule, the data position, the RNG state and the step.
A tied head copy (pipeline stages, vocab-parallel head) is stored once, as the
embedding.

Saves are atomic: DCP writes ``step-N.partial/``, which becomes ``step-N/``
only after every rank finished; a folder without ``.metadata`` or still named
``.partial`` is never resumed from.
"""

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from training.config import Checkpoint
from training.errors import ConfigError

logger = logging.getLogger("train")

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_HEAD, _EMBEDDING = "output.weight", "tok_embeddings.weight"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says what differs."""


def _steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith("step-") and entry.name[5:].isdigit() and (entry / ".metadata").is_file():
            found.append(int(entry.name[5:]))
    return sorted(found)


def _last_line(err: BaseException) -> str:
    """DCP wraps per-rank tracebacks into its message; the last line is the cause."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


class CheckpointManager:
    """Saves every ``interval`` steps and at the end; resumes from the newest complete checkpoint."""

    def __init__(self, cfg: Checkpoint, dump_folder: str, parts: list[nn.Module],
                 optimizers: list[torch.optim.Optimizer], schedulers: list, dataloader, fingerprint: dict,
                 tied_embeddings: bool):
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.parts, self.optimizers, self.schedulers = parts, optimizers, schedulers
        self.dataloader = dataloader
        self.fingerprint = fingerprint
        self.tied = tied_embeddings

    # -- state ------------------------------------------------------------------------------
    def _stored_name(self, key: str, part: nn.Module) -> str:
        """The name ``part``'s state entry has in a checkpoint: a tied head copy is stored as the embedding."""
        if self.tied and part.output is not None and _HEAD in key:
            return key.replace(_HEAD, _EMBEDDING)
        return key

    def _rename(self, flat: dict[str, Any], part: nn.Module) -> dict[str, Any]:
        """``part``'s state under stored names; a head copy is dropped where its embedding is here too."""
        out = {}
        for key, value in flat.items():
            stored = self._stored_name(key, part)
            if stored != key and part.tok_embeddings is not None:
                continue
            out[stored] = value
        return out

    def _model_and_optimizer(self) -> tuple[dict, dict]:
        model, optim = {}, {}
        for part, opt in zip(self.parts, self.optimizers):
            model.update(self._rename(get_model_state_dict(part, options=_OPTIONS), part))
            optim.update(self._rename(get_optimizer_state_dict(part, opt, options=_OPTIONS), part))
        return model, optim

    def _extra(self, step: int) -> dict:
        return {
            "step": step,
            "lr_scheduler": self.schedulers[0].state_dict(),
            "dataloader": self.dataloader.state_dict(),
            "rng": torch.get_rng_state(),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }

    # -- save -------------------------------------------------------------------------------
    def maybe_save(self, step: int, last: bool) -> bool:
        """Save at the interval and at ``last``; returns whether this step is now saved."""
        if not self.cfg.enable or not (last or step % self.cfg.interval == 0):
            return False
        model, optim = self._model_and_optimizer()
        final, partial = self.folder / f"step-{step}", self.folder / f"step-{step}.partial"
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        dcp.save({"model": model, "optimizer": optim, "train": self._extra(step)}, checkpoint_id=str(partial))
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self._prune()
            logger.info(f"saved checkpoint {final}")
        dist.barrier()
        return True

    def _prune(self) -> None:
        if self.cfg.keep_latest_k > 0:
            for old in _steps(self.folder)[: -self.cfg.keep_latest_k]:
                shutil.rmtree(self.folder / f"step-{old}")

    # -- load -------------------------------------------------------------------------------
    def _pick(self) -> Optional[Path]:
        steps = _steps(self.folder)
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise ConfigError("checkpoint.load_step", f"no complete checkpoint step-{self.cfg.load_step} in "
                                  f"{self.folder} (complete ones: {steps or 'none'})")
            return self.folder / f"step-{self.cfg.load_step}"
        return self.folder / f"step-{steps[-1]}" if steps else None

    def load(self) -> int:
        """Restore the newest (or ``load_step``) checkpoint; returns its step, 0 when starting fresh."""
        if not self.cfg.enable:
            return 0
        path = self._pick()
        if path is None:
            return 0
        model, optim = self._model_and_optimizer()
        extra = {"step": 0, "lr_scheduler": self.schedulers[0].state_dict(),
                 "dataloader": self.dataloader.state_dict(), "rng": torch.get_rng_state(), "fingerprint": ""}
        try:
            dcp.load({"train": extra}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as err:  # a truncated or foreign folder
            raise CheckpointError(f"{path} cannot be read ({_last_line(err)}); delete it or pick another "
                                  "with --checkpoint.load_step") from None
        stored = json.loads(extra["fingerprint"])
        differs = {k: (stored.get(k), v) for k, v in self.fingerprint.items() if stored.get(k) != v}
        if differs:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in differs.items())
            raise CheckpointError(f"{path} was written for another model ({detail}); point checkpoint.folder or "
                                  "job.dump_folder elsewhere to start fresh")
        try:
            dcp.load({"model": model, "optimizer": optim}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"{path} does not match this model ({_last_line(err)})") from None
        for part, opt in zip(self.parts, self.optimizers):
            set_model_state_dict(part, self._restore(model, part, get_model_state_dict(part, options=_OPTIONS)),
                                 options=_OPTIONS)
            set_optimizer_state_dict(part, opt, self._restore(optim, part, get_optimizer_state_dict(
                part, opt, options=_OPTIONS)), options=_OPTIONS)
        for scheduler in self.schedulers:
            scheduler.load_state_dict(extra["lr_scheduler"])
        self.dataloader.load_state_dict(extra["dataloader"])  # checked when iteration starts: data_iterator()
        torch.set_rng_state(extra["rng"])
        logger.info(f"resumed from {path} (step {extra['step']})")
        return extra["step"]

    def data_iterator(self):
        """Start the data where the checkpoint left it; a position saved for other data is an error."""
        try:
            return iter(self.dataloader)
        except ValueError as err:
            raise CheckpointError(f"the saved data position does not fit this recipe ({err}); keep the dataset, "
                                  "seq_len and global batch size of the saved run") from None

    def _restore(self, loaded: dict, part: nn.Module, live: dict) -> dict:
        """This part's entries of the loaded state, under its own names (a tied head copy from the embedding)."""
        return {key: loaded[self._stored_name(key, part)] for key in live}
