"""Train a recipe: ``torchrun --nproc_per_node=N train.py --config configs/X.toml [--section.key value ...]``.

``train`` is the whole composition, in order: process group → the dump folder's lock → mesh →
data → model (meta) → pipeline split → parallelize → init weights → loss from the registry →
optimizer → checkpoint → (every check passed) config.toml and metrics → loop. ``main`` turns
what can go wrong into one line and an exit code, and closes the process group on every way out.
"""

import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from config.errors import CheckpointError, ConfigError
from config.job_config import JobConfig
from data import build_dataloader, build_tokenizer
from data.document_boundaries import missing_eos_warning
from data.loader import check_tokenizer_fits
from data.token_stream import dataset_files
from data.tokenizer import Tokenizer
from losses import build_loss, recipe_options
from models import ModelArgs, Transformer, build_model_args
from models.initialize import init_weights
from parallelisms.compute_weights import ComputeWeights, optimizer_can_cast
from parallelisms.distributed import close_distributed, init_distributed, resolve_device, set_pg_timeouts
from parallelisms.float8 import check_float8, float8_scale_update
from parallelisms.parallel_dims import ParallelDims
from parallelisms.parallelize import parallelize
from parallelisms.pipeline import PipelinePlan, build_schedule, build_stage_module
from parallelisms.tied_embeddings import tied_embedding_sync
from planning.batch import global_batch_size
from planning.dry_run import check_output_folders_writable, dry_run_report, split_dry_run_args
from planning.gpu import for_device
from planning.schedule_search import choice_lines, choose_pipeline
from planning.timing import split_summary
from training.checkpoint import CheckpointManager
from training.faults import FaultWatch, is_collective_failure
from training.metrics.device import Throughput, peak_flops, peak_memory_gib, pipeline_peak_memory
from training.metrics.logger import MetricsLogger
from training.metrics.writers import check_backends
from training.optimizer import build_lr_scheduler, build_optimizer
from training.preemption import StopRequest
from training.profiling import start_profiler
from training.recipe import load_recipe
from training.run_folder import hold as hold_run_folder
from training.run_log import check_output_folders, log_layout, log_run, report_memory, write_config
from training.step import NonFiniteLossError, QueuedStep, StepOutcome, TrainStep
from training.token_normalization import GlobalTokenMeanLoss
from training.validation import Validator, build_validation_set

logger = logging.getLogger("train")
# torchdata 0.11 calls an API that torch >= 2.12 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")

_OOM_ADVICE = (
    "out of GPU memory; to use less: a smaller training.local_batch_size (with global_batch_size kept, "
    "gradient accumulation makes up the rest) or parallelism.pipeline_parallel_microbatch_size, "
    "activation_checkpoint.mode = 'full', loss.name = 'cce' (no logits), "
    "parallelism.vocab_parallel = true (classifier never gathered), or more ranks in the layout"
)


@dataclass
class TrainResult:
    losses: list[float]  # per step, reduced over all ranks
    grad_norms: list[float]  # per step, of the whole model before clipping
    stopped_at: Optional[int]  # the step after which a signal stopped the run
    model_parts: list[torch.nn.Module]  # this rank's (sharded) stages
    validation: dict[int, dict[str, float]]  # step -> validation_loss and _perplexity, the same on every rank


def train(cfg: JobConfig, faults: Optional[FaultWatch] = None) -> TrainResult:
    """Run the recipe in the current process group (started here if there is none), holding the dump
    folder's lock (training/run_folder.py) from before anything is written into it to the end.

    ``faults`` (``main`` passes one) is started on that group to name ranks that die or hang.
    """
    check_backends(cfg.metrics)
    device = resolve_device(cfg.training.device)
    check_float8(cfg.float8, device)
    rank, world_size = init_distributed(device, cfg.comm.init_timeout_seconds)
    if faults is not None:
        faults.start()
    with hold_run_folder(cfg.job):
        return _train(cfg, device, rank, world_size, faults)


def _train(
    cfg: JobConfig, device: torch.device, rank: int, world_size: int, faults: Optional[FaultWatch]
) -> TrainResult:
    """The composition, in order, while this run holds the dump folder."""
    t = cfg.training
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    global_batch = global_batch_size(cfg, dims)
    mesh, dp_mesh = dims.build_mesh(device.type)
    torch.manual_seed(t.seed)
    model_args = _model_args(cfg)
    check_output_folders(cfg)
    if rank == 0:
        log_run(dims, mesh, device)
    plan = _plan_pipeline(cfg, dims, mesh["pp"].get_local_rank(), device, rank == 0) if dims.pp > 1 else None
    tokenizer = _build_tokenizer(cfg, model_args.vocab_size)
    dataloader = _build_data(cfg, tokenizer, model_args.vocab_size, global_batch, dp_mesh, dims)
    # block_causal masks at the data's EOS: the tokenizer's, known only now.
    model_args = replace(model_args, attn_mask_type=cfg.model.attn_mask_type, eos_id=tokenizer.eos_id)
    if cfg.model.attn_mask_type == "block_causal":
        _check_eos_in_data(cfg, dataloader.dataset.windows, tokenizer.eos_id, rank)

    validation_set = (
        build_validation_set(cfg, tokenizer, model_args.vocab_size, global_batch, dp_mesh.get_local_rank(), dims.dp)
        if cfg.validation.enable
        else None
    )

    # The model, built on the meta device: nothing is allocated until each rank holds only its shard.
    with torch.device("meta"):
        model = Transformer(model_args)
    parts = [build_stage_module(model, plan, s) for s in plan.local_stages] if plan else [model]
    param_dtype = t.mixed_precision_param if device.type == "cuda" else "float32"
    compute_dtype = getattr(torch, param_dtype)  # of the hidden states the loss sees
    for part in parts:
        parallelize(part, cfg, dims.fsdp_mesh(mesh), param_dtype, pp_enabled=plan is not None)
        part.to_empty(device=device)
        init_weights(part, t.seed, device)
        part.train()
    loss = _build_training_loss(cfg, parts, mesh, dp_mesh, device, compute_dtype)
    tied = tied_embedding_sync(parts, plan, mesh, cfg.parallelism.vocab_parallel)
    # On one data-parallel rank, FSDP's casts without its copies (parallelisms/compute_weights.py); FlatAdamW
    # reads the bf16 gradients and writes the bf16 copies, unless a tied copy's gradients are to be summed.
    compute_weights = ComputeWeights(
        parts if dims.dp == 1 else [],
        compute_dtype,
        cfg.parallelism.fsdp_reshard_after_forward,
        plan is not None,
        optimizer_casts=optimizer_can_cast(cfg, dims, model_args.tie_word_embeddings),
    )
    schedule = build_schedule(parts, plan, mesh["pp"].get_group(), device, loss) if plan else None
    # One optimizer and LR schedule per stage (TorchTitan's layout): checkpoints key their state by parameter name.
    copies = compute_weights.copies()
    optimizers = [build_optimizer(list(part.parameters()), cfg.optimizer, copies) for part in parts]
    schedulers = [build_lr_scheduler(opt, t.steps, cfg.lr_scheduler) for opt in optimizers]
    train_step = TrainStep(
        cfg=cfg,
        dims=dims,
        parts=parts,
        compute_weights=compute_weights,
        schedule=schedule,
        loss=loss,
        optimizers=optimizers,
        schedulers=schedulers,
        tied=tied,
        float8_scales=float8_scale_update(cfg.float8, dims.dp_shard, parts),
        mesh=mesh,
        dp_group=dp_mesh.get_group(),
    )
    validator = (
        Validator(
            cfg=cfg,
            parts=parts,
            compute_weights=compute_weights,
            plan=plan,
            loss_sum=loss.loss_sum,
            validation_set=validation_set,
            mesh=mesh,
            dp_group=dp_mesh.get_group(),
            hidden_dtype=compute_dtype,
        )
        if validation_set is not None
        else None
    )

    checkpoint = CheckpointManager(
        cfg=cfg.checkpoint,
        dump_folder=cfg.job.dump_folder,
        parts=parts,
        optimizers=optimizers,
        schedulers=schedulers,
        dataloader=dataloader,
        model_name=cfg.model.name,
        model_args=model_args,
    )
    start_step = checkpoint.load()  # the data position too, checked to be this data's
    data_iter = iter(dataloader)
    # Every check has passed (the last ones: the checkpoint's model and data position): only now does the
    # run leave its recipe and metrics in the folder.
    if rank == 0:
        write_config(cfg)
    metrics = MetricsLogger(cfg, start_step, active=rank == 0)
    if rank == 0:
        log_layout(cfg, model_args, dims, device, param_dtype, global_batch)
    losses, grad_norms, validation = [], [], {}
    stop_request, stopped_at = StopRequest(), None
    # Groups made since init_process_group had the backend's default; an async save's keeps it.
    set_pg_timeouts(cfg.comm.init_timeout_seconds, device, exclude=(checkpoint.async_group,))
    profiler = start_profiler(cfg.profiling, cfg.job.dump_folder, rank, start_step, t.steps)
    run_start, throughput, finished = time.perf_counter(), Throughput(device, world_size), False
    try:
        unread: Optional[QueuedStep] = None  # a step queued on the device whose figures are not read yet

        def settle(queued: QueuedStep, log: bool) -> None:
            """Read a queued step (the non-finite policy may stop the run here), its figures into the run's
            lists, and its log line if ``log``."""
            outcome = train_step.settle(queued)
            losses.append(outcome.loss)
            grad_norms.append(outcome.grad_norm)
            throughput.add(global_batch * t.seq_len)
            if log:  # tokens/s is timed to this step's end: the host waits for the device (throughput.read)
                step = outcome.step
                eta = (time.perf_counter() - run_start) / (step - start_step) * (t.steps - step)
                note = "" if outcome.updated else "update skipped (training.nonfinite_policy = 'skip')"
                figures = _figures(outcome, throughput.read(), model_args, plan, mesh, device)
                metrics.log(step, t.steps, figures, eta, note)

        for step in range(start_step + 1, t.steps + 1):
            if faults is not None:
                faults.at_step(step)
            queued = train_step(_to_device(next(data_iter)["input_ids"], device), step)
            if unread is not None:  # the step before, read while this one runs
                settle(unread, log=False)
            unread = queued
            stop = step < t.steps and stop_request.agreed(device)
            validate = validator is not None and validator.due(step)
            log = step % cfg.metrics.log_freq == 0 or step == t.steps
            if log or stop or validate or checkpoint.due(step, last=step == t.steps):
                settle(queued, log)  # at once: what is saved, validated or ended on is known good
                unread = None
            if validate:
                with throughput.paused():  # not training: kept out of tokens/s
                    validation[step] = validator.run()
                metrics.log_validation(step, t.steps, validation[step])
            if step == start_step + 1:  # start-up is over: from now on a rank that stops answering is caught sooner
                set_pg_timeouts(cfg.comm.train_timeout_seconds, device, exclude=(checkpoint.async_group,))
            if profiler is not None:
                profiler.step()
            saved = checkpoint.maybe_save(step, last=step == t.steps)
            if stop:
                if not saved and not checkpoint.maybe_save(step, last=False, force=True):
                    logger.warning("checkpoint.enable is off: nothing saved, this run cannot resume")
                logger.info(f"stopping after step {step} on a signal; rerun the same command to resume")
                stopped_at = step
                break
        finished = True
    finally:  # on every way out: nothing of ours left running, and the last async save published
        if profiler is not None:
            profiler.stop()
        metrics.close()
        checkpoint.close(all_ranks=finished)
    report_memory(cfg.job.dump_folder, device, plan, rank)
    return TrainResult(losses, grad_norms, stopped_at, parts, validation)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The batch on ``device``; to a GPU through pinned memory, since a copy from pageable memory makes the host
    wait for the GPU to finish all it was given (the step before, here)."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def _figures(
    outcome: StepOutcome,
    tokens_per_second: float,
    model_args: ModelArgs,
    plan: Optional[PipelinePlan],
    mesh,
    device: torch.device,
) -> dict:
    """A logged step's figures: MFU from the model's FLOPs per token, every pipeline rank's peak memory."""
    peak = peak_flops(device)
    flops = model_args.flops_per_token(model_args.max_seq_len)
    return {
        "loss": outcome.loss,
        "lr": outcome.lr,
        "grad_norm": outcome.grad_norm,
        "tokens_per_second": tokens_per_second,
        "mfu_percent": 100 * flops * tokens_per_second / peak if peak else None,
        "peak_memory_gib": peak_memory_gib(device),
        **(pipeline_peak_memory(device, mesh["pp"].get_group()) if plan else {}),
    }


def _model_args(cfg: JobConfig) -> ModelArgs:
    """The flavor's hyperparameters with the recipe's vocabulary and RoPE table length."""
    args = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size)
    if cfg.training.seq_len > args.max_seq_len:
        raise ConfigError(
            "training.seq_len", f"{cfg.training.seq_len} exceeds the flavor's {args.max_seq_len} positions"
        )
    return replace(args, max_seq_len=cfg.training.seq_len)


def _plan_pipeline(cfg: JobConfig, dims: ParallelDims, pp_rank: int, device: torch.device, log: bool) -> PipelinePlan:
    """This rank's stages. The schedule, split and microbatches are chosen from the recipe, the layout,
    the GPU's rate table and the smallest GPU memory of the run, so every rank makes the same choice;
    checked, as a rank that chose otherwise would hang the first step."""
    gpu = for_device(None, None)
    if device.type == "cuda":
        smallest = torch.tensor(float(torch.cuda.get_device_properties(device).total_memory), device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        gpu = for_device(torch.cuda.get_device_name(device), smallest.item() / 2**30)
    choice = choose_pipeline(cfg, dims, gpu)
    if log:
        for line in choice_lines(choice):
            logger.info(line)
    if choice.problem is not None:
        raise choice.problem
    plan = choice.plan_for(pp_rank)
    decided = (plan.schedule, plan.microbatch_size, plan.layer_ranges)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, decided)
    if any(other != decided for other in everyone):
        raise RuntimeError(f"the ranks chose different pipeline plans (torch versions differ?): {everyone}")
    if log:
        logger.info(split_summary(cfg, dims, plan, gpu.rates))
    return plan


def _build_tokenizer(cfg: JobConfig, vocab_size: int) -> Tokenizer:
    """The recipe's tokenizer: its EOS joins the packed documents and is where block_causal masks."""
    try:
        tokenizer = build_tokenizer(cfg.model.tokenizer, eos_token=cfg.model.eos_token)
        check_tokenizer_fits(tokenizer, vocab_size)
    except ValueError as err:
        raise ConfigError("model.tokenizer", str(err)) from None
    return tokenizer


def _build_data(cfg: JobConfig, tokenizer: Tokenizer, vocab_size: int, global_batch: int, dp_mesh, dims: ParallelDims):
    """This rank's resumable loader of its share of every global batch."""
    t = cfg.training
    try:
        return build_dataloader(
            dataset=t.dataset,
            dataset_path=t.dataset_path,
            tokenizer=tokenizer,
            seq_len=t.seq_len,
            global_batch_size=global_batch,
            dp_rank=dp_mesh.get_local_rank(),
            dp_degree=dims.dp,
            seed=t.seed,
            vocab_size=vocab_size,
            text_column=t.dataset_text_column,
        )
    except ValueError as err:
        raise ConfigError("training.dataset_path", str(err)) from None


def _check_eos_in_data(cfg: JobConfig, windows, eos_id: int, rank: int) -> None:
    """block_causal masks at the tokenizer's EOS: data without it is a config error, or a warning where
    only its first windows were looked at."""
    try:
        warning = missing_eos_warning(windows, eos_id, cfg.training.dataset_path)
    except ValueError as err:
        raise ConfigError("model.attn_mask_type", str(err)) from None
    if warning and rank == 0:
        logger.warning(warning)


def _check_inputs(cfg: JobConfig) -> None:
    """``--dry_run``: what the run would refuse at start-up in its folders, tokenizer and data files, with
    the same one-line errors, found without writing anything or reading the data."""
    check_output_folders_writable(cfg)
    _build_tokenizer(cfg, _model_args(cfg).vocab_size)
    data = [("training", cfg.training.dataset, cfg.training.dataset_path)]
    if cfg.validation.enable:
        data.append(("validation", cfg.validation.dataset, cfg.validation.dataset_path))
    for section, dataset, path in data:
        try:
            dataset_files(dataset, Path(path))
        except ValueError as err:
            raise ConfigError(f"{section}.dataset_path", str(err)) from None


def _build_training_loss(
    cfg: JobConfig, parts, mesh, dp_mesh, device: torch.device, dtype: torch.dtype
) -> GlobalTokenMeanLoss:
    """The recipe's loss on the last stage's hidden states, normalized by the global batch's tokens.

    Pipeline ranks without the last stage get one too (the schedule needs a loss on every rank).
    """
    head = next((p.output for p in parts if p.output is not None), None)
    loss_sum = None
    if head is not None:
        vp = cfg.parallelism.vocab_parallel
        loss_sum = build_loss(
            cfg.loss.name,
            head,
            recipe_options(cfg.loss, cfg.compile),
            reduction="sum",
            device=device,
            dtype=dtype,
            vocab_group=mesh[cfg.parallelism.vocab_parallel_mesh_dim].get_group() if vp else None,
        )
    return GlobalTokenMeanLoss(loss_sum, dp_mesh.get_group())


def _say_once(rank: int, line: str) -> None:
    """The one line of a failure every rank meets alike. Under torchrun each rank leaves it in its error file
    and the launcher (scripts/torchrun.py) prints the first failed rank's: torchrun stops the other ranks as
    soon as one exits, rank 0 perhaps before it printed. Alone, rank 0 prints it."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
    elif rank == 0:
        print(line, file=sys.stderr)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stdout)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    faults = FaultWatch()
    try:
        dry_run, argv = split_dry_run_args(argv)
        cfg = load_recipe(argv)
        if dry_run is not None:
            _check_inputs(cfg)
            report = dry_run_report(cfg, dry_run)
            if rank == 0:
                print(report)
            return 0
        train(cfg, faults)
    except ConfigError as err:
        _say_once(rank, str(err))
        return 2
    except CheckpointError as err:
        _say_once(rank, f"checkpoint error: {err}")
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"rank {rank}: {_OOM_ADVICE}", file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        _say_once(rank, f"stopped: {err}")
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted; exiting", file=sys.stderr)
        return 130
    except Exception as err:
        if faults.started and is_collective_failure(err):
            faults.report_and_exit(err)  # names the ranks that stopped answering, exits 1
        # A bug: its traceback, printed here so that the exception (whose frames hold the
        # run's process groups) is gone before the groups are closed below.
        traceback.print_exc()
        return 1
    finally:
        faults.stop()
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
