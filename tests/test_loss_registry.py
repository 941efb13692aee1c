"""The registry's entries describe themselves: every entry walked through the resolver, the memory
model and the cost model; an entry that leaves a fact out is refused."""

import dataclasses
import importlib.util

import pytest
import torch

from config.errors import ConfigError
from losses import ENTRIES, LossFacts, OutputLoss, build_loss, choose_loss, validate_loss_options
from losses.entries.chunked import ChunkedCrossEntropy
from losses.facts import UNSET, LossShape
from losses.options import COMMON_OPTIONS, OPTIONS
from losses.registry import AUTO_PREFERENCE, registered
from models.flavors import QWEN3_FLAVORS
from models.output_head import OutputHead
from parallelisms.parallel_dims import ParallelDims
from planning.cost import MEASURED, StageCostInputs, head_time, stage_time
from planning.memory import estimate_memory, loss_workspace
from planning.pipeline_plan import recipe_plan
from training.config_loader import load_config

QWEN = QWEN3_FLAVORS["1.7B"]
V, D = QWEN.vocab_size, QWEN.dim
EVERY_ENTRY = pytest.mark.parametrize("name", list(ENTRIES))

# Measured, not derived from the facts: what each entry allocated beyond its inputs and the new
# gradients at the Qwen3-1.7B loss shape, 8,192 tokens, bf16, forward + backward (MiB), and its head +
# loss time on a 1 x 4,096 microbatch (ms), from docs/performance.md: the H100 loss table and the
# H200 stage-cost runs; cce_torch_compile's time from the H100 loss table (25.9 ms at 8k), cce's with
# peaked predictions.
MEASURED_MIB_BEYOND_GRADIENTS = {"cross_entropy": 13618, "chunked": 222, "cce": 1, "cce_torch_compile": 2374}
MEASURED_HEAD_MS = {"chunked": 13.76, "cross_entropy": 18.0, "cce": 12.54, "cce_torch_compile": 25.9 / 2}


def _runs_here_setting(name):
    """A device and dtype the entry's facts say it runs on (forward and backward)."""
    facts = ENTRIES[name].facts
    device = "cpu" if facts.devices is None or "cpu" in facts.devices else sorted(facts.devices)[0]
    dtype = torch.bfloat16 if facts.backward_dtypes is None else facts.backward_dtypes[0]
    return device, dtype


# --- the resolver -----------------------------------------------------------------------


@EVERY_ENTRY
def test_the_resolver_takes_every_entry_where_its_facts_allow(name):
    cls, facts = ENTRIES[name], ENTRIES[name].facts
    device, dtype = _runs_here_setting(name)
    choice = choose_loss(name, {}, device_type=device, dtype=dtype, gpu_kernels=True)
    assert choice.entry == name and choice.kernels and choice.reason and name in choice.describe()
    if facts.devices is not None:  # elsewhere it is refused, naming where it runs
        with pytest.raises(ConfigError, match=f"only, not on {'meta'}"):
            choose_loss(name, {}, device_type="meta", dtype=dtype, gpu_kernels=True)
    bias = dict(device_type=device, dtype=dtype, bias=True, gpu_kernels=True)
    if facts.bias:
        assert choose_loss(name, {}, **bias).entry == name
    else:
        with pytest.raises(ConfigError, match="bias"):
            choose_loss(name, {}, **bias)
    for key in sorted(COMMON_OPTIONS - cls.options):  # what it cannot compute is refused in the recipe
        with pytest.raises(ConfigError, match=f"{name!r} cannot {OPTIONS[key].capability}"):
            validate_loss_options(name, {key: 0.5})
    vocab_parallel = dict(device_type=device, dtype=dtype, vocab_parallel=True, gpu_kernels=True)
    if facts.vocab_parallel is not None:
        assert choose_loss(name, {}, **vocab_parallel).entry == name
    else:
        with pytest.raises(ConfigError, match="the vocab-parallel head runs"):
            choose_loss(name, {}, **vocab_parallel)
    if facts.requires is None or facts.requires() is None:
        head = OutputHead(8, 16, bias=facts.bias)
        loss = build_loss(name, head, {}, device=torch.device(device), dtype=dtype)
        assert type(loss) is cls and loss.choice.entry == name


def test_auto_prefers_entries_that_can_run_where_it_tries_them():
    for vocab_parallel, preference in AUTO_PREFERENCE.items():
        for name, _ in preference:
            assert name in ENTRIES
            assert not vocab_parallel or ENTRIES[name].facts.vocab_parallel is not None
    # whatever it needs, auto finds an entry: its last choice runs anywhere
    assert ENTRIES[AUTO_PREFERENCE[False][-1][0]].facts.devices is None


# --- the memory model --------------------------------------------------------------------


@EVERY_ENTRY
def test_memory_model_counts_every_entry_as_measured(name):
    """The workspace beyond the gradients matches what benchmarks/loss_bench.py measured, and the
    qwen3 1.7B PP=4 recipe's estimate carries it on its last stage."""
    facts = ENTRIES[name].facts
    n, grads = 8192, 2 * (V + 8192) * D  # bf16 gradients of the classifier and the hidden states
    workspace = facts.workspace(LossShape(V, n, D, 2, 0, False, 0))
    beyond = (workspace - grads) / 2**20
    assert beyond == pytest.approx(MEASURED_MIB_BEYOND_GRADIENTS[name], rel=0.03, abs=2)

    cfg = load_config(["--config", "configs/qwen3_1p7b_pp4.toml", "--loss.name", name])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    plan = recipe_plan(cfg, dims, 0, 80.0)
    estimates = estimate_memory(cfg, dims, plan)
    on_last = loss_workspace(cfg, QWEN, 4096, dims.dp_shard, head_reduced_at_once=False)
    assert on_last >= 2 * (V + 4096) * D
    assert estimates[-1].transient >= on_last and all(m.peak > 0 for m in estimates)


@pytest.mark.parametrize("name", [name for name in ENTRIES if ENTRIES[name].facts.vocab_parallel is not None])
def test_memory_model_counts_every_vocab_parallel_entry(name):
    cfg = load_config(["--config", "configs/qwen3_1p7b_fsdp.toml", "--loss.name", name, "--parallelism.vocab_parallel"])
    dims = ParallelDims.from_config(cfg.parallelism, 4)
    (every_rank,) = estimate_memory(cfg, dims, None)
    tokens = cfg.training.local_batch_size * cfg.training.seq_len
    rows = -(-V // 4)
    # at least: the shard's gradient, the gathered hidden states and their gradient
    assert loss_workspace(cfg, QWEN, tokens, 4, False) >= 2 * rows * D + 2 * 2 * 4 * tokens * D
    assert every_rank.peak > 0


# --- the cost model ----------------------------------------------------------------------


@EVERY_ENTRY
def test_cost_model_times_every_entry_as_measured(name):
    facts = ENTRIES[name].facts
    forward, backward = facts.head_gemms
    assert forward >= 1 and forward + backward >= 3  # the logits GEMM and both gradient GEMMs, at least
    c = StageCostInputs(QWEN, 4096, 1, name, "selective", "op")
    head = head_time(c)
    assert head.total_ms == pytest.approx(MEASURED_HEAD_MS[name], rel=0.05)
    last, middle = stage_time(c, 4, False, True), stage_time(c, 4, False, False)
    assert last.total_ms - middle.total_ms > head.total_ms  # the final norm besides


def test_cost_model_refuses_an_entry_without_a_rate():
    rates = dataclasses.replace(MEASURED, head_tflops={k: v for k, v in MEASURED.head_tflops.items() if k != "cce"})
    with pytest.raises(ValueError, match="no head rate for loss 'cce'"):
        StageCostInputs(QWEN, 4096, 1, "cce", rates=rates)


# --- an entry that leaves a fact out ------------------------------------------------------


class _Incomplete(OutputLoss):
    name = "incomplete"
    facts = dataclasses.replace(ChunkedCrossEntropy.facts, rate_key=UNSET, workspace=UNSET)


class _NoFacts(OutputLoss):
    name = "no_facts"


def test_an_entry_that_leaves_a_fact_out_is_refused_naming_both():
    with pytest.raises(TypeError, match=r"'incomplete' \(.*_Incomplete\) leaves out its facts rate_key, workspace"):
        registered(_Incomplete)
    with pytest.raises(TypeError, match=r"'no_facts' .* declares no facts"):
        registered(_NoFacts)
    assert LossFacts().missing() == [f.name for f in dataclasses.fields(LossFacts)]


def test_the_registry_refuses_it_when_imported(monkeypatch):
    """Import a fresh copy of losses/registry.py with one registered entry missing a fact."""
    monkeypatch.setattr(ChunkedCrossEntropy, "facts", dataclasses.replace(ChunkedCrossEntropy.facts, devices=UNSET))
    spec = importlib.util.spec_from_file_location("fresh_registry", importlib.util.find_spec("losses.registry").origin)
    with pytest.raises(TypeError, match=r"loss entry 'chunked' .* leaves out its facts devices"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
