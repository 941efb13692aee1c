"""Distributed checkpoints (torch.distributed.checkpoint): exact resume, any layout.

A checkpoint holds the model and optimizer by fully-qualified parameter name
(layer indices are global, so pipeline stages, FSDP shards and the
vocab-parallel head all map onto the same names and DCP reshards between
layouts), the LR schedule, the data position, the RNG state and the step.
A tied head copy (pipeline stages, vocab-parallel head) is stored once, as the
embedding.

Saves are atomic: DCP writes ``step-N.partial/``, which becomes ``step-N/``
only after every rank finished; a folder without ``.metadata`` or still named
``.partial`` is never resumed from. An async save copies the state to CPU memory
and writes it in a background thread; its rename waits until the write is done.

Every file carries a crc32 computed while it is written (training/checksums.py), checked before a
checkpoint is read: a damaged file is named, with the other complete steps to resume instead. A checkpoint
saved before checksums existed is checked file by file against its ``.metadata`` once a load fails.

A resume takes the state from the checkpoint and the settings from the recipe: the optimizer's
hyperparameters and the LR schedule (training/optimizer.py), each change logged; the data position
only if it was saved for the same tokens (data/fingerprint.py), else one line, or with
``restart_data_order`` this data's order from its first batch.

Resuming a step older than the newest complete one is a rollback: the newer checkpoints, another
branch, are moved into ``abandoned-from-step-N-<time>/`` before the first save, so that pruning and
the next rerun see only the new branch.

A run whose folder holds no checkpoint yet may start from ``initial_load_path``:
another run's checkpoint, or a Hugging Face folder read through DCP's
``HuggingFaceStorageReader`` under the same names (models/hf_adapter.py), so that
every rank reads only its own slices, once its files are checked not to mix two exports
(training/hf_checkpoint.py).
"""

import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from config.errors import CheckpointError, ConfigError
from config.job_config import Checkpoint
from data.fingerprint import fingerprint_changes, names_by_path
from models.args import ModelArgs
from models.hf_adapter import config_mismatches, to_hf_name
from parallelisms.distributed import on_rank0
from training.checksums import ChecksummingWriter, damaged_files
from training.hf_checkpoint import check_weight_files, is_hf_folder, read_hf_config
from training.optimizer import keep_recipe_hyperparameters, recipe_hyperparameters, schedule_changes

logger = logging.getLogger("train")

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_HEAD, _EMBEDDING = "output.weight", "tok_embeddings.weight"
_FIX_INITIAL = "point checkpoint.initial_load_path at a checkpoint of this recipe's model"
_ITEM_START = b"PK\x03\x04"  # every item DCP writes is a torch.save zip archive, which starts so
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def complete_steps(folder: Path) -> list[int]:
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


def check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` and a file in it now (rank 0; every rank raises the same error): a folder that
    cannot be written stops the run with one line naming ``key`` before anything is built, not at the
    first save ``interval`` steps in."""
    probe = folder / ".write-probe"

    def create_and_remove() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()

    failure = on_rank0(create_and_remove)
    if failure is not None:
        raise ConfigError(key, f"cannot write to {folder} ({failure}); point {key} at a writable place")


def model_fingerprint(args: ModelArgs) -> dict[str, str]:
    """What a checkpoint must have been written for: every ``ModelArgs`` field but the RoPE table length
    and the attention mask, which are no property of the weights (and leaving the mask out keeps the
    fingerprint of checkpoints written before it existed)."""
    return {k: str(v) for k, v in vars(replace(args, max_seq_len=0)).items() if k not in ("attn_mask_type", "eos_id")}


def _starts_items(file: Path, offsets: list[int]) -> bool:
    """Whether a saved item starts at each of ``offsets`` in ``file``."""
    with file.open("rb") as f:
        for offset in offsets:
            f.seek(offset)
            if f.read(len(_ITEM_START)) != _ITEM_START:
                return False
    return True


def broken_files(path: Path) -> list[str]:
    """``name: what is wrong`` for each file of checkpoint ``path`` that is missing, shorter than its
    ``.metadata`` says, or holds something else where a saved item should start (what a checkpoint
    saved before checksums, ``training/checksums.py``, can still be checked for).

    Called once a load has failed, to tell a damaged checkpoint from one of another model, and by
    scripts/export_hf before it reads one. It reads a few bytes per item, not the data, so every rank
    can afford it; the same files give every rank the same answer, so no rank waits for another.
    """
    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as err:
        return [f".metadata: cannot be read ({_last_line(err)})"]
    items: dict[str, list] = {}
    for info in storage.values():
        items.setdefault(info.relative_path, []).append(info)
    damaged = []
    for name, infos in sorted(items.items()):
        file, end = path / name, max(info.offset + info.length for info in infos)
        if not file.is_file():
            damaged.append(f"{name}: missing")
        elif file.stat().st_size < end:
            damaged.append(f"{name}: truncated ({file.stat().st_size} of {end} bytes)")
        elif not _starts_items(file, [info.offset for info in infos]):
            damaged.append(f"{name}: overwritten (its items are not where .metadata says)")
    return damaged


def _load_error(path: Path, err: BaseException, what: str, fix: str) -> CheckpointError:
    """Why ``dcp.load`` of checkpoint ``path`` failed: its damaged files if it has any, else ``what`` and DCP's
    cause; ``fix`` (what the user can do) depends on where the path came from."""
    damaged = broken_files(path)
    if damaged:
        return CheckpointError(f"{path} is corrupt ({', '.join(damaged)}); {fix}")
    return CheckpointError(f"{path} {what} ({_last_line(err)}); {fix}")


def _read_metadata(path: Path, fix: str):
    try:
        return dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read ({_last_line(err)}); {fix}") from None


def _check_files(path: Path, metadata, fix: str) -> None:
    """Refuse a checkpoint any file of which differs from the checksum it was saved with (every rank, the same)."""
    damaged = damaged_files(path, {info.relative_path for info in metadata.storage_data.values()})
    if damaged is None:
        logger.info(f"{path} has no checksums (saved before checkpoints carried them): its files are not verified")
    elif damaged:
        raise CheckpointError(f"{path} is corrupt ({', '.join(damaged)}); {fix}")


def read_train_state(path: Path, extra: dict, fingerprint: dict[str, str], fix: str) -> None:
    """Check the checkpoint's files against their checksums, then fill ``extra`` with every ``train`` entry it
    holds (what it holds depends on the version that saved it); refuse a damaged checkpoint or one of another
    model. Every rank calls it: they share the checking.

    ``fix`` ends every error: what the user can do, which depends on where the path came from.
    """
    metadata = _read_metadata(path, fix)
    _check_files(path, metadata, fix)
    entries = {
        key: torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("train.")
    }
    try:
        dcp.load(entries, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # a damaged or foreign folder
        raise _load_error(path, err, "cannot be read", fix) from None
    for key, value in entries.items():  # "train.a.b" -> extra["a"]["b"]
        *parents, name = key.split(".")[1:]
        node = extra
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    stored = json.loads(extra.get("fingerprint") or "{}")
    differs = {k: (stored.get(k), v) for k, v in fingerprint.items() if stored.get(k) != v}
    if differs:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs recipe {b!r}" for k, (a, b) in differs.items())
        raise CheckpointError(f"{path} was written for another model ({detail}); {fix}")


def _holds_optimizer(path: Path) -> bool:
    """False for a model-only checkpoint (``last_save_model_only``)."""
    try:
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as err:
        raise CheckpointError(f"{path} cannot be read ({_last_line(err)})") from None
    return any(key.startswith("optimizer.") for key in keys)


def _join_async_save_threads() -> None:
    """``dcp.async_save`` writes each save on an executor of its own, which it shuts down without
    joining once the save is done: join its thread, so that none outlives the run."""
    for thread in threading.enumerate():
        if thread.name.startswith("AsyncCheckpointExecutor") and thread is not threading.current_thread():
            thread.join()


class CheckpointManager:
    """Saves every ``interval`` steps and at the end; resumes from the newest complete checkpoint."""

    def __init__(
        self,
        *,
        cfg: Checkpoint,
        dump_folder: str,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        schedulers: list,
        dataloader,
        model_name: str,
        model_args: ModelArgs,
    ):
        self.cfg = cfg
        self.folder = Path(dump_folder) / cfg.folder
        self.parts, self.optimizers, self.schedulers = parts, optimizers, schedulers
        self.dataloader = dataloader
        self.model_name, self.model_args = model_name, model_args
        self.fingerprint = model_fingerprint(model_args)
        self.tied = model_args.tie_word_embeddings
        self._pending: Optional[tuple[Future, int]] = None  # an async save in flight, and its step
        # An async save runs its collectives in a background thread: on a gloo group of its own, since
        # NCCL has no CPU side and one gloo group cannot take collectives from two threads at once.
        self.async_group = dist.new_group(backend="gloo") if cfg.enable and cfg.async_mode == "async" else None

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

    def _model_states(self) -> list[dict]:
        """Each part's model state under its own names."""
        return [get_model_state_dict(part, options=_OPTIONS) for part in self.parts]

    def _optimizer_states(self) -> list[dict]:
        """Each part's optimizer state under its own names."""
        return [get_optimizer_state_dict(part, opt, options=_OPTIONS) for part, opt in zip(self.parts, self.optimizers)]

    def _stored(self, states: list[dict]) -> dict:
        """The parts' states merged under stored names: what a checkpoint holds. The tensors are
        the parts' own, so loading into this dict fills ``states`` too."""
        merged = {}
        for part, state in zip(self.parts, states):
            merged.update(self._rename(state, part))
        return merged

    def _state(self, step: int, model_only: bool) -> dict:
        train = {"step": step, "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        model = self._stored(self._model_states())
        if model_only:
            dtype = EXPORT_DTYPES[self.cfg.export_dtype]
            return {"model": {k: v.to(dtype) for k, v in model.items()}, "train": train}
        train.update(
            lr_scheduler=self.schedulers[0].state_dict(),
            dataloader=self.dataloader.state_dict(),
            rng=torch.get_rng_state(),
        )
        return {"model": model, "optimizer": self._stored(self._optimizer_states()), "train": train}

    # -- save -------------------------------------------------------------------------------
    def due(self, step: int, last: bool) -> bool:
        """Whether ``maybe_save`` saves this step (unless forced)."""
        return self.cfg.enable and (last or step % self.cfg.interval == 0)

    def maybe_save(self, step: int, last: bool, force: bool = False) -> bool:
        """Save at the interval, at ``last`` (the final step) and when ``force``d; returns whether this step is saved.

        The final save holds only the model with ``last_save_model_only``; a forced one (a stop
        signal) always holds everything, since the run is meant to resume from it.
        """
        if not self.cfg.enable:
            return False
        self._publish_finished(wait=False)
        if not (force or self.due(step, last)):
            return False
        self._publish_finished(wait=True)  # one save in flight at a time
        state = self._state(step, model_only=last and self.cfg.last_save_model_only)
        partial = self.folder / f"step-{step}.partial"
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        dist.barrier()
        writer = ChecksummingWriter(partial)
        if self.async_group is not None:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.async_group)
            self._pending = (future, step)
            return True
        try:
            dcp.save(state, storage_writer=writer)
        except (Exception, CheckpointException) as err:  # on every rank: DCP gathers the ranks' failures
            raise self._save_error(step, err) from None
        dist.barrier()
        failure = on_rank0(lambda: self._publish(step))
        if failure is not None:
            raise self._save_error(step, failure)
        return True

    def _publish(self, step: int) -> None:
        """Rename a finished ``step-N.partial`` to ``step-N`` and prune (rank 0; every rank's writes are done)."""
        final = self.folder / f"step-{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self.folder / f"step-{step}.partial", final)
        self._prune()
        logger.info(f"saved checkpoint {final}")

    def _save_error(self, step: int, err: BaseException) -> BaseException:
        """A save that the file system refused as one line naming the folder and the OS's reason; anything else
        (a rank that died mid-save) as it is. The saved checkpoints are untouched: the run resumes the newest."""
        failures = [err] + [f for f, _ in err.failures.values()] if isinstance(err, CheckpointException) else [err]
        cause = next((f for f in failures if isinstance(f, OSError)), None)
        if cause is None:
            return err
        return CheckpointError(
            f"cannot save step-{step} in {self.folder} ({cause}); make it writable (or free space) and rerun, "
            "which resumes the newest complete checkpoint"
        )

    def _publish_finished(self, wait: bool) -> None:
        """Publish the async save in flight once it is written (``wait``: block until then).

        Rank 0's future completes only after every rank's data and the ``.metadata`` are written,
        so the ranks need no barrier here and rank 0 renames as soon as it sees its future done.
        A failed save is raised only when waited for, where every rank is at the same step and
        raises the same error (DCP gives every rank the failures of all).
        """
        if self._pending is None:
            return
        future, step = self._pending
        if not wait and not (future.done() and future.exception() is None):
            return
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as err:
            raise self._save_error(step, err) from None
        if dist.get_rank() == 0:
            try:
                self._publish(step)
            except OSError as err:
                raise self._save_error(step, err) from None

    def close(self, all_ranks: bool) -> None:
        """Finish an async save still in flight, so that nothing written is lost; call once the loop is over.

        ``all_ranks``: every rank got here (the last step, a stop signal), so they wait for rank 0's
        rename together. Otherwise (an error on this rank) only this rank's part is waited for.
        """
        if self.async_group is None:
            return
        try:
            self._publish_finished(wait=True)
        except (Exception, CheckpointException) as err:  # the save failed too (a peer died): the error raised says more
            if all_ranks:
                raise
            logger.warning(f"the checkpoint being written in the background is lost: {err}")
        _join_async_save_threads()
        if all_ranks:
            dist.barrier()

    def _prune(self) -> None:
        """Keep the newest ``keep_latest_k`` checkpoints: all of this branch, since a rollback set the newer ones
        of the abandoned branch aside (``_set_aside_newer``) before the first save."""
        if self.cfg.keep_latest_k > 0:
            for old in complete_steps(self.folder)[: -self.cfg.keep_latest_k]:
                shutil.rmtree(self.folder / f"step-{old}")

    # -- load -------------------------------------------------------------------------------
    def _pick(self) -> Optional[int]:
        """The step to resume: ``load_step``, else the newest complete checkpoint's (None: there is none)."""
        steps = complete_steps(self.folder)
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in steps:
                raise ConfigError(
                    "checkpoint.load_step",
                    f"no complete checkpoint step-{self.cfg.load_step} in "
                    f"{self.folder} (complete ones: {steps or 'none'})",
                )
            return self.cfg.load_step
        return steps[-1] if steps else None

    def load(self) -> int:
        """Resume this run's newest (or ``load_step``) checkpoint, else start from ``initial_load_path``.

        Returns the step to continue after: 0 for a fresh start or one from initial weights.
        """
        step = self._pick() if self.cfg.enable else None
        if step is not None:
            resumed = self._resume(self.folder / f"step-{step}", self._fix_own(step))
            self._set_aside_newer(step)
            steps = self.schedulers[0].settings["steps"]
            if resumed >= steps:
                logger.info(f"step-{resumed} is at or past training.steps {steps}: nothing to train")
            return resumed
        if not self.cfg.initial_load_path:
            return 0
        initial = Path(self.cfg.initial_load_path)
        if is_hf_folder(initial):
            self._check_hf_config(initial)
            check_weight_files(initial)
            self._load_model(initial, _FIX_INITIAL, hf=True)
        elif self.cfg.initial_load_model_only:
            read_train_state(initial, {"fingerprint": ""}, self.fingerprint, _FIX_INITIAL)
            self._load_model(initial, _FIX_INITIAL, hf=False)
        else:
            return self._resume(initial, _FIX_INITIAL)
        logger.info(f"initial weights from {initial}")
        return 0

    def _check_hf_config(self, folder: Path) -> None:
        differs = config_mismatches(read_hf_config(folder), self.model_name, self.model_args)
        if differs:
            raise CheckpointError(
                f"{folder} holds another model than the recipe's {self.model_name} "
                f"({'; '.join(differs)}); pick the model.flavor and model.vocab_size it has"
            )

    def _set_aside_newer(self, step: int) -> None:
        """After resuming ``step`` while newer checkpoints exist (a rollback), move those, the abandoned branch,
        into ``abandoned-from-step-<step>-<time>/``: left in place, the next rerun would resume them, and pruning
        would count them and delete this branch's saves. Rank 0 moves them; nothing is deleted."""
        aside = self.folder / f"abandoned-from-step-{step}-{time.strftime('%Y%m%d-%H%M%S')}"

        def move() -> None:
            newer = [s for s in complete_steps(self.folder) if s > step]
            if newer:
                aside.mkdir()
                for s in newer:
                    os.replace(self.folder / f"step-{s}", aside / f"step-{s}")
                logger.warning(
                    f"rolled back to step-{step}: moved the newer checkpoints "
                    f"({', '.join(f'step-{s}' for s in newer)}) to {aside}; move them back to continue "
                    "that branch instead"
                )

        failure = on_rank0(move)
        if failure is not None:
            raise CheckpointError(
                f"cannot move the checkpoints newer than step-{step} into {aside} ({failure}); "
                "move them out of the folder yourself, then rerun"
            )

    def _fix_own(self, step: int) -> str:
        """What to do about this run's own ``step-N`` that cannot be resumed: another complete one is the way out."""
        others = ", ".join(str(s) for s in complete_steps(self.folder) if s != step)
        resume = f"resume another complete one with --checkpoint.load_step N (N: {others}), " if others else ""
        return f"{resume}delete it, or point checkpoint.folder or job.dump_folder elsewhere to start fresh"

    def _load_model(self, path: Path, fix: str, hf: bool) -> None:
        """Only the weights, from a DCP checkpoint or a Hugging Face folder (tensors cast to ours on read)."""
        live = self._model_states()
        model = self._stored(live)
        if hf:
            state, reader = {to_hf_name(k): v for k, v in model.items()}, HuggingFaceStorageReader(str(path))
        else:
            state, reader = {"model": model}, dcp.FileSystemReader(str(path))
        try:
            dcp.load(state, storage_reader=reader)
        except (Exception, CheckpointException) as err:
            if hf:
                raise CheckpointError(f"{path} does not match this model ({_last_line(err)}); {fix}") from None
            raise _load_error(path, err, "does not match this model", fix) from None
        for part, state in zip(self.parts, live):
            set_model_state_dict(part, self._restore(model, part, state), options=_OPTIONS)

    def _resume(self, path: Path, fix: str) -> int:
        """Model, optimizer, LR schedule, data position, RNG state and step; returns the step."""
        if not _holds_optimizer(path):
            raise CheckpointError(
                f"{path} holds only model weights (checkpoint.last_save_model_only) and cannot be "
                "resumed as a training run; start a run from it with checkpoint.initial_load_path "
                "(and initial_load_model_only = true) in a checkpoint.folder with no checkpoint yet"
            )
        saved: dict = {}
        read_train_state(path, saved, self.fingerprint, fix)
        restore_data = self._data_position_fits(path, saved["dataloader"]["dataset_state"]["fingerprint"])
        self._load_model(path, fix, hf=False)
        live = self._optimizer_states()
        optim = self._stored(live)
        recipe = [recipe_hyperparameters(opt) for opt in self.optimizers]
        try:
            dcp.load({"optimizer": optim}, checkpoint_id=str(path))
        except (Exception, CheckpointException) as err:
            raise _load_error(path, err, "does not match this model", fix) from None
        changed = {}
        for part, opt, state, kept in zip(self.parts, self.optimizers, live, recipe):
            set_optimizer_state_dict(part, opt, self._restore(optim, part, state), options=_OPTIONS)
            changed.update(keep_recipe_hyperparameters(opt, kept))
        for scheduler in self.schedulers:
            scheduler.load_state_dict(saved["lr_scheduler"])
        self._log_changed_settings(path, changed, saved["lr_scheduler"].get("settings"))
        if restore_data:
            self.dataloader.load_state_dict(saved["dataloader"])
        torch.set_rng_state(saved["rng"])
        logger.info(f"resumed from {path} (step {saved['step']})")
        return saved["step"]

    def _log_changed_settings(self, path: Path, changed: dict[str, tuple], saved_schedule: Optional[dict]) -> None:
        """One line per setting the recipe changed since the checkpoint was saved: the recipe's is in force."""
        schedule = self.schedulers[0].settings
        if saved_schedule is None:
            logger.info(
                f"{path} does not record its LR schedule's settings (saved before it did): the schedule is the "
                f"recipe's ({', '.join(f'{k} {v}' for k, v in schedule.items())})"
            )
        else:
            changed.update(schedule_changes(saved_schedule, schedule))
        for key, (before, now) in changed.items():
            logger.info(f"resuming with the recipe's {key} = {now!r} (the checkpoint's run had {before!r})")

    def _data_position_fits(self, path: Path, saved: dict) -> bool:
        """Whether to restore the saved data position: only on the data it was saved for (by content), else
        one line, or with ``restart_data_order`` this data's order from its first batch."""
        if names_by_path(saved):
            logger.info(
                f"{path} names its data by path (saved before data fingerprints held a digest of the tokens): "
                "matched on token count, seq_len, global batch size and seed"
            )
        changes = fingerprint_changes(saved, self.dataloader.dataset.fingerprint)
        if not changes:
            return True
        if self.cfg.restart_data_order:
            logger.warning(
                f"the data differs from {path.name}'s ({'; '.join(changes)}): its order starts from its first batch "
                "(checkpoint.restart_data_order)"
            )
            return False
        raise CheckpointError(
            f"{path} saved its data position for other data ({'; '.join(changes)}); resume on that data, or pass "
            "--checkpoint.restart_data_order to start this data's order from its first batch"
        )

    def _restore(self, loaded: dict, part: nn.Module, live: dict) -> dict:
        """This part's entries (the keys of ``live``) of the loaded state, under its own names (a tied
        head copy from the embedding)."""
        return {key: loaded[self._stored_name(key, part)] for key in live}
