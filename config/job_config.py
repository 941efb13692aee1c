"""Recipe configuration: one plain dataclass per TOML section.

Names follow TorchTitan's where it has them. A key with a fixed set of values has them in its
type (``Literal``), a numeric range is a rule in its type (``Annotated[int, Range(ge=1)]``,
``config/rules.py``), a rule between keys is the section's ``check()`` (``JobConfig.check()``
between sections); the loader (``config/loader.py``) checks all three. The attribute docstring
under each field is its documentation: ``python -m scripts.config_docs`` renders docs/config.md
from this file, so a new key needs one.
"""

from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from config.errors import require
from config.rules import NonEmpty, Range

DatasetFormat = Literal["text", "jsonl", "parquet", "tokens"]
Dtype = Literal["bfloat16", "float32"]
PipelineSchedule = Literal["GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
Auto = Literal["auto"]
AttnMaskType = Literal["causal", "block_causal"]

POSITIVE_INTEGER = Range(gt=0, message="must be a positive integer")
AT_LEAST_ONE = Range(ge=1)
NON_NEGATIVE = Range(ge=0)


@dataclass
class Job:
    """Where the run writes, and a note for the reader."""

    dump_folder: Annotated[
        str, NonEmpty("is empty; set it to the folder the run writes to, e.g. ./outputs (. for the current one)")
    ] = "./outputs"
    """Rank 0 creates it and appends one JSON line per logged step to `metrics.jsonl` (appends: a rerun into
    the same folder adds to the file); TensorBoard events go to `tensorboard/` under it, checkpoints to
    `[checkpoint] folder`. Checked before anything is built: a folder that cannot be created or written is
    one line."""

    description: str = ""
    """Free text for the reader of the recipe; the trainer does not read or log it."""

    force_unlock: bool = False
    """Take over the dump folder's `run.lock` when its holder ran on another host or container, where this
    run cannot tell whether it still runs: only once you know that run is gone (its job ended, its node died).
    A stale lock of this host, or of an earlier start of the same Slurm job, is taken over without it; a
    holder still running on this host never is."""


@dataclass
class Model:
    """The architecture, its size, the tokenizer and how attention is masked."""

    name: Literal["llama3", "qwen3"] = "qwen3"
    """Architecture family; picks the flavor table in `models/flavors.py`. Qwen3 has per-head q/k RMSNorm;
    Llama 3 does not."""

    flavor: str = "debug"
    """Size, from the published Hugging Face `config.json` (llama3 `1B` is Llama 3.2, `8B` Llama 3.1; tied
    embedding/head: qwen3 `debug`, `0.6B`, `1.7B`, `4B` and llama3 `1B`; untied: qwen3 `8B`, llama3 `debug`
    and `8B`). `debug`: dim 64, 4 layers, vocab 2048, max 4096 positions, trains on a CPU in seconds."""

    tokenizer: str = "bytes"
    """`bytes`, a path to a Hugging Face `tokenizer.json`, or a folder containing one. `bytes`: UTF-8 bytes as
    ids 0..255, EOS = 256 (257 ids), needs no file. A `tokenizer.json` needs the `tokenizers` package; its
    EOS is `eos_token`, or else the first of `<|endoftext|>`, `<|end_of_text|>`, `</s>`, `<eos>`, `<|eot_id|>`
    it knows. Every id it can emit must be `< vocab_size` of the model."""

    eos_token: str = ""
    """The end-of-sequence token put after every document, a token of the `tokenizer.json`, for one that has
    none of the common ones (e.g. `"<|im_end|>"`). `""` looks for the common ones; must stay `""` with
    `tokenizer = "bytes"`."""

    vocab_size: Annotated[int, Range(ge=0, message="must be >= 0 (0 keeps the flavor's vocabulary)")] = 0
    """Rows of the embedding and the output head. `0` keeps the flavor's (151,936 Qwen3, 128,256 Llama 3,
    2,048 debug); another value replaces it, e.g. `151936` on the debug flavor for the real large-vocabulary
    loss cost on a tiny model."""

    attn_mask_type: AttnMaskType = "causal"
    """TorchTitan's name. `causal`: a position attends to every earlier position of its window (SDPA
    `is_causal`). `block_causal`: only to the earlier positions of its own document, so the documents packed
    into a window never see each other; a document ends at, and includes, the tokenizer's EOS (`eos_token`).
    Labels are unchanged: an EOS still predicts the next document's first token, from its own document only.
    RoPE positions stay those of the window (attention depends only on relative positions). On CUDA,
    FlexAttention with a block mask built once per microbatch and shared by every layer (blocks no query may
    see are skipped); elsewhere SDPA with a dense boolean mask (`models/attention.py`). Under pipeline
    parallel the schedule hands every stage its microbatch's document ids (later stages see hidden states);
    `causal` hands nothing. Not part of a checkpoint: one written under either resumes or fine-tunes under
    the other. `--dry_run` counts it as `causal` (the mask is a few KiB per sequence)."""


@dataclass
class Training:
    """Steps, batch, data, precision, device, and what a non-finite step does."""

    steps: Annotated[int, POSITIVE_INTEGER] = 20
    """Optimizer steps to run; also the length of the LR schedule."""

    local_batch_size: Annotated[int, POSITIVE_INTEGER] = 8
    """Sequences per data-parallel rank per forward/backward (one accumulation micro-step). Under pipeline
    parallel this micro-step is cut into `local_batch_size / pipeline_parallel_microbatch_size` pipeline
    microbatches."""

    global_batch_size: Annotated[
        int, Range(gt=0, also=(-1,), message="must be positive, or -1 for local_batch_size x data-parallel degree")
    ] = -1
    """Sequences per optimizer step over all data-parallel ranks, a multiple of `local_batch_size x dp`
    (`dp = data_parallel_replicate_degree x data_parallel_shard_degree`; pipeline ranks do not multiply
    it). Gradient accumulation steps = `global_batch_size / (local_batch_size x dp)`; `-1` means
    `local_batch_size x dp` (no accumulation). The loss is normalized by the non-ignored target count of the
    whole global batch (all ranks, micro-steps and pipeline microbatches), so the gradient equals the
    single-process token mean for any layout."""

    seq_len: Annotated[
        int,
        POSITIVE_INTEGER,
        Range(
            ge=2,
            message="must be >= 2: a window of one token has no next token to predict, so nothing would be learned",
        ),
    ] = 256
    """Tokens per sequence, at most the flavor's max positions (a window of one token has nothing to
    predict). The data stream is cut into non-overlapping `seq_len` windows (documents packed, EOS between
    them); the model's RoPE table is built for `seq_len`."""

    max_norm: Annotated[float, Range(ge=0, message="must be >= 0 (0 turns clipping off)")] = 1.0
    """Clip the global gradient L2 norm (over FSDP shards and pipeline stages, a tied head copy counted once)
    to this. `0` turns clipping off; the norm is still computed and logged as `grad_norm`."""

    seed: int = 0
    """Seeds `torch.manual_seed`, the weight initialization (identical for every layout) and the data order
    (a seeded permutation of the windows per epoch)."""

    dataset: DatasetFormat = "text"
    """Format of `dataset_path` (`data/README.md`): `text`: documents separated by blank lines; `jsonl`: one
    object per line, its `dataset_text_column` field; `parquet`: one row per document, its
    `dataset_text_column` column, read one record batch at a time; `tokens`: one flat little-endian uint32
    token file, memory-mapped, EOS already in it (`python -m scripts.pretokenize` writes one). Every rank
    tokenizes `text`, `jsonl` and `parquet` data at start-up: past a few GB, pretokenize once and train on
    `tokens`."""

    dataset_path: str = "data/corpus"
    """A file, or for `text`/`jsonl`/`parquet` a folder (its `*.txt`/`*.jsonl`/`*.parquet` files, sorted),
    relative to the current directory. The default is the shipped public-domain corpus (*Persuasion*). Must
    hold at least `seq_len` tokens."""

    dataset_text_column: str = "text"
    """The field (`jsonl`) or string column (`parquet`) holding a document's text; `text` and `tokens`
    ignore it. A Parquet file without the column stops the run naming the columns it has."""

    mixed_precision_param: Dtype = "bfloat16"
    """FSDP2 `MixedPrecisionPolicy.param_dtype`: the dtype parameters are all-gathered and computed in; the
    sharded master weights and AdamW state stay float32. With one data-parallel rank there is no FSDP: each
    step casts the float32 parameters into copies of this dtype for the forward and backward, freed and cast
    again where FSDP would reshard and re-gather (`parallelisms/compute_weights.py`, the same numbers).
    Forced to `float32` on a non-CUDA device (the start-up log shows `params float32`). The `cce` loss needs
    `bfloat16` here."""

    mixed_precision_reduce: Dtype = "float32"
    """FSDP2 `reduce_dtype`: the dtype of the gradient reduce-scatter (and the HSDP all-reduce). With one
    data-parallel rank nothing is reduced: a parameter's one gradient of a step stays in
    `mixed_precision_param` for `FlatAdamW` to read, and several (micro-steps, microbatches) are summed in
    float32 (`parallelisms/compute_weights.py`). Applies on every device."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: `cuda:LOCAL_RANK` when CUDA is available, else the CPU. NCCL on CUDA, gloo on the CPU; a plain
    `python train.py` runs as a world of one through the same code path."""

    nonfinite_policy: Literal["stop", "skip"] = "stop"
    """What a non-finite loss or gradient norm does (every rank sees the same reduced values, so all decide
    alike). `stop`: exit 1 with the step and what to try. `skip`: drop that step's update (the data and LR
    schedule still advance), log it, and stop once `nonfinite_max_skips` steps were skipped."""

    nonfinite_max_skips: Annotated[int, NON_NEGATIVE] = 10
    """With `nonfinite_policy = "skip"`: the next non-finite step after this many skips stops the run."""


@dataclass
class Optimizer:
    """The optimizer and its hyperparameters."""

    name: Literal["AdamW"] = "AdamW"
    """AdamW; `implementation` picks whose."""

    implementation: Literal["flat", "torch"] = "flat"
    """`flat`: `training/flat_adamw.py`, torch's fused AdamW kernel called once per parameter dtype on the local
    shards, its moments in one buffer each (Qwen3-1.7B on one H100: 19.1 ms a step against `torch`'s 24.0, the
    kernel alone 18.8; docs/performance.md). On one data-parallel rank it reads the backward's bf16 gradients
    as they are and writes the next forward's bf16 weights as it updates, in one Triton pass on CUDA
    (`training/adamw_kernel.py`), where `torch` needs the gradients cast into fp32 first and the weights cast
    after.
    `torch`: `torch.optim.AdamW(fused=True)` over the parameters. The two agree to fp32 rounding and save the
    same checkpoint format: a run resumes with either."""

    lr: Annotated[float, Range(gt=0)] = 3e-4
    """Peak learning rate (reached at the end of warmup)."""

    weight_decay: Annotated[float, NON_NEGATIVE] = 0.1
    """Decoupled weight decay, applied to every parameter (norms and embeddings included), as TorchTitan
    does."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW `(beta1, beta2)`: two numbers in `[0, 1)`."""

    eps: Annotated[float, Range(gt=0)] = 1e-8
    """AdamW epsilon."""

    def check(self) -> None:
        require(
            len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            f"expected two numbers in [0, 1), got {self.betas!r}",
        )


@dataclass
class LRScheduler:
    """LR at optimizer step `s` (0-based) is `lr x factor(s)`: `(s + 1) / (warmup_steps + 1)`
    during warmup, then `min_lr_factor + (1 - min_lr_factor) x shape(p)` with
    `p = (s - warmup_steps) / (steps - warmup_steps)`. The last step has
    `p = 1 - 1/(steps - warmup_steps)`, so the LR ends just above `lr x min_lr_factor`."""

    warmup_steps: Annotated[int, NON_NEGATIVE] = 0
    """Linear warmup steps; the first step already uses `lr / (warmup_steps + 1)`, not 0. At least
    `training.steps` (the run ends inside its warmup, as a short benchmark of a long recipe does) is
    obeyed, with a warning at start-up saying the LR the run ends at."""

    decay_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay after warmup: `cosine` `0.5 (1 + cos(pi p))`, `linear` `1 - p`, `constant` stays at
    `lr` (ignores `min_lr_factor`)."""

    min_lr_factor: Annotated[float, Range(ge=0, le=1)] = 0.1
    """Fraction of `lr` the cosine/linear decay goes down to."""


@dataclass
class Loss:
    """The model returns final hidden states `[B, S, D]`; the loss entry applies the
    output head through `head(hidden, fn)` (so FSDP unshards the head weight for it)
    and computes next-token cross-entropy, reduction "sum", divided by the global
    token count (see `training.global_batch_size`). Under pipeline parallel the
    entry is the schedule's `loss_fn` on the last stage. Labels are the inputs,
    shifted by one inside the loss; the last position of every sequence has no
    target.

    `name` picks a registry entry (`losses/registry.py`); the other keys are the options entries
    take, whose valid values `losses/options.py` checks (each key says them). An option that the
    chosen entry cannot honour is accepted only at its default; any other value is a `ConfigError`
    naming the entries that can (`auto` takes the options every pick can honour, plus `compile`,
    used when it picks `chunked`; `chunk_size` and `filter_eps` need a named entry).

    `auto` with a non-default `z_loss_weight` or `label_smoothing` resolves to
    `chunked`. A named entry that cannot compute the loss on the run's device and
    `training.mixed_precision_param` (e.g. `cce` with `float32` params, whose
    backward takes only bf16/fp16) stops the run when the loss is built, with one
    line naming why and what to use."""

    name: str = "auto"
    """A registry entry (`losses/registry.py`; each is listed below with what it computes) or `auto`:
    `chunked`, and on the vocab-parallel head `cce` where its kernels can compute the loss, else `chunked`
    (`losses/resolve.py`; the run log and `--dry_run` say what was chosen and why)."""

    ignore_index: int = -100
    """Targets equal to it are excluded from the loss and from the global token count. The data pipeline
    never emits `-100`, so the default only marks the shifted-out last position; set it to a real id (e.g. a
    pad id) to stop training on that token."""

    z_loss_weight: float = 0.0
    """`>= 0`. Adds `z_loss_weight x logsumexp(logits)^2` per target (PaLM z-loss), keeping the softmax
    normalizer near 1. `0` is off."""

    label_smoothing: float = 0.0
    """In `[0, 1)`. Label smoothing as in `F.cross_entropy`: `(1 - eps) CE + eps x` the mean over the
    vocabulary of `-log p`."""

    logit_softcap: float = 0.0
    """`>= 0`. `cap x tanh(logits / cap)` before the softmax (Gemma 2 style); `0` is off."""

    chunk_size: int = 0
    """`>= 0`. Tokens per chunk of `chunked`. `0` sizes it by memory: the largest multiple of 128 tokens whose
    `[chunk, V]` logits block fits in 256 MiB (768 at Qwen3's 151,936-entry vocabulary in bf16, 1,024 for
    Llama 3, 512 for a 256k vocabulary). Longer chunks run a few percent faster for proportionally more
    memory, since the classifier gradient is read back and rewritten once per chunk (2,048 tokens: Qwen3's
    loss over 8k tokens 10-13 % faster, 2 % more tokens/s end to end on one H100; [performance.md](performance.md));
    `--dry_run` counts the block. A chunk as long as a microbatch is the materialized logits again."""

    compile: bool = False
    """`torch.compile` the per-chunk elementwise math of `chunked`'s PyTorch path (the CPU, and fp64); on CUDA
    its Triton kernels run instead. Collectives stay eager. Also switched on by `[compile] enable` with
    `"loss"` in `components`; applies to `auto` too."""

    filter_eps: Union[str, float] = "default"
    """`"default"`, `"high"`, `"auto"`, or a number `>= 0`: the gradient filter of `cce` and `chunked`, which
    leaves out of the backward the logit gradients whose entries are all below this. `"default"` is each
    entry's own: `cce` filters at `"high"` (cut-cross-entropy's default), `chunked` is exact. `"high"` and
    `"auto"` are the same: `finfo(dtype).eps / 32` (2.44e-4 for bf16). `0` skips nothing. `cce` skips
    blocks of tokens x vocabulary in its backward kernel; `chunked` skips a token chunk's slab of 4,096
    vocabulary entries in both gradient GEMMs (waiting for the GPU once per chunk to read which). The loss
    itself stays exact; what filtering did to a real run's loss is in [performance.md](performance.md). The
    vocab-parallel head takes only `"default"`."""


@dataclass
class Parallelism:
    """The device mesh is `(pp, dp_replicate, dp_shard)`, pp outermost, so
    `dp_shard` groups consecutive ranks (within a node first). Its product must be the
    world size. There is no tensor or context parallel dimension.

    **The default split.** Without `pipeline_parallel_stage_split_points` or
    `pipeline_parallel_layers_per_stage`, the layers are split where the predicted time is
    balanced, not evenly: the first stage also runs the embedding, the last the final norm, the
    output head and the loss, which for Qwen3-1.7B is 4.5 decoder layers of work with `chunked`
    and 4.4 with `cce` once predictions are peaked (7.4 on random logits; one H200, 1 x 4,096 tokens).
    Each stage's time per microbatch comes from a cost model of its pieces (`planning/cost.py`: FLOPs
    or bytes over rates measured per piece by `benchmarks/stage_cost_bench.py`; the resolved loss
    entry, activation checkpointing, the vocab-parallel head's collectives included). Among the splits
    giving every stage at least one layer, the planner takes the one whose slowest stage is fastest,
    then the second slowest, and so on; on a tie earlier stages take the extra layer, as the even
    split does. With several stages per rank it also computes the split that balances the ranks (a
    rank's stages summed; under `ZBVZeroBubble` rank 0 holds both the embedding's and the head's
    stage) and keeps whichever of the two finishes first when torch's action lists for the
    schedule are replayed with the predicted times. When the GPU's size is known (the run's GPU;
    `--dry_run`'s `--gpu_memory_gib`), only splits whose every rank fits it by the memory estimate
    are considered (exact with one stage per rank; with several, each stage gets an equal share);
    if none fits, the balanced split is kept and the dry run shows the rank that does not. For the
    PP=4 recipe under 1F1B this gives 8/8/8/4 layers with `cce` and with `chunked`. The explicit keys
    win, exactly as written. With the schedule, the virtual stages or the microbatch size at `auto`,
    every candidate gets its own balanced split and the shortest predicted step wins. `--dry_run` prints
    the split, why, and each rank's predicted time
    ([performance.md](performance.md#balancing-the-pipeline-stages-predictions))."""

    data_parallel_replicate_degree: Annotated[int, AT_LEAST_ONE] = 1
    """HSDP replicas. `> 1` gives FSDP2 a 2-D `(dp_replicate, dp_shard)` mesh: parameters sharded within a
    replica, gradients all-reduced across replicas."""

    data_parallel_shard_degree: Annotated[
        int, Range(ge=1, also=(-1,), message="must be >= 1, or -1 to fill the remaining ranks")
    ] = -1
    """FSDP2 shard degree; `-1`: world size / (`pipeline_parallel_degree x data_parallel_replicate_degree`)."""

    pipeline_parallel_degree: Annotated[int, AT_LEAST_ONE] = 1
    """Pipeline ranks; `> 1` splits the layers into stages (`torch.distributed.pipelining`). The first stage
    holds the embedding, the last the final norm and the head and returns hidden states to the loss, so
    logits never cross a stage boundary. A tied embedding/head is split into two copies (first and last
    stage) whose gradients are summed after backward, as in Megatron."""

    pipeline_parallel_schedule: Literal[Auto, PipelineSchedule] = "auto"
    """`auto`: the candidate (schedule x virtual stages x microbatch size, over the keys left at `auto`)
    whose replay of torch's action lists with the predicted stage, transfer and FSDP times gives the
    shortest step within the GPU's memory (`planning/schedule_search.py`); the run log and `--dry_run` list
    the best candidates and why the winner won. `GPipe`, `1F1B`: exactly one stage per rank.
    `Interleaved1F1B`, `InterleavedZeroBubble`: at least 2 stages per rank, rank `r` holds stages
    `r, r+pp, r+2pp, ...`. `ZBVZeroBubble`, `DualPipeV` (where the installed torch has it): exactly 2 stages
    per rank in a V (rank `r` holds `r` and `2pp-1-r`, so the last stage sits on rank 0). A named schedule is
    obeyed; one that cannot run (stage-count rules, microbatch count, memory, a torch that cannot split the
    backward for the zero-bubble ones) stops the run with one line naming the fix. Gradients are not
    rescaled by the schedule: the loss already carries the global normalization."""

    pipeline_parallel_microbatch_size: Annotated[Union[int, Auto], AT_LEAST_ONE] = "auto"
    """Sequences per pipeline microbatch, dividing `local_batch_size`; microbatches per step =
    `local_batch_size / microbatch_size`, which must be `>= pipeline_parallel_degree` for every schedule but
    `GPipe`. `auto`: chosen with the schedule, among the sizes that divide the local batch (and
    validation's)."""

    pipeline_parallel_layers_per_stage: Annotated[
        int, Range(ge=0, message="must be >= 0 (0 splits the layers evenly)")
    ] = 0
    """Layers per stage, dividing `n_layers`, giving `n_layers / layers_per_stage` equal stages (a multiple
    of `pipeline_parallel_degree`); set, it replaces the balanced default. `0`: `pipeline_parallel_degree x
    pipeline_parallel_virtual_stages` stages, split by predicted time (the default split, above). Exclusive
    with `pipeline_parallel_stage_split_points`."""

    pipeline_parallel_stage_split_points: list[int] = field(default_factory=list)
    """Strictly increasing layer indices in `1..n_layers-1`, where each stage after the first starts, e.g.
    `[7, 14, 21]` for 4 stages of a 28-layer model; `len + 1` stages. Set, it replaces the balanced default
    exactly as written (`[7, 14, 21]` is the old even split of Qwen3-1.7B)."""

    pipeline_parallel_virtual_stages: Annotated[Union[int, Auto], AT_LEAST_ONE] = "auto"
    """Stages per pipeline rank when neither of the two keys above is set; `2` or more for the interleaved
    schedules, exactly `2` for the V schedules. `auto`: chosen with the schedule (1 for `GPipe` and `1F1B`,
    2 for the V schedules, 2 up to layers / pipeline degree for the interleaved ones). Ignored when the stage
    count comes from `layers_per_stage` or `stage_split_points`."""

    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """Whether FSDP2 frees the gathered parameters after forward (re-gathers in backward). `default`, as
    TorchTitan: without pipeline parallel reshard every block but the last (its backward comes right away);
    with pipeline parallel reshard nothing, since it would re-gather once per microbatch. An untied head
    stays gathered from the loss's forward to its backward except under `always`; a tied embedding/head (no
    pipeline) lives in the root group, which is then never resharded after forward. `always`: everything
    else reshards too, the last block and the head included (least memory, most all-gathers). `never`:
    nothing reshards (ZeRO-2-like memory). With one data-parallel rank there is no FSDP, and this chooses the
    same for the step's bf16 copies of the parameters (`parallelisms/compute_weights.py`): freed after the
    forward and cast again when the backward starts."""

    vocab_parallel: bool = False
    """The last stage's classifier stays sharded by vocabulary rows over `vocab_parallel_mesh_dim` (never
    all-gathered); ranks all-gather hidden states and labels instead and the loss runs vocab-parallel (`cce`
    kernels on CUDA, chunked elsewhere; `loss.name` must be `auto`, `cce` or `chunked`, and
    `chunk_size`/`compile` stay at their defaults). Tied embeddings keep their tie by a per-shard gradient
    sum. When it pays: [vocab_parallel.md](vocab_parallel.md). With `dp_shard` 1 there is nothing to shard
    over: the run says so and trains as without it."""

    vocab_parallel_mesh_dim: Literal["dp_shard"] = "dp_shard"
    """The mesh dimension whose ranks each hold a contiguous slice of the head's vocabulary rows: the FSDP
    shard dimension, whose rows each rank already owns (the mesh has no tensor-parallel dimension)."""

    def check(self) -> None:
        require(
            not (self.pipeline_parallel_layers_per_stage and self.pipeline_parallel_stage_split_points),
            "parallelism.pipeline_parallel_stage_split_points",
            "set either this or pipeline_parallel_layers_per_stage, not both",
        )
        require(
            all(isinstance(x, int) and not isinstance(x, bool) for x in self.pipeline_parallel_stage_split_points),
            "parallelism.pipeline_parallel_stage_split_points",
            "expected a list of layer indices where new stages start, e.g. [7, 14, 21]",
        )


@dataclass
class ActivationCheckpoint:
    """Recomputing activations in backward instead of keeping them."""

    mode: Literal["none", "full", "selective"] = "none"
    """`full`: recompute every transformer block in backward. `selective`: see `selective_ac_option`.
    Applied per block, before compile and FSDP."""

    selective_ac_option: str = "2"
    """`"op"`, or a positive integer as a string (TOML needs the quotes: `"2"`); read only when
    `mode = "selective"`. `"op"`: op-level selective AC inside every block, saving the outputs of `aten.mm`
    (and `[float8]`'s `_scaled_mm`), the SDPA kernels and FlexAttention (`block_causal` on CUDA) and
    recomputing the rest. `"N"`: full AC on every N-th block (blocks `N-1, 2N-1, ...`, counted within each
    pipeline stage)."""

    def check(self) -> None:
        if self.mode == "selective":
            option = self.selective_ac_option
            require(
                option == "op" or (option.isdigit() and int(option) > 0),
                "activation_checkpoint.selective_ac_option",
                f"expected 'op' or a positive integer N (every N-th block), got {option!r}",
            )


@dataclass
class Compile:
    """`torch.compile` of the model's blocks and the loss."""

    enable: bool = False
    """Master switch; `components` is read only when it is `true`."""

    components: list[Literal["model", "loss"]] = field(default_factory=lambda: ["model", "loss"])
    """`model`: `torch.compile(fullgraph=True)` each transformer block in place, after AC and before FSDP as
    TorchTitan does (parameter names unchanged). `loss`: sets `[loss] compile = true` for the entries that
    take it (`chunked`, and `auto` when it picks `chunked`); the others need no compiling."""


@dataclass
class Float8:
    """Float8 matmuls in the transformer blocks' linear layers (torchao's `Float8Linear`, as TorchTitan's
    float8 converter), on CUDA GPUs of compute capability 8.9 or newer (H100, H200, L40S, RTX 4090). The output
    head stays in `training.mixed_precision_param`: it lives in the loss. Parameters, gradients, optimizer
    state and checkpoints are unchanged (a float8 run's checkpoint resumes in a bf16 run and back); only the
    matmuls' operands are cast. Needs `pip install torchao` (pinned in `requirements-cuda.txt`)."""

    enable: bool = False
    """Convert the blocks' `nn.Linear` layers whose both dimensions are multiples of 16 (`torch._scaled_mm`'s
    rule) and that `filter_fqns` does not keep. Where it cannot run (no CUDA, a GPU below sm_89, torchao
    missing) the run stops before anything is built, with one line."""

    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """Scaling granularity. `tensorwise`: one scale per tensor, the fastest; with `parallelism.dp_shard` > 1
    FSDP all-gathers the weights in float8 (half the bytes) with scales computed once per step for all layers
    after the optimizer step. `rowwise`: one scale per row, closer to bf16 numerically, slower (and gathered
    in bf16)."""

    filter_fqns: list[str] = field(default_factory=list)
    """Linear layers kept in bf16: any whose name contains one of these strings, e.g. `["w2"]` or
    `["layers.0."]`."""

    emulate: bool = False
    """Cast as float8 does but multiply in float32, on any device (the CPU included): for checking a float8
    recipe's numerics and checkpoints without a GPU of sm_89; no speed-up."""


@dataclass
class Metrics:
    """What rank 0 logs, and how often."""

    log_freq: Annotated[int, AT_LEAST_ONE] = 1
    """Log every N steps and at the last step, on rank 0 (a validation, `[validation]`, is a record and a
    console line of its own): console line and `metrics.jsonl` with `loss` (global token mean), `lr`,
    `grad_norm` (before clipping), `tokens_per_second` (per rank, averaged over the window since the last
    log), `mfu_percent` (dense bf16 peak of H100/H200/A100/B200; null elsewhere), `peak_memory_gib` (CUDA:
    max allocated since start; CPU: peak RSS) and, with pipeline parallel, `peak_memory_gib/pp_rank_<r>` for
    every pipeline rank `r` (its stages; `memory.json` lists which), gathered over the pp group. A
    non-finite figure is written as JSON `null`, and the console line says which and why."""

    enable_tensorboard: bool = False
    """Also write the same scalars to `<dump_folder>/tensorboard` (needs the `tensorboard` package)."""

    enable_wandb: bool = False
    """Also log the same scalars to Weights & Biases, from rank 0 (needs `pip install wandb`). W&B's own
    environment variables choose where: `WANDB_PROJECT` (default "headroom"), `WANDB_ENTITY`,
    `WANDB_NAME`, `WANDB_RUN_GROUP`; the effective recipe is the run's config. Each launch is a W&B run of
    its own (`WANDB_RUN_ID` and `WANDB_RESUME=allow` continue one). `WANDB_MODE=offline` writes under
    `<dump_folder>/wandb` for a later `wandb sync`; without `WANDB_MODE` the run goes offline by itself,
    with a warning, when the W&B server does not answer within seconds or the online start fails."""


@dataclass
class Profiling:
    """torch.profiler traces, as TorchTitan's section (`training/profiling.py`). Every rank
    writes `<dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json`; open
    it in https://ui.perfetto.dev or chrome://tracing, or print where the step's GPU time went
    with `python scripts/trace_summary.py <trace>` (matmul, attention, communication, Triton,
    optimizer, idle, the longest idle gaps). Steps count as the run counts them, so a resumed run continues."""

    enable_profiling: bool = False
    """Trace one step in every `profile_freq` (CPU ops, and CUDA kernels where there is a GPU). Costs time on
    the traced and warm-up steps only."""

    save_traces_folder: str = "profile_traces"
    """Where traces go, a path relative to `job.dump_folder`."""

    profile_freq: Annotated[
        int, Range(ge=2, message="must be >= 2 (each traced step follows one untraced warm-up step)")
    ] = 10
    """Trace steps N, 2N, 3N, ...; the step before each is the profiler's warm-up."""


@dataclass
class Comm:
    """Collective timeouts, as TorchTitan's. The default process group is created with
    `init_timeout_seconds`; once the process group, the mesh and the other groups
    exist, all of them take it, and after the first training step all of them switch
    to `train_timeout_seconds` (after a barrier, so that no rank is held to the short
    limit while a peer is still starting up). Gloo and NCCL alike.

    When a rank dies (its peers' collectives fail at once) or hangs (they fail after
    the timeout), every other rank checks in on the c10d store, prints one line naming
    the ranks that did not, e.g. `rank 1 stopped answering (died or hung) at step 7;
    the other ranks exit. Check the log of rank 1; raise comm.train_timeout_seconds if
    a step legitimately takes longer (first error: ...)`, and exits with status 1
    (`training/faults.py`). On NCCL, a collective that times out may instead be ended
    by PyTorch's watchdog, which aborts the process; torchrun's failure summary then
    lists the ranks that ended."""

    init_timeout_seconds: Annotated[int, Range(gt=0, message="must be a positive number of seconds")] = 300
    """How long a collective waits for the other ranks from start-up through the first step: model build,
    checkpoint or Hugging Face load, compile, the first step. Raise it for a large checkpoint on a slow
    filesystem."""

    train_timeout_seconds: Annotated[int, Range(gt=0, message="must be a positive number of seconds")] = 100
    """How long a collective waits after the first step, i.e. how long a hung rank goes unnoticed (a dead one
    is seen at once). A step may take longer than this; what it bounds is how far one rank may fall behind
    the others at a collective, e.g. a slow checkpoint write on one rank."""


@dataclass
class Checkpoint:
    """Distributed checkpoints (`training/checkpoint.py`, torch's DCP). Parameters and optimizer state are stored
    by parameter name, which is the same under every layout, so a checkpoint written by one layout (say
    pp=2 x dp_shard=2 with the vocab-parallel head) loads into another (one process, dp_shard=4, vocab parallel
    off). A tied head copy is stored once, as the embedding. Hugging Face weights come in through
    `initial_load_path` and go out through `python -m scripts.export_hf` (README, "Checkpoints and resuming")."""

    enable: bool = False
    """Save checkpoints and resume from them. With it on, a run whose folder holds a complete checkpoint
    continues from the newest one: model, optimizer state, LR schedule position, data position, RNG state and
    step, so the losses continue bitwise. The settings come from the recipe, not the checkpoint: a changed
    `[optimizer]` value, `training.steps` or `[lr_scheduler]` key is used from the resumed step on, one log line
    each, and every resumed step has the LR a fresh run of the recipe has at that step. SIGTERM or SIGUSR1
    (Slurm preemption) make every rank finish the step, save and exit 0."""

    folder: str = "checkpoint"
    """Where checkpoints go, a path relative to `job.dump_folder`: one `step-N/` folder each. A save is
    written to `step-N.partial/` and renamed when every rank has finished, so a crash mid-save never leaves a
    folder that looks complete. Before the first step, rank 0 creates the folder and a probe file in it; a
    folder that cannot be written stops every rank with one config error naming the path and the OS
    reason."""

    interval: Annotated[int, AT_LEAST_ONE] = 500
    """Save every N steps; the last step is always saved."""

    keep_latest_k: Annotated[int, Range(ge=0, message="must be >= 0 (0 keeps all)")] = 0
    """Keep only the newest K checkpoints (0 keeps all), counting only the current branch: after a rollback
    (see `load_step`) the abandoned branch's checkpoints are set aside before the first save, so they never
    push this run's saves out."""

    load_step: Annotated[int, Range(ge=0, also=(-1,), message="must be a saved step, or -1 for the newest")] = -1
    """A saved step: resume from `step-N` instead of the newest (`-1`); a step with no complete checkpoint is
    an error listing the complete ones. Resuming a step older than the newest complete checkpoint is a
    rollback: once it is loaded, before the first save, rank 0 moves the newer `step-*/` folders (the
    abandoned branch) into `abandoned-from-step-N-<YYYYmmdd-HHMMSS>/` in `folder` and logs where; nothing is
    deleted, and the next rerun without `load_step` continues the new branch (move them back to return to
    the old one). A checkpoint of another model (flavor, vocabulary, any `ModelArgs` field) stops the run
    with a message that says what differs; a damaged one (a file missing, shorter than `.metadata` says, or
    whose crc32 differs from the one recorded while saving) with one that names the file and the other
    complete steps to pass here instead. A run never silently starts over when one is there. A step at or
    past `training.steps` (nothing left to train) is one line before anything is loaded or moved."""

    async_mode: Literal["disabled", "async"] = "disabled"
    """`async`: a save copies the state to CPU memory (the only stall) and DCP's `async_save` writes it in a
    background thread, over a gloo process group of its own, while training goes on. The rename to
    `step-N/` and the `keep_latest_k` pruning wait until the write has finished (seen at the next step; the
    next save and the end of the run wait for it). One save is in flight at a time; a crash mid-write leaves
    only a `.partial` folder. Costs CPU memory for one copy of the rank's model and optimizer shards."""

    initial_load_path: str = ""
    """A checkpoint folder (`step-N/`, with `.metadata`) or a Hugging Face model folder (`config.json` and
    `*.safetensors`): where a run starts when `folder` has no complete checkpoint (or `enable` is off).
    Another run's checkpoint must be of the same model as for resuming; a Hugging Face folder must hold the
    recipe's model (Qwen3, Llama 3). Its `config.json` must be a JSON object that matches the flavor and
    `vocab_size` (sizes, heads, `head_dim`, `rope_theta`, RoPE scaling, norm eps, tied embeddings); a
    difference stops the run naming the fields, a damaged file naming the file. Before any weight is read,
    the safetensors headers are checked: with `model.safetensors.index.json` every file it lists must be
    there, no other `*.safetensors` may be (a leftover of another export) and each tensor must be in the
    file it names; without one, no tensor may be in two files. A violation stops the run with one line
    naming the files. Each rank reads only its own shards and stages, cast to float32. A run's own
    checkpoint, once there, always wins over this. `""`: the seeded initialization."""

    initial_load_model_only: bool = True
    """`true`: only the weights come from `initial_load_path`; optimizer, LR schedule, data position and step
    start fresh. `false` (a checkpoint folder only; with a Hugging Face folder it is an error): everything is
    restored as in a resume, step included."""

    last_save_model_only: bool = False
    """The save after the last step holds only the weights, in `export_dtype`: smaller, for
    `scripts/export_hf.py` or another run's `initial_load_path`. It cannot be resumed; a run that would
    resume from it stops with a checkpoint error. Interval saves and a stop signal's save stay complete."""

    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The weights' dtype in a `last_save_model_only` save; every other save keeps float32."""

    restart_data_order: bool = False
    """When the checkpoint's data position was saved for other data (other tokens, seq_len, global batch size or
    seed), start this data's order from its first batch instead of stopping. Unchanged data (also moved,
    re-spelled or pre-tokenized) resumes its position either way, so the key may stay set for later reruns."""


@dataclass
class Validation:
    """The mean next-token loss on held-out data, as TorchTitan's section (`training/validation.py`).
    After every `freq`-th step and after the last, every rank evaluates the first `steps` global
    batches of `dataset_path` in file order (not shuffled; a global batch is training's, `training.global_batch_size`
    windows of `seq_len` tokens), each data-parallel rank taking its contiguous slice of each batch as the
    training loader does: the same windows every time and, for a given global batch size, on any number of
    ranks. The loss is the recipe's `[loss]` module with reduction "sum" on the last stage's hidden states
    under `torch.no_grad` (no backward, no `[tokens, vocab]` logits; `ignore_index` as in training), summed
    over all ranks and divided by the number of targets: the exact token mean. Under pipeline parallel the
    stages run a forward-only pass of their own for every schedule (`parallelisms/pipeline_forward.py`
    says why not the schedule's `eval()`). Rank 0 logs `validation_loss` and `validation_perplexity`
    (`exp` of the loss) as a record of their own in `metrics.jsonl` and TensorBoard and a console line
    `step 500/2000  validation_loss 3.1416  validation_perplexity 23.14`; `scripts/plot_metrics.py` draws
    them in a panel. The time spent is kept out of `tokens_per_second`. Validation reads its own data and
    draws no random numbers, so training losses and a resume stay bitwise the same (tested with validation at
    different steps)."""

    enable: bool = False
    """Validate; the other keys are read only when it is `true` (their ranges are checked either way)."""

    dataset: DatasetFormat = "text"
    """Format of `dataset_path`, as `training.dataset`; the text of `jsonl`/`parquet` documents is in
    `training.dataset_text_column`."""

    dataset_path: str = ""
    """The held-out data: a file, or for `text`/`jsonl`/`parquet` a folder, relative to the current
    directory; required when enabled. Read and checked at start-up, before the model is built: a missing
    path, or fewer windows than `steps x` the global batch, stops the run with one line saying how many it
    has and needs."""

    freq: Annotated[int, AT_LEAST_ONE] = 500
    """Validate after every N-th step; also after the last step."""

    steps: Annotated[int, AT_LEAST_ONE] = 10
    """Global batches evaluated each time (`steps x training.global_batch_size` windows)."""

    local_batch_size: Annotated[int, Range(ge=0, message="must be >= 0 (0: training.local_batch_size)")] = 0
    """Sequences per forward on each data-parallel rank, dividing the global batch / dp (a memory knob: with
    no backward it can be larger than training's); under pipeline parallel a multiple of
    `pipeline_parallel_microbatch_size`, each forward cut into microbatches of that size. `0`:
    `training.local_batch_size`."""

    seq_len: Annotated[int, Range(ge=0, message="must be >= 0 (0: training.seq_len)")] = 0
    """Tokens per validation window, at most `training.seq_len`. `0`: `training.seq_len`, beyond which the
    model has no positions."""

    def check(self) -> None:
        require(
            not self.enable or bool(self.dataset_path),
            "validation.dataset_path",
            "is empty; set it to the held-out data (a file, or a folder of validation.dataset files)",
        )


@dataclass
class JobConfig:
    """The whole recipe: one field per TOML section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    loss: Loss = field(default_factory=Loss)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    validation: Validation = field(default_factory=Validation)

    def check(self) -> None:
        """Rules between sections, after every section's own."""
        ck = self.checkpoint
        require(
            not ck.enable or ck.load_step < self.training.steps,
            "checkpoint.load_step",
            f"step {ck.load_step} is not before training.steps {self.training.steps}: nothing would be trained; "
            f"raise training.steps above {ck.load_step} or pick an earlier step",
        )
        v = self.validation
        if not v.enable:
            return
        require(
            v.seq_len <= self.training.seq_len,
            "validation.seq_len",
            f"{v.seq_len} exceeds training.seq_len {self.training.seq_len}, the positions the model is built for",
        )
        mbs = self.parallelism.pipeline_parallel_microbatch_size
        local = v.local_batch_size or self.training.local_batch_size
        require(
            self.parallelism.pipeline_parallel_degree == 1 or mbs == "auto" or local % mbs == 0,
            "validation.local_batch_size",
            f"{local} is not a multiple of parallelism.pipeline_parallel_microbatch_size {mbs}",
        )
