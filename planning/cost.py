"""Predicted compute time of one pipeline stage per microbatch: what the default split balances.

Each piece's work is counted (FLOPs for the matmul-bound pieces, bytes moved for the
memory-bound ones) and divided by the rate that piece achieved alone on one GPU
(a table per GPU kind, ``planning/rates/``; benchmarks/stage_cost_bench.py times them and writes
the table). What is
left out, so these are compute times only: pipeline sends and receives and FSDP's gathers and
reductions (once per step under PP) are planning/comm.py's; the tied-embedding sync, the
optimizer and host overhead are not predicted.
The rates are bf16 rates, and the blocks' with ``[float8]`` where the table has one (else the bf16 rate, a
prediction on the slow side); a float32 run is not modelled.
"""

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional

import torch

from config.job_config import JobConfig
from losses import ENTRIES, LossChoice, choose_loss, recipe_options
from models import build_model_args
from models.args import ModelArgs
from parallelisms.parallel_dims import ParallelDims
from planning.comm import LINKS

_BF16 = 2  # bytes per activation, gradient and gathered weight element


@dataclass(frozen=True)
class AchievedRates:
    """What each piece achieved alone on one GPU kind, in bf16: one table per kind in
    ``planning/rates/<kind>.json``, written by ``benchmarks/stage_cost_bench.py --write`` (the file's
    ``notes`` say how each figure was measured). TFLOP/s count the FLOPs this module assigns
    (``layer_flops``, ``head_flops``), GB/s the bytes it assigns (``*_bytes``)."""

    gpu: str  # the device the table was measured on, as torch names it
    memory_gib: float  # its memory, as torch reports it: the default GPU size a plan for it is held to
    layer_tflops: float  # a compiled decoder block, fw + bw
    # head + loss, fw + bw, keyed by the loss entries' rate keys (their facts' rate_key); left out of the
    # hash (a mapping has none), kept in equality
    head_tflops: Mapping[str, float] = field(hash=False)
    logits_gbs: float  # the bytes an entry moves per logit beyond its GEMMs (its facts' logit_bytes)
    embedding_gbs: float
    norm_gbs: float
    layer_tflops_float8: Optional[float] = None  # a compiled block with [float8] tensorwise linears; None: not measured

    @classmethod
    def read(cls, path: Path) -> "AchievedRates":
        table = json.loads(path.read_text())
        values = {f.name: table[f.name] for f in dataclasses.fields(cls) if f.name in table}
        return cls(**{**values, "head_tflops": MappingProxyType(dict(values["head_tflops"]))})


RATES_FOLDER = Path(__file__).parent / "rates"
# Every GPU kind measured, by the table's file name: "h100", "h200".
RATES: dict[str, AchievedRates] = {path.stem: AchievedRates.read(path) for path in sorted(RATES_FOLDER.glob("*.json"))}
DEFAULT_GPU = "h100"  # what a plan for no particular GPU (a CPU run, a GPU with no table) uses


@dataclass(frozen=True)
class StageCostInputs:
    """What a stage's time depends on besides its layers and whether it is first or last."""

    model: ModelArgs
    seq_len: int
    microbatch_size: int  # sequences
    loss: str  # a registry entry (losses/registry.py's ENTRIES; "auto" is the caller's to resolve)
    ac_mode: str = "none"  # "none", "full" or "selective"
    ac_option: str = "op"  # selective: "op", or N (every N-th block of a stage fully checkpointed)
    vocab_parallel_degree: int = 1  # ranks sharing the head by vocabulary rows; 1: no vocab-parallel head
    rates: AchievedRates = RATES[DEFAULT_GPU]
    float8: bool = False  # the blocks' linear layers in float8 ([float8], not emulated)

    def __post_init__(self):
        if self.loss not in ENTRIES:
            raise ValueError(f"loss must be one of {list(ENTRIES)} (resolve 'auto' first), got {self.loss!r}")
        if ENTRIES[self.loss].facts.rate_key not in self.rates.head_tflops:
            raise ValueError(
                f"no head rate for loss {self.loss!r} (rate key {ENTRIES[self.loss].facts.rate_key!r}) in "
                f"the {self.rates.gpu} table (planning/rates/): time it with benchmarks/stage_cost_bench.py --write"
            )

    @property
    def tokens(self) -> int:
        return self.microbatch_size * self.seq_len


@dataclass(frozen=True)
class StageTime:
    forward_ms: float
    backward_ms: float

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    def __add__(self, other: "StageTime") -> "StageTime":
        return StageTime(self.forward_ms + other.forward_ms, self.backward_ms + other.backward_ms)

    def __mul__(self, k: float) -> "StageTime":
        return StageTime(self.forward_ms * k, self.backward_ms * k)


def layer_flops(a: ModelArgs, seq_len: int, tokens: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of one decoder block, without recomputation.

    Matmuls: 2 FLOPs per weight per token forward, twice that backward. Attention: the
    scores and their product with V are 4·seq·head_dim FLOPs per head and token without
    a mask; causal flash attention skips the masked half. Its backward is 2.5x its
    forward (FlashAttention-2 recomputes the scores: five matmuls against two).
    """
    d, q, kv = a.dim, a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    weights = 2 * d * q + 2 * d * kv + 3 * d * a.ffn_dim
    attention = 2 * q * seq_len
    return tokens * (2 * weights + attention), tokens * (4 * weights + 2.5 * attention)


def head_flops(a: ModelArgs, loss: str, tokens: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of the output head and loss entry ``loss`` on ``tokens`` tokens:
    its facts' [T, D] x [D, V] GEMMs."""
    forward, backward = ENTRIES[loss].facts.head_gemms
    gemm = 2 * tokens * a.dim * a.vocab_size
    return forward * gemm, backward * gemm


def logits_bytes(a: ModelArgs, loss: str, tokens: int) -> tuple[float, float]:
    """(forward, backward) bytes loss entry ``loss`` moves over its [tokens, V] logits beyond the GEMMs
    (its facts' ``logit_bytes``: ``cross_entropy``'s materialized logits; none for the others)."""
    forward, backward = ENTRIES[loss].facts.logit_bytes
    return forward * tokens * a.vocab_size, backward * tokens * a.vocab_size


def head_rate(c: StageCostInputs) -> float:
    """The head + loss rate, TFLOP/s, of ``c``'s loss entry (its facts' ``rate_key``)."""
    return c.rates.head_tflops[ENTRIES[c.loss].facts.rate_key]


def embedding_bytes(a: ModelArgs, tokens: int) -> tuple[float, float]:
    """Forward: read and write each token's row. Backward: the dense [V, D] gradient zeroed,
    then each token's gradient row read and added (read and write)."""
    row = tokens * a.dim * _BF16
    return 2 * row, a.vocab_size * a.dim * _BF16 + 3 * row


def norm_bytes(a: ModelArgs, tokens: int) -> tuple[float, float]:
    """RMSNorm: forward reads x and writes y; backward reads x and dy and writes dx."""
    row = tokens * a.dim * _BF16
    return 2 * row, 3 * row


def vocab_parallel_bytes(a: ModelArgs, tokens: int, degree: int) -> tuple[float, float]:
    """Bytes each rank receives: the all-gather of the group's hidden states (forward) and the
    reduce-scatter of their gradient (backward). The labels' all-gather is left out (8 bytes a token)."""
    moved = (degree - 1) * tokens * a.dim * _BF16
    return moved, moved


def _ms(forward_backward: tuple[float, float], per_second: float) -> StageTime:
    forward, backward = forward_backward
    return StageTime(1e3 * forward / per_second, 1e3 * backward / per_second)


def layer_rate(c: StageCostInputs) -> float:
    """TFLOP/s of a block: the float8 one where the run has float8 linears and the table measured it."""
    if c.float8 and c.rates.layer_tflops_float8 is not None:
        return c.rates.layer_tflops_float8
    return c.rates.layer_tflops


def layer_time(c: StageCostInputs) -> StageTime:
    """One decoder block without recomputation. Op-level selective AC recomputes only
    pointwise ops: no FLOPs here; its cost is in the measured rate (the recipe's blocks use it)."""
    return _ms(layer_flops(c.model, c.seq_len, c.tokens), layer_rate(c) * 1e12)


def head_time(c: StageCostInputs) -> StageTime:
    """The output head and the loss, fw + bw, on one microbatch.

    Vocab-parallel (degree n): each rank computes the loss of the group's n x tokens gathered
    hidden states against its V/n classifier rows, so its FLOPs equal the unsharded head's;
    what it adds is the all-gather of the hidden states and the reduce-scatter of their
    gradient. (What it saves, never gathering the classifier, is FSDP traffic: not modelled.)
    """
    a, r = c.model, c.rates
    time = _ms(head_flops(a, c.loss, c.tokens), head_rate(c) * 1e12)
    if any(ENTRIES[c.loss].facts.logit_bytes):
        time += _ms(logits_bytes(a, c.loss, c.tokens), r.logits_gbs * 1e9)
    if c.vocab_parallel_degree > 1:
        time += _ms(vocab_parallel_bytes(a, c.tokens, c.vocab_parallel_degree), LINKS.collective_gbs * 1e9)
    return time


def recomputed_blocks(c: StageCostInputs, layers: int) -> int:
    """Blocks of a stage whose forward runs again in the backward, as
    parallelisms/activation_checkpoint.py wraps them (every N-th counted within the stage)."""
    if c.ac_mode == "full":
        return layers
    if c.ac_mode == "selective" and c.ac_option != "op":
        return layers // int(c.ac_option)
    return 0


def stage_time(c: StageCostInputs, layers: int, first: bool, last: bool) -> StageTime:
    """One microbatch through a stage of ``layers`` blocks: the first adds the embedding,
    the last the final norm, the head and the loss."""
    block = layer_time(c)
    time = block * layers + StageTime(0.0, block.forward_ms * recomputed_blocks(c, layers))
    if first:
        time += _ms(embedding_bytes(c.model, c.tokens), c.rates.embedding_gbs * 1e9)
    if last:
        time += _ms(norm_bytes(c.model, c.tokens), c.rates.norm_gbs * 1e9) + head_time(c)
    return time


def head_in_layers(c: StageCostInputs) -> float:
    """The head and loss's fw + bw time in decoder blocks of fw + bw (no recomputation)."""
    return head_time(c).total_ms / layer_time(c).total_ms


def loss_choice(cfg: JobConfig) -> LossChoice:
    """``choose_loss`` for the recipe on the GPU machine it plans for: CUDA, the recipe's
    parameter dtype, every entry's requirements installed."""
    return choose_loss(
        cfg.loss.name,
        recipe_options(cfg.loss, cfg.compile),
        device_type="cuda",
        dtype=getattr(torch, cfg.training.mixed_precision_param),
        vocab_parallel=cfg.parallelism.vocab_parallel,
        gpu_kernels=True,
    )


def stage_cost_inputs(
    cfg: JobConfig, dims: ParallelDims, microbatch_size: int, rates: AchievedRates
) -> StageCostInputs:
    """The recipe's side of a stage's cost: model, resolved loss, AC, vocab-parallel degree; ``microbatch_size``
    sequences per microbatch (the plan's: the recipe's may be "auto"); ``rates`` of the GPU planned for."""
    t, ac, p = cfg.training, cfg.activation_checkpoint, cfg.parallelism
    model = replace(build_model_args(cfg.model.name, cfg.model.flavor, cfg.model.vocab_size), max_seq_len=t.seq_len)
    return StageCostInputs(
        model,
        t.seq_len,
        microbatch_size,
        loss_choice(cfg).entry,
        ac.mode,
        ac.selective_ac_option,
        dims.dp_shard if p.vocab_parallel else 1,
        rates,
        cfg.float8.enable and not cfg.float8.emulate,
    )
