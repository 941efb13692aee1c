"""The registry's entries describe themselves: every entry walked through the resolver, the memory
model and the cost model; an entry that leaves a fact out is refused; the ``liger`` entry on the CPU."""

import dataclasses
import importlib.util
import sys
import types

import pytest
import torch

from config.errors import ConfigError
from losses import ENTRIES, LossFacts, OutputLoss, build_loss, choose_loss, validate_loss_options
from losses.entries import liger
from losses.entries.chunked import ChunkedCrossEntropy
from losses.entries.liger import LigerLoss
from losses.facts import UNSET, LossShape
from losses.options import COMMON_OPTIONS, OPTIONS
from losses.registry import AUTO_PREFERENCE, registered
from models.flavors import QWEN3_FLAVORS
from models.output_head import OutputHead
from parallelisms.parallel_dims import ParallelDims
from planning.cost import RATES, StageCostInputs, head_time, stage_time
from planning.gpu import of_kind
from planning.memory import estimate_memory, loss_workspace
from planning.schedule_search import choose_pipeline
from tests.reference import IGNORE, reference
from training.recipe import load_recipe

QWEN = QWEN3_FLAVORS["1.7B"]
V, D = QWEN.vocab_size, QWEN.dim
EVERY_ENTRY = pytest.mark.parametrize("name", list(ENTRIES))

# Measured, not derived from the facts: what each entry allocated beyond its inputs and the new
# gradients at the Qwen3-1.7B loss shape, 8,192 tokens, bf16, forward + backward (MiB), and its head +
# loss time on a 1 x 4,096 microbatch (ms), from docs/performance.md: the H100 loss table and the
# H200 stage-cost runs; liger from the H200 peers run (663 MiB with 626 of gradients; 56.3 ms at 8k),
# cce_torch_compile's time from the H100 loss table (25.9 ms at 8k), cce's with peaked predictions.
MEASURED_MIB_BEYOND_GRADIENTS = {"cross_entropy": 13618, "chunked": 222, "cce": 1, "cce_torch_compile": 2374}
MEASURED_MIB_BEYOND_GRADIENTS["liger"] = 663 - 626
MEASURED_HEAD_MS = {"chunked": 13.76, "cross_entropy": 18.0, "cce": 12.54, "cce_torch_compile": 25.9 / 2}
MEASURED_HEAD_MS["liger"] = 56.3 / 2


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

    cfg = load_recipe(["--config", "configs/qwen3_1p7b_pp4.toml", "--loss.name", name])
    dims = ParallelDims.from_config(cfg.parallelism, 8)
    plan = choose_pipeline(cfg, dims, of_kind("h200", 80.0)).plan_for(0)
    estimates = estimate_memory(cfg, dims, plan)
    on_last = loss_workspace(cfg, QWEN, 4096, dims.dp_shard, head_reduced_at_once=False)
    assert on_last >= 2 * (V + 4096) * D
    with_head = next(m for m in estimates if plan.num_stages - 1 in m.stages)  # the V schedules put it on rank 0
    assert with_head.transient >= on_last and all(m.peak > 0 for m in estimates)


@pytest.mark.parametrize("name", ["cce", "chunked"])
def test_the_vocab_parallel_head_refuses_a_filter_eps_it_would_not_apply(name):
    argv = ["--config", "configs/qwen3_1p7b_fsdp.toml", "--loss.name", name, "--parallelism.vocab_parallel"]
    with pytest.raises(ConfigError, match="does not take filter_eps") as err:
        load_recipe([*argv, "--loss.filter_eps", "0"])
    assert err.value.key == "loss.filter_eps"
    load_recipe([*argv, "--loss.filter_eps", "default"])


@pytest.mark.parametrize("name", [name for name in ENTRIES if ENTRIES[name].facts.vocab_parallel is not None])
def test_memory_model_counts_every_vocab_parallel_entry(name):
    cfg = load_recipe(["--config", "configs/qwen3_1p7b_fsdp.toml", "--loss.name", name, "--parallelism.vocab_parallel"])
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
    c = StageCostInputs(QWEN, 4096, 1, name, "selective", "op", rates=RATES["h200"])
    head = head_time(c)
    assert head.total_ms == pytest.approx(MEASURED_HEAD_MS[name], rel=0.05)
    last, middle = stage_time(c, 4, False, True), stage_time(c, 4, False, False)
    assert last.total_ms - middle.total_ms > head.total_ms  # the final norm besides


def test_cost_model_refuses_an_entry_without_a_rate():
    rates = dataclasses.replace(
        RATES["h200"], head_tflops={k: v for k, v in RATES["h200"].head_tflops.items() if k != "liger"}
    )
    with pytest.raises(ValueError, match="no head rate for loss 'liger'"):
        StageCostInputs(QWEN, 4096, 1, "liger", rates=rates)


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


# --- the liger entry, on the CPU -----------------------------------------------------------


def test_liger_facts_and_options():
    facts = LigerLoss.facts
    assert LigerLoss.options == COMMON_OPTIONS and facts.bias and facts.vocab_parallel is None
    assert facts.devices == {"cuda"} and torch.float64 not in facts.forward_dtypes
    # docs/performance.md, one H200: 56.3 ms for Qwen3-1.7B's 8,192 tokens, three [T, D] x [D, V] GEMMs
    assert RATES["h200"].head_tflops[facts.rate_key] == pytest.approx(3 * 2 * 8192 * D * V / 56.3e-3 / 1e12, abs=0.5)


@pytest.mark.parametrize(
    "key, value, able", [("chunk_size", 64, "'chunked'"), ("filter_eps", 0.1, "'chunked' or 'cce'")]
)
def test_liger_refuses_options_it_does_not_take(key, value, able):
    with pytest.raises(ConfigError, match=f"'liger' cannot .*; use {able}"):
        validate_loss_options("liger", {key: value})


def test_liger_without_liger_kernel_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed
    liger.liger_problem.cache_clear()
    try:
        with pytest.raises(ConfigError) as info:
            build_loss("liger", OutputHead(8, 16), {}, device=torch.device("cuda"), dtype=torch.bfloat16)
    finally:
        liger.liger_problem.cache_clear()
    message = str(info.value)
    assert "\n" not in message and info.value.key == "loss.name" and "pip install liger-kernel" in message


def test_liger_older_than_0_8_2_is_refused(monkeypatch):
    monkeypatch.setattr(liger.importlib, "import_module", lambda name: types.ModuleType(name))
    monkeypatch.setattr(liger.importlib.metadata, "version", lambda name: "0.8.1")
    liger.liger_problem.cache_clear()
    try:
        assert "liger-kernel 0.8.1 is installed, and this entry needs 0.8.2" in liger.liger_problem()
    finally:
        liger.liger_problem.cache_clear()


def _liger_forward(
    _input,
    weight,
    target,
    bias=None,
    *,
    ignore_index,
    lse_square_scale,
    label_smoothing,
    reduction,
    softcap,
    token_grad_output=None,
    compute_gradients=None,
    weight_requires_grad=None,
):
    """Stands in for liger_kernel.ops.fused_linear_cross_entropy's forward (0.8.2+) on the CPU, from
    the float64 reference: the summed (or per-token) loss and, when asked, the gradients of the sum
    (of the per-token losses weighted by ``token_grad_output``). Tests our glue, not Liger's kernel."""
    assert ignore_index == IGNORE and reduction in ("sum", "none")
    leaves = [t.detach().double().requires_grad_() for t in (_input, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    with torch.enable_grad():
        per_token = reference(*leaves, target, b, softcap=softcap or 0.0, z_loss_weight=lse_square_scale,
                              label_smoothing=label_smoothing, reduction="none")  # fmt: skip
        weighted = (per_token * (1 if token_grad_output is None else token_grad_output.double())).sum()
    grads = [None, None, None]
    if compute_gradients:
        found = torch.autograd.grad(weighted, [*leaves, *([b] if b is not None else [])])
        grads = [found[0].to(_input.dtype), found[1].to(weight.dtype) if weight_requires_grad else None]
        grads.append(None if b is None else found[2].to(bias.dtype))
    loss = per_token.detach().float()
    return (loss if reduction == "none" else loss.sum(), None, None, None, *grads)


def _head(bias: bool = False, seed: int = 0) -> OutputHead:
    """A [16, 8] classifier with logits of std about 2."""
    head = OutputHead(8, 16, bias=bias)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(16, 8, generator=gen) * 0.7)
        if bias:
            head.bias.copy_(torch.randn(16, generator=gen))
    return head


@pytest.fixture
def fake_liger(monkeypatch):
    for name in ("liger_kernel", "liger_kernel.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ops = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    ops.fused_linear_cross_entropy_forward = _liger_forward
    monkeypatch.setitem(sys.modules, ops.__name__, ops)


OPTION_CASES = {
    "plain": {},
    "everything": {"z_loss_weight": 1e-2, "label_smoothing": 0.1, "logit_softcap": 4.0},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_liger_glue_passes_options_and_reductions_through(fake_liger, case, reduction):
    """The options reach Liger under its names, "mean" divides the sum by the real targets, the
    forward's gradients are scaled by the upstream gradient and "none" recomputes with it."""
    gen = torch.Generator().manual_seed(0)
    hidden, labels = torch.randn(2, 9, 8, generator=gen), torch.randint(0, 16, (2, 9), generator=gen)
    labels[0, :3] = IGNORE
    head = _head(bias=True)
    loss_fn = LigerLoss(head, reduction=reduction, **OPTION_CASES[case])
    hidden.requires_grad_()
    loss = loss_fn(hidden, labels)
    grad_out = torch.rand(loss.shape, generator=gen) + 0.5
    loss.backward(grad_out)

    leaves = [t.detach().double().requires_grad_() for t in (hidden, head.weight, head.bias)]
    options = {("softcap" if k == "logit_softcap" else k): v for k, v in OPTION_CASES[case].items()}
    ref = reference(leaves[0], leaves[1], labels, leaves[2], shift=1, reduction=reduction, **options)
    if reduction == "none":
        ref = torch.cat([ref, ref.new_zeros(2, 1)], dim=1)
    ref.backward(grad_out.double())
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip((hidden.grad, head.weight.grad, head.bias.grad), leaves):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-5, atol=1e-6)


def test_liger_backward_twice_as_zero_bubble_schedules_do(fake_liger):
    gen = torch.Generator().manual_seed(1)
    hidden, labels = torch.randn(1, 7, 8, generator=gen).requires_grad_(), torch.randint(0, 16, (1, 7), generator=gen)
    head = _head()
    loss = LigerLoss(head)(hidden, labels) / 7.0
    (grad_hidden,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (grad_weight,) = torch.autograd.grad(loss, head.weight, retain_graph=True)
    leaves = [t.detach().double().requires_grad_() for t in (hidden, head.weight)]
    ref_hidden, ref_weight = torch.autograd.grad(reference(*leaves, labels, shift=1) / 7.0, leaves)
    torch.testing.assert_close(grad_hidden.double(), ref_hidden)
    torch.testing.assert_close(grad_weight.double(), ref_weight)
    with pytest.raises(RuntimeError, match="different upstream gradients"):
        (loss * 2).backward()
