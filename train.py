"""Train a recipe: ``torchrun --nproc_per_node=N train.py --config configs/X.toml [--section.key value ...]``.

The whole composition is in ``main``, in order: config → process group and
mesh → data → model (meta) → pipeline split → parallelize → init weights →
loss from the registry → optimizer → loop.
"""

import importlib.metadata
import json
import logging
import math
import signal
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from data import build_dataloader, build_tokenizer
from data.loader import check_tokenizer_fits
from losses import build_loss, loss_option_names
from losses.vocab_parallel_head import VocabParallelHeadLoss
from models import Transformer, build_model_args
from models.initialize import init_weights
from parallelisms.activation_checkpoint import apply_activation_checkpointing
from parallelisms.compile import apply_compile
from parallelisms.distributed import close_distributed, init_distributed, resolve_device, set_pg_timeouts
from parallelisms.fsdp import apply_fsdp
from parallelisms.grad_clip import clip_grad_norm_
from parallelisms.parallel_dims import ParallelDims
from parallelisms.pipeline import build_schedule, build_stage_module, plan_pipeline
from parallelisms.tied_embeddings import TiedEmbeddingSync
from parallelisms.vocab_parallel import finalize_head_grads, shard_head_over_vocab
from config.job_config import JobConfig
from training.checkpoint import CheckpointError, CheckpointManager
from training.config_loader import dump_config, load_config
from training.dry_run import DryRun, format_report, split_dry_run_args
from config.errors import ConfigError
from training.faults import FaultWatch, is_collective_failure
from training.memory_estimate import estimate_memory
from training.metrics import (MetricsLogger, gather_peak_memory_gib, peak_flops, peak_memory_gib,
                              pipeline_peak_memory)
from training.optimizer import build_lr_scheduler, build_optimizer
from training.profiling import start_profiler
from training.token_normalization import GlobalTokenMeanLoss

logger = logging.getLogger("train")
# torchdata 0.11 calls an API that torch >= 2.12 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")


class NonFiniteLossError(RuntimeError):
    pass


_NONFINITE_ADVICE = ("try a lower optimizer.lr, more lr_scheduler.warmup_steps, training.max_norm > 0, "
                     "or training.mixed_precision_param = 'float32'")
_OOM_ADVICE = ("out of GPU memory; to use less: a smaller training.local_batch_size (with global_batch_size kept, "
               "gradient accumulation makes up the rest) or parallelism.pipeline_parallel_microbatch_size, "
               "activation_checkpoint.mode = 'full', loss.name = 'cce' (no logits), "
               "parallelism.vocab_parallel = true (classifier never gathered), or more ranks in the layout")


class _StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption with --signal): finish the step, checkpoint, exit 0."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Ranks get the signal at different moments: stop together once any rank has it."""
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


@dataclass
class TrainResult:
    losses: list[float]  # per step, reduced over all ranks
    grad_norms: list[float]  # per step, of the whole model before clipping
    stopped_at: Optional[int]  # the step after which a signal stopped the run
    model_parts: list[torch.nn.Module]  # this rank's (sharded) stages


def _global_batch_size(cfg: JobConfig, dims: ParallelDims) -> int:
    t = cfg.training
    per_micro_step = t.local_batch_size * dims.dp
    g = t.global_batch_size if t.global_batch_size > 0 else per_micro_step
    if g % per_micro_step:
        raise ConfigError("training.global_batch_size",
                          f"{g} is not a multiple of local_batch_size {t.local_batch_size} x data-parallel degree "
                          f"{dims.dp} = {per_micro_step}; gradient accumulation needs whole micro-steps")
    return g


def train(cfg: JobConfig, faults: Optional[FaultWatch] = None) -> TrainResult:
    """Run the recipe in the current process group (started here if there is none).

    ``faults`` (``main`` passes one) is started on that group to name ranks that die or hang.
    """
    t = cfg.training
    device = resolve_device(t.device)
    rank, world_size = init_distributed(device, cfg.comm.init_timeout_seconds)
    if faults is not None:
        faults.start()
    dims = ParallelDims.from_config(cfg.parallelism, world_size)
    global_batch = _global_batch_size(cfg, dims)
    mesh, dp_mesh = dims.build_mesh(device.type)
    pp_mesh = mesh["pp"]
    torch.manual_seed(t.seed)

    model_args = build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size)
    if t.seq_len > model_args.max_seq_len:
        raise ConfigError("training.seq_len", f"{t.seq_len} exceeds the flavor's {model_args.max_seq_len} positions")
    model_args = replace(model_args, max_seq_len=t.seq_len)
    if rank == 0:
        _log_run(cfg, dims, mesh, device)
    pp_enabled = dims.pp > 1
    plan = plan_pipeline(model_args.n_layers, cfg.parallelism, pp_mesh.get_local_rank(), t.local_batch_size) \
        if pp_enabled else None

    try:
        tokenizer = build_tokenizer(cfg.model.tokenizer)
        check_tokenizer_fits(tokenizer, model_args.vocab_size)
    except ValueError as err:
        raise ConfigError("model.tokenizer", str(err)) from None
    try:
        dataloader = build_dataloader(dataset=t.dataset, dataset_path=t.dataset_path, tokenizer=tokenizer,
                                      seq_len=t.seq_len, global_batch_size=global_batch,
                                      dp_rank=dp_mesh.get_local_rank(), dp_degree=dims.dp, seed=t.seed,
                                      vocab_size=model_args.vocab_size)
    except ValueError as err:
        raise ConfigError("training.dataset_path", str(err)) from None

    # Build on the meta device: nothing is allocated until each rank holds only its shard.
    with torch.device("meta"):
        model = Transformer(model_args)
    parts = [build_stage_module(model, plan, s) for s in plan.local_stages] if pp_enabled else [model]
    param_dtype = t.mixed_precision_param if device.type == "cuda" else "float32"
    fsdp_mesh = dims.fsdp_mesh(mesh)
    vocab_parallel = cfg.parallelism.vocab_parallel
    for part in parts:
        apply_activation_checkpointing(part, cfg.activation_checkpoint)
        if cfg.compile.enable and "model" in cfg.compile.components:
            apply_compile(part)
        if vocab_parallel and part.output is not None:
            shard_head_over_vocab(part, fsdp_mesh)  # the classifier is never gathered
        apply_fsdp(part, fsdp_mesh, param_dtype, t.mixed_precision_reduce,
                   cfg.parallelism.fsdp_reshard_after_forward, pp_enabled)
        part.to_empty(device=device)
        init_weights(part, t.seed, device)
        part.train()

    # The loss: chosen by name, applied to the last stage's hidden states through its head.
    head = next((p.output for p in parts if p.output is not None), None)
    loss_options = {k: v for k, v in vars(cfg.loss).items() if k in loss_option_names(cfg.loss.name)}
    if cfg.compile.enable and "loss" in cfg.compile.components and "compile" in loss_options:
        loss_options["compile"] = True
    if head is None:
        loss_sum = None
    elif vocab_parallel:
        common = {k: loss_options[k] for k in ("ignore_index", "z_loss_weight", "label_smoothing", "logit_softcap")}
        group = mesh[cfg.parallelism.vocab_parallel_mesh_dim].get_group()
        loss_sum = VocabParallelHeadLoss(head, group, impl=cfg.loss.name, **common)
    else:
        loss_sum = build_loss(cfg.loss.name, head, loss_options, reduction="sum", device=device)
    loss = GlobalTokenMeanLoss(loss_sum, dp_mesh.get_group())
    separate_head_copy = pp_enabled or vocab_parallel
    tied = TiedEmbeddingSync(parts, plan, mesh) if separate_head_copy and model_args.tie_word_embeddings else None
    schedule = build_schedule(parts, plan, cfg.parallelism.pipeline_parallel_schedule, pp_mesh.get_group(),
                              device, loss) if pp_enabled else None

    # One optimizer and schedule per stage (TorchTitan's layout), so checkpoints key state by parameter name.
    params = [p for part in parts for p in part.parameters()]
    optimizers = [build_optimizer(list(part.parameters()), cfg.optimizer, device) for part in parts]
    schedulers = [build_lr_scheduler(opt, t.steps, cfg.lr_scheduler) for opt in optimizers]
    checkpoint = CheckpointManager(cfg.checkpoint, cfg.job.dump_folder, parts, optimizers, schedulers, dataloader,
                                   cfg.model.name, model_args)
    start_step = checkpoint.load()
    metrics = MetricsLogger(cfg.job.dump_folder, cfg.metrics.enable_tensorboard, active=rank == 0,
                            append=start_step > 0)
    if rank == 0:
        n_params = model_args.num_params()
        logger.info(f"{cfg.model.name} {cfg.model.flavor}: {n_params / 1e6:,.1f}M parameters, vocab "
                    f"{model_args.vocab_size:,}; world {world_size} = pp {dims.pp} x dp_replicate "
                    f"{dims.dp_replicate} x dp_shard {dims.dp_shard}; device {device}; params {param_dtype}")
        if vocab_parallel:
            logger.info(f"vocab-parallel head over dp_shard ({dims.dp_shard} ranks), loss impl {cfg.loss.name!r}")
        logger.info(f"global batch {global_batch} x {t.seq_len} tokens, "
                    f"{global_batch // (t.local_batch_size * dims.dp)} accumulation step(s)")

    flops_per_token = model_args.flops_per_token(t.seq_len)
    peak = peak_flops(device)
    has_first = any(p.tok_embeddings is not None for p in parts)
    losses, grad_norms, data_iter = [], [], checkpoint.data_iterator()
    skipped = 0  # steps whose update was dropped for a non-finite loss or gradient
    stop_request, stopped_at = _StopRequest(), None
    # Groups made since init_process_group had the backend's default; an async save's keeps it.
    set_pg_timeouts(cfg.comm.init_timeout_seconds, device, exclude=(checkpoint.async_group,))
    profiler = start_profiler(cfg.profiling, cfg.job.dump_folder, rank, start_step, t.steps)
    run_start = window_start = time.perf_counter()
    window_tokens = 0
    finished = False  # every rank reached the end (or a stop signal) together
    try:
        for step in range(start_step + 1, t.steps + 1):
            if faults is not None:
                faults.at_step(step)
            local_batch = next(data_iter)["input_ids"].to(device)
            loss.set_global_batch(local_batch, cfg.loss.ignore_index)
            step_loss = torch.zeros((), device=device, dtype=torch.float64)
            for micro in local_batch.split(t.local_batch_size):
                if pp_enabled:
                    mb_losses: list[torch.Tensor] = []
                    target = micro if head is not None else None
                    inputs = (micro,) if has_first else ()
                    schedule.step(*inputs, target=target, losses=mb_losses)
                    step_loss += sum(l.detach().double() for l in mb_losses) if mb_losses else 0.0
                else:
                    micro_loss = loss(model(micro), micro)
                    micro_loss.backward()
                    step_loss += micro_loss.detach().double()
            if vocab_parallel and head is not None:
                finalize_head_grads(head.weight, fsdp_mesh, dims.dp)
            if tied is not None:
                tied.sync_grads()
            grad_norm = clip_grad_norm_(params, t.max_norm, pp_mesh.get_group() if pp_enabled else None,
                                        skip=[tied.head_copy] if tied is not None and tied.head_copy is not None else [])

            # Loss terms live on the last stage, one share per data-parallel rank (a vocab-parallel
            # head's dp_shard group shares one term): average them everywhere.
            dist.all_reduce(step_loss, group=dp_mesh.get_group())
            if pp_enabled:
                dist.all_reduce(step_loss, group=pp_mesh.get_group())
            step_loss = step_loss.item() / dims.dp / (dims.dp_shard if vocab_parallel else 1)
            finite = math.isfinite(step_loss) and math.isfinite(float(grad_norm))  # the same on every rank
            if not finite and (t.nonfinite_policy == "stop" or skipped == t.nonfinite_max_skips):
                what = f"loss {step_loss}, grad norm {float(grad_norm)} at step {step}"
                raise NonFiniteLossError(what + (f" after {skipped} skipped steps" if skipped else "") + "; "
                                         + _NONFINITE_ADVICE)
            if finite:
                for optimizer in optimizers:
                    optimizer.step()
            else:
                skipped += 1
                logger.warning(f"step {step}: loss {step_loss}, grad norm {float(grad_norm)}; update skipped "
                               f"({skipped}/{t.nonfinite_max_skips})")
            lr = schedulers[0].get_last_lr()[0]
            for scheduler in schedulers:
                scheduler.step()
                scheduler.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            grad_norms.append(float(grad_norm))
            window_tokens += global_batch * t.seq_len
            if step % cfg.metrics.log_freq == 0 or step == t.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                tps = window_tokens / elapsed / world_size
                metrics.log(step, t.steps, {
                    "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_second": tps,
                    "mfu_percent": 100 * flops_per_token * tps / peak if peak else None,
                    "peak_memory_gib": peak_memory_gib(device),
                    **(pipeline_peak_memory(device, pp_mesh.get_group()) if pp_enabled else {}),
                }, eta_seconds=(time.perf_counter() - run_start) / (step - start_step) * (t.steps - step))
                window_start, window_tokens = time.perf_counter(), 0
            if step == start_step + 1:  # start-up is over: from now on a rank that stops answering is caught sooner
                set_pg_timeouts(cfg.comm.train_timeout_seconds, device, exclude=(checkpoint.async_group,))
            if profiler is not None:
                profiler.step()
            saved = checkpoint.maybe_save(step, last=step == t.steps)
            if step < t.steps and stop_request.agreed(device):
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
    _report_memory(cfg.job.dump_folder, device, plan, rank)
    return TrainResult(losses, grad_norms, stopped_at, parts)


def _dry_run(cfg: JobConfig, dry_run: DryRun) -> str:
    """``--dry_run``: the layout checks of a run and its predicted memory; no device, no process group."""
    dims = ParallelDims.from_config(cfg.parallelism, dry_run.world_size)
    accumulation = _global_batch_size(cfg, dims) // (cfg.training.local_batch_size * dims.dp)
    return format_report(cfg, dims, estimate_memory(cfg, dims, accumulation), accumulation, dry_run.gpu_memory_gib)


def _log_run(cfg: JobConfig, dims: ParallelDims, mesh, device: torch.device) -> None:
    """Versions, the rank layout and the effective recipe (<dump_folder>/config.toml)."""
    versions = [f"torch {torch.__version__}"]
    for name in ("triton", "cut-cross-entropy"):  # read from the installed metadata: importing triton takes seconds
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} absent")
    logger.info(", ".join(versions) + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    grid = mesh.mesh  # [pp, dp_replicate, dp_shard] of global ranks
    for p in range(dims.pp):
        logger.info(f"pipeline rank {p}: dp_shard groups " + " ".join(str(g) for g in grid[p].reshape(-1, dims.dp_shard).tolist()))
    os.makedirs(cfg.job.dump_folder, exist_ok=True)
    with open(os.path.join(cfg.job.dump_folder, "config.toml"), "w") as f:
        f.write(dump_config(cfg))


def _report_memory(dump_folder: str, device: torch.device, plan, rank: int) -> None:
    """Peak memory of every rank, with its pipeline stages: logged and written to memory.json."""
    peaks = gather_peak_memory_gib(device)
    stages = [None] * dist.get_world_size()
    dist.all_gather_object(stages, list(plan.local_stages) if plan is not None else [])
    if rank == 0:
        per_rank = [round(p, 3) for p in peaks]
        logger.info("peak memory per rank (GiB): " + ", ".join(
            f"{r}:{m:.2f}" + (f" (stages {stages[r]})" if stages[r] else "") for r, m in enumerate(per_rank)))
        with open(os.path.join(dump_folder, "memory.json"), "w") as f:
            json.dump({"peak_memory_gib_per_rank": per_rank, "stages_per_rank": stages}, f)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stdout)
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    faults = FaultWatch()
    try:
        dry_run, argv = split_dry_run_args(argv)
        cfg = load_config(argv)
        if dry_run is not None:
            report = _dry_run(cfg, dry_run)
            if rank == 0:
                print(report)
            return 0
        train(cfg, faults)
    except ConfigError as err:
        if rank == 0:
            print(err, file=sys.stderr)
        return 2
    except CheckpointError as err:
        if rank == 0:
            print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"rank {rank}: {_OOM_ADVICE}", file=sys.stderr)
        return 1
    except NonFiniteLossError as err:
        if rank == 0:
            print(f"stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print("interrupted; exiting", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if not (faults.started and is_collective_failure(err)):
            raise
        faults.report_and_exit(err)  # names the ranks that stopped answering, exits 1
    finally:
        faults.stop()
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
