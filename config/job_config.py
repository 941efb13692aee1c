"""Recipe configuration: one plain dataclass per TOML section.

Names follow TorchTitan's where it has them. A key with a fixed set of values has
them in its type (``Literal``), which is what the loader checks a value against.
Every field is documented in ``docs/config.md``; ``training/config_loader.py`` turns
TOML + CLI overrides into a validated ``JobConfig``.
"""

from dataclasses import dataclass, field
from typing import Literal, Union

DatasetFormat = Literal["text", "jsonl", "parquet", "tokens"]
Dtype = Literal["bfloat16", "float32"]
LossName = Literal["auto", "chunked", "cce", "cce_torch_compile", "cross_entropy"]
PipelineSchedule = Literal["GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
Auto = Literal["auto"]
AttnMaskType = Literal["causal", "block_causal"]


@dataclass
class Job:
    dump_folder: str = "./outputs"
    description: str = ""


@dataclass
class Model:
    name: Literal["llama3", "qwen3"] = "qwen3"
    flavor: str = "debug"
    tokenizer: str = "bytes"
    eos_token: str = ""  # a tokenizer.json's end-of-sequence token; "" looks for the common ones
    vocab_size: int = 0  # 0 keeps the flavor's vocabulary
    attn_mask_type: AttnMaskType = "causal"  # "block_causal": no attention across an EOS inside a packed window


@dataclass
class Training:
    steps: int = 20
    local_batch_size: int = 8
    global_batch_size: int = -1  # -1: local_batch_size x data-parallel degree (no accumulation)
    seq_len: int = 256
    max_norm: float = 1.0
    seed: int = 0
    dataset: DatasetFormat = "text"
    dataset_path: str = "data/corpus"
    dataset_text_column: str = "text"  # the JSONL field or Parquet column holding the text
    mixed_precision_param: Dtype = "bfloat16"
    mixed_precision_reduce: Dtype = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nonfinite_policy: Literal["stop", "skip"] = (
        "stop"  # a non-finite loss or gradient norm: "stop", or "skip" the update
    )
    nonfinite_max_skips: int = 10  # with "skip": stop after this many skipped steps


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class LRScheduler:
    warmup_steps: int = 0
    decay_type: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_factor: float = 0.1


@dataclass
class Loss:
    """``name`` picks a registry entry (losses/registry.py); the other fields are the options
    entries take (losses/options.py says which entry honours which, and their valid values)."""

    name: LossName = "auto"
    ignore_index: int = -100
    z_loss_weight: float = 0.0
    label_smoothing: float = 0.0
    logit_softcap: float = 0.0
    chunk_size: int = 0  # 0: sized by memory (a 256 MiB block of logits)
    compile: bool = False
    filter_eps: Union[str, float] = "high"  # cut-cross-entropy's threshold: "high" (= "auto") or a number


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    data_parallel_shard_degree: int = -1  # -1: whatever the other degrees leave
    pipeline_parallel_degree: int = 1
    pipeline_parallel_schedule: Literal[Auto, PipelineSchedule] = "auto"
    """The pipeline schedule. ``"auto"``: the candidate (schedule x virtual stages x microbatch size, over
    the keys left at ``"auto"``) whose replay of torch's action lists with the predicted stage, transfer
    and FSDP times gives the shortest step within the GPU's memory (planning/schedule_search.py); the
    run log and ``--dry_run`` list the best candidates and why the winner won. GPipe, 1F1B: one stage
    per rank; Interleaved1F1B, InterleavedZeroBubble: 2 or more; ZBVZeroBubble, DualPipeV: exactly 2,
    in a V (rank r holds stages r and 2pp-1-r)."""
    pipeline_parallel_microbatch_size: Union[int, Auto] = "auto"
    """Sequences per pipeline microbatch (divides ``training.local_batch_size``); ``"auto"``: chosen with
    the schedule, among the sizes that divide the local batch (and validation's)."""
    pipeline_parallel_layers_per_stage: int = 0  # 0: split evenly
    pipeline_parallel_stage_split_points: list[int] = field(default_factory=list)
    pipeline_parallel_virtual_stages: Union[int, Auto] = "auto"
    """Stages per pipeline rank when neither key above sets the stage count; ``"auto"``: chosen with the
    schedule (1 for GPipe and 1F1B, 2 for the V schedules, 2 up to layers / pipeline degree for the
    interleaved ones)."""
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    vocab_parallel: bool = False
    vocab_parallel_mesh_dim: Literal["dp_shard"] = "dp_shard"


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    selective_ac_option: str = "2"  # selective: "op", or N to checkpoint every N-th block


@dataclass
class Compile:
    enable: bool = False
    components: list[Literal["model", "loss"]] = field(default_factory=lambda: ["model", "loss"])


@dataclass
class Metrics:
    log_freq: int = 1
    enable_tensorboard: bool = False


@dataclass
class Profiling:
    enable_profiling: bool = False
    save_traces_folder: str = "profile_traces"  # under job.dump_folder
    profile_freq: int = 10  # trace every N-th step (after one warm-up step)


@dataclass
class Comm:
    init_timeout_seconds: int = 300  # collectives from start-up through the first step (build, load, compile)
    train_timeout_seconds: int = 100  # every collective after that: how long a hung rank goes unnoticed


@dataclass
class Checkpoint:
    enable: bool = False
    folder: str = "checkpoint"  # under job.dump_folder
    interval: int = 500  # steps between saves; the last step is always saved
    keep_latest_k: int = 0  # 0 keeps every checkpoint
    load_step: int = -1  # -1: resume from the newest complete checkpoint, if any
    async_mode: Literal["disabled", "async"] = (
        "disabled"  # "async": write in a background thread after a copy to CPU memory
    )
    initial_load_path: str = ""  # a DCP checkpoint or Hugging Face folder to start from when `folder` has none
    initial_load_model_only: bool = True  # from initial_load_path take only the weights
    last_save_model_only: bool = False  # the final save holds only the weights (for export, not resume)
    export_dtype: Literal["float32", "bfloat16", "float16"] = (
        "float32"  # dtype of the weights in a model-only final save
    )


@dataclass
class Validation:
    """The loss on held-out data every ``freq`` steps and after the last: the first ``steps`` global batches
    (training's global batch size) of ``dataset_path`` in file order, the same windows every time."""

    enable: bool = False
    dataset: DatasetFormat = "text"
    dataset_path: str = ""  # held-out data, in training.dataset_text_column for jsonl/parquet; required when enabled
    freq: int = 500  # evaluate every N steps (and after the last step)
    steps: int = 10  # global batches evaluated each time
    local_batch_size: int = 0  # sequences per forward on each data-parallel rank; 0: training.local_batch_size
    seq_len: int = 0  # 0: training.seq_len, which it may not exceed


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    loss: Loss = field(default_factory=Loss)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    validation: Validation = field(default_factory=Validation)
