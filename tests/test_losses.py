"""Every [loss] entry against a float64 materialized reference, and the registry's checks."""

import importlib.util

import pytest
import torch
from torch import nn

from config.errors import ConfigError
from losses import LOSS_NAMES, OutputLoss, build_loss, choose_loss, loss_option_names, validate_loss_options
from losses.entries.cce import CCELoss
from losses.entries.chunked import ChunkedCrossEntropy
from losses.kernels.chunked import DEFAULT_CHUNK_SIZE, auto_chunk_size
from models.output_head import OutputHead
from tests.reference import IGNORE
from tests.reference import reference as shared_reference

B, S, D, V = 2, 37, 32, 101  # 74 tokens: not a multiple of the chunk size below, V prime
CHUNK = 16
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
liger_only = [
    *cuda_only,
    pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel"),
]

# Relative tolerance on max |error| / max |reference|. fp32: summation order only.
# bf16: the logits GEMM rounds its output to bf16 (2^-9 relative), and the gradient
# GEMMs take the logit gradient rounded to bf16; 3e-2 leaves about 3x margin.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def reference(hidden, weight, bias, labels, *, reduction="mean", logit_softcap=0.0, **options):
    """The float64 spec with the causal shift: position t predicts labels[:, t+1]; the last has no target."""
    loss = shared_reference(
        hidden, weight, labels, bias, shift=1, softcap=logit_softcap, reduction=reduction, **options
    )
    return torch.cat([loss, loss.new_zeros(B, 1)], dim=1) if reduction == "none" else loss


def make_inputs(seed, *, ignored=0.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 2 / D**0.5  # logits with std ~2
    bias = torch.randn(V, generator=gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[torch.rand(B, S, generator=gen) < ignored] = IGNORE
    return hidden, weight, bias, labels


def make_head(weight, bias=None, dtype=torch.float32, device=CPU):
    head = OutputHead(D, V, bias=bias is not None).to(device=device, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


def assert_close(actual, expected, rtol, what):
    actual = actual.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert error <= rtol * scale, f"{what}: max error {error:.3g} > {rtol} * {scale:.3g}"


# name -> (options, ignored fraction, head has a bias)
FEATURES = {
    "plain": ({}, 0.0, False),
    "ignored": ({}, 0.3, False),
    "all_ignored": ({}, 1.0, False),
    "z_loss": ({"z_loss_weight": 1e-2}, 0.2, False),
    "label_smoothing": ({"label_smoothing": 0.1}, 0.2, False),
    "softcap": ({"logit_softcap": 4.0}, 0.2, False),
    "bias": ({}, 0.2, True),
    "everything": ({"z_loss_weight": 1e-2, "label_smoothing": 0.1, "logit_softcap": 4.0}, 0.2, True),
}
BIAS_ENTRIES = {"cross_entropy", "chunked", "liger"}  # cut-cross-entropy 25.1.1 has no bias
ENTRY_OPTIONS = {"chunked": {"chunk_size": CHUNK}}

# (entry, device, dtype): every entry that runs on this machine, and the CUDA ones where
# there is a GPU; cce's backward takes only bf16/fp16 hidden states.
ENTRIES = [
    pytest.param("cross_entropy", "cpu", torch.float32),
    pytest.param("chunked", "cpu", torch.float32),
    pytest.param("cce_torch_compile", "cpu", torch.float32),
    pytest.param("cce", "cuda", torch.bfloat16, marks=cuda_only),
    pytest.param("chunked", "cuda", torch.float32, marks=cuda_only),
    pytest.param("liger", "cuda", torch.float32, marks=liger_only),
]


def supports(entry, feature):
    options, _, bias = FEATURES[feature]
    return set(options) <= loss_option_names(entry) and (not bias or entry in BIAS_ENTRIES)


def check_entry(entry, device, feature, reduction, dtype=torch.float32, seed=0, extra_options=None):
    """Loss and gradients of hidden, weight and bias match the float64 reference."""
    options, ignored, with_bias = FEATURES[feature]
    hidden, weight, bias, labels = make_inputs(seed, ignored=ignored)
    bias = bias if with_bias else None
    device = torch.device(device)
    head = make_head(weight, bias, dtype, device)
    options = {**ENTRY_OPTIONS.get(entry, {}), **options, **(extra_options or {})}
    loss_fn = build_loss(entry, head, options, reduction=reduction, device=device)

    hidden = hidden.to(device=device, dtype=dtype).requires_grad_()
    loss = loss_fn(hidden, labels.to(device))
    grad_out = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
    loss.backward(grad_out.to(device))

    # The reference sees the same (rounded) inputs, so only the loss's own error counts.
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in (hidden, head.weight)]
    ref_bias = None if bias is None else head.bias.detach().cpu().double().requires_grad_()
    ref = reference(*ref_inputs, ref_bias, labels, reduction=reduction, **FEATURES[feature][0])
    ref.backward(grad_out.double())

    rtol = TOLERANCE[dtype]
    what = f"{entry}/{feature}/{reduction}/{dtype}"
    assert loss.shape == ref.shape, what
    assert_close(loss, ref.detach(), rtol, f"{what} loss")
    assert_close(hidden.grad, ref_inputs[0].grad, rtol, f"{what} hidden grad")
    assert_close(head.weight.grad, ref_inputs[1].grad, rtol, f"{what} weight grad")
    if bias is not None:
        assert_close(head.bias.grad, ref_bias.grad, rtol, f"{what} bias grad")
    if feature == "all_ignored":
        assert loss.abs().max().item() == 0.0 and not hidden.grad.any() and not head.weight.grad.any()


# Features an entry rejects at config time are left out (test_unsupported_option_* covers them).
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "entry,device,dtype,feature",
    [
        pytest.param(*entry.values, feature, marks=entry.marks, id=f"{entry.values[0]}-{entry.values[1]}-{feature}")
        for entry in ENTRIES
        for feature in FEATURES
        if supports(entry.values[0], feature)
    ],
)
def test_matches_float64_reference(entry, device, dtype, feature, reduction):
    check_entry(entry, device, feature, reduction, dtype)


@pytest.mark.parametrize("entry,device,dtype", ENTRIES)
def test_bf16_matches_float64_reference(entry, device, dtype):
    feature = "everything" if supports(entry, "everything") else "softcap"
    check_entry(entry, device, feature, "mean", dtype=torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_compiled_chunk_math_matches_reference(device):
    """One small case, one chunk shape (74 = 2 x 37): compiling is slow on a CPU, and
    the compiled functions are the eager ones."""
    check_entry("chunked", device, "everything", "mean", extra_options={"compile": True, "chunk_size": 37})


def test_auto_chunk_size_keeps_the_logits_block_within_256_mib():
    for vocab, bytes_per_logit, tokens in [(151936, 2, 768), (128256, 2, 1024), (256000, 2, 512), (151936, 4, 384)]:
        assert auto_chunk_size(vocab, bytes_per_logit) == tokens
        assert tokens * vocab * bytes_per_logit <= 256 * 2**20 < (tokens + 128) * vocab * bytes_per_logit
    assert auto_chunk_size(10**7, 2) == 128  # never below one GEMM tile of tokens


def test_chunk_size_does_not_change_the_result():
    hidden, weight, _, labels = make_inputs(1, ignored=0.2)
    losses = [
        build_loss("chunked", make_head(weight), {"chunk_size": size}, device=CPU)(hidden, labels)
        for size in (1, 7, B * S, 4096, 0)  # 0: sized by memory
    ]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cce_refuses_fp32_training_before_the_forward():
    hidden, weight, _, labels = make_inputs(0)
    dev = torch.device("cuda")
    with pytest.raises(ConfigError, match="bf16/fp16"):  # at build, for the dtype it is told
        build_loss("cce", make_head(weight, device=dev), {}, device=dev)
    loss_fn = build_loss("cce", make_head(weight, device=dev), {}, device=dev, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16/fp16"):  # in the forward, for the tensors it gets
        loss_fn(hidden.to(dev).requires_grad_(), labels.to(dev))
    with torch.no_grad():
        assert torch.isfinite(loss_fn(hidden.to(dev), labels.to(dev)))


def test_no_grad_gives_the_same_loss():
    hidden, weight, _, labels = make_inputs(2, ignored=0.2)
    loss_fn = build_loss("chunked", make_head(weight), {"chunk_size": CHUNK}, device=CPU)
    with torch.no_grad():
        evaluated = loss_fn(hidden, labels)
    torch.testing.assert_close(evaluated, loss_fn(hidden.requires_grad_(), labels).detach())


def test_chunked_backward_twice_as_zero_bubble_schedules_do():
    """Input grads, then weight grads, over one graph with the same upstream gradient."""
    hidden, weight, _, labels = make_inputs(3)
    head = make_head(weight)
    hidden.requires_grad_()
    loss = build_loss("chunked", head, {}, device=CPU)(hidden, labels) / 7.0
    (grad_hidden,) = torch.autograd.grad(loss, hidden, retain_graph=True)
    (grad_weight,) = torch.autograd.grad(loss, head.weight, retain_graph=True)
    reference = build_loss("cross_entropy", head, {}, device=CPU)(hidden, labels) / 7.0
    ref_hidden, ref_weight = torch.autograd.grad(reference, (hidden, head.weight))
    torch.testing.assert_close(grad_hidden, ref_hidden)
    torch.testing.assert_close(grad_weight, ref_weight)
    with pytest.raises(RuntimeError, match="different upstream gradients"):
        (loss * 2).backward()


@pytest.mark.parametrize("entry", ["cross_entropy", "chunked", "cce_torch_compile"])
def test_forward_logits_through_the_head(entry):
    hidden, weight, _, _ = make_inputs(4)
    head = make_head(weight)
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(module))
    loss_fn = build_loss(entry, head, {"logit_softcap": 4.0}, device=CPU)
    logits = loss_fn.forward_logits(hidden)
    expected = 4.0 * torch.tanh(hidden.double() @ weight.double().T / 4.0)
    assert logits.shape == (B, S, V) and logits.dtype == torch.float32
    assert_close(logits, expected, 1e-5, f"{entry} logits")
    assert calls == [head], "the head must be called as a module, so FSDP's hooks run"


@pytest.mark.parametrize("entry", ["cross_entropy", "chunked", "cce_torch_compile"])
def test_loss_applies_the_head_as_a_module_and_owns_no_parameters(entry):
    hidden, weight, _, labels = make_inputs(5)
    head = make_head(weight)
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append(module))
    loss_fn = build_loss(entry, head, {}, device=CPU)
    loss_fn(hidden, labels)
    assert calls == [head]
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    model = nn.ModuleDict({"head": head, "loss": loss_fn})
    assert len(list(model.parameters())) == 1


# --- registry ---------------------------------------------------------------------------


def test_loss_names_and_options():
    assert set(LOSS_NAMES) == {"cross_entropy", "chunked", "cce", "cce_torch_compile", "liger", "auto"}
    common = {"ignore_index", "z_loss_weight", "label_smoothing", "logit_softcap"}
    assert loss_option_names("cross_entropy") == common
    assert loss_option_names("chunked") == common | {"chunk_size", "compile", "filter_eps"}
    assert loss_option_names("cce") == {"ignore_index", "logit_softcap", "filter_eps"}
    assert loss_option_names("cce_torch_compile") == {"ignore_index", "logit_softcap"}
    assert loss_option_names("liger") == common
    assert loss_option_names("auto") == common | {"compile"}


def config_error(name, options):
    with pytest.raises(ConfigError) as info:
        validate_loss_options(name, options)
    return info.value


def test_unknown_name_suggests_the_closest():
    error = config_error("chunkd", {})
    assert error.key == "loss.name" and "did you mean 'chunked'" in str(error)


def test_unknown_option_suggests_the_closest():
    error = config_error("chunked", {"chunk_sise": 8})
    assert error.key == "loss.chunk_sise" and "did you mean 'chunk_size'" in str(error)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("chunked", "chunk_size", -4),
        ("chunked", "chunk_size", "8"),
        ("chunked", "chunk_size", 8.0),
        ("chunked", "chunk_size", True),
        ("chunked", "compile", "yes"),
        ("chunked", "label_smoothing", 1.0),
        ("chunked", "label_smoothing", -0.1),
        ("chunked", "z_loss_weight", -1e-4),
        ("chunked", "z_loss_weight", float("nan")),
        ("chunked", "logit_softcap", -30.0),
        ("chunked", "ignore_index", 1.5),
        ("cce", "filter_eps", "low"),
        ("cce", "filter_eps", -1.0),
        ("chunked", "filter_eps", "off"),
    ],
)
def test_bad_values_are_rejected(name, key, value):
    assert config_error(name, {key: value}).key == f"loss.{key}"


@pytest.mark.parametrize("name", ["cce", "chunked"])
@pytest.mark.parametrize("value", ["default", "high", "auto", 0.0, 1e-4, 0, None])
def test_filter_eps_values(name, value):
    validate_loss_options(name, {"filter_eps": value})


def test_unsupported_option_names_the_entries_that_can():
    error = config_error("cce", {"z_loss_weight": 1e-4})
    assert (
        str(error)
        == "config error: loss.z_loss_weight: 'cce' cannot apply z-loss; use 'chunked', 'cross_entropy' or 'liger'"
    )
    assert "use 'chunked', 'cross_entropy' or 'liger'" in str(
        config_error("cce_torch_compile", {"label_smoothing": 0.1})
    )
    assert "use 'chunked'" in str(config_error("auto", {"chunk_size": 64}))
    assert "use 'chunked' or 'cce'" in str(config_error("cce_torch_compile", {"filter_eps": 1e-3}))


def test_unsupported_option_at_its_default_is_accepted():
    validate_loss_options("cce", {"z_loss_weight": 0.0, "label_smoothing": 0, "chunk_size": DEFAULT_CHUNK_SIZE})


def test_cce_on_cpu_says_what_to_use():
    with pytest.raises(ConfigError, match="'chunked' or 'auto'") as info:
        build_loss("cce", make_head(make_inputs(0)[1]), {}, device=CPU)
    assert info.value.key == "loss.name"


def test_cce_rejects_a_head_with_bias():
    _, weight, bias, _ = make_inputs(0)
    with pytest.raises(ConfigError, match="bias"):
        build_loss("cce_torch_compile", make_head(weight, bias), {}, device=CPU)


def test_auto_picks_chunked_on_cpu_and_says_why():
    loss_fn = build_loss("auto", make_head(make_inputs(0)[1]), {"z_loss_weight": 1e-4}, device=CPU)
    assert type(loss_fn) is ChunkedCrossEntropy and loss_fn.z_loss_weight == 1e-4
    assert loss_fn.chunk_size == DEFAULT_CHUNK_SIZE and loss_fn.kernels == "torch"
    assert loss_fn.choice.entry == "chunked" and "auto: PyTorch ops on cpu" in loss_fn.choice.describe()


@pytest.mark.parametrize("options,with_bias", [({}, False), ({"z_loss_weight": 1e-4}, False), ({}, True)])
def test_auto_on_cuda_picks_chunked(options, with_bias):
    """Building touches no device memory, so the choice is testable without a GPU."""
    _, weight, bias, _ = make_inputs(0)
    head = make_head(weight, bias if with_bias else None)
    assert type(build_loss("auto", head, options, device=torch.device("cuda"))) is ChunkedCrossEntropy


# (name, device, dtype, vocab_parallel, options, where) -> (entry, kernels): the one decision's rules.
RESOLUTIONS = [
    (("auto", "cuda", torch.bfloat16, False, {}, {}), ("chunked", "triton")),
    (("auto", "cpu", torch.float32, False, {"compile": True}, {}), ("chunked", "compile")),
    (("chunked", "cuda", torch.float64, False, {}, {}), ("chunked", "torch")),  # no Triton kernels for fp64
    (("auto", "cuda", torch.bfloat16, True, {}, {}), ("cce", "cce")),
    (("auto", "cuda", torch.bfloat16, True, {"compile": True}, {}), ("cce", "cce")),  # [compile] asks: no matter
    (("auto", "cuda", torch.bfloat16, True, {"z_loss_weight": 1e-4}, {}), ("chunked", "triton")),
    (("auto", "cuda", torch.bfloat16, True, {}, {"bias": True}), ("chunked", "triton")),
    (("auto", "cuda", torch.float32, True, {}, {}), ("chunked", "triton")),  # CCE backpropagates 16-bit only
    (("auto", "cuda", torch.float32, True, {}, {"needs_grad": False}), ("cce", "cce")),  # its forward takes fp32
    (("auto", "cpu", torch.float32, True, {"compile": True}, {}), ("chunked", "torch")),  # no compile there
    (("cross_entropy", "cuda", torch.bfloat16, False, {}, {}), ("cross_entropy", "torch")),
    (("liger", "cuda", torch.float32, False, {"z_loss_weight": 1e-4}, {"bias": True}), ("liger", "liger")),
]


@pytest.mark.parametrize("case, expected", RESOLUTIONS)
def test_the_one_decision(case, expected):
    name, device_type, dtype, vocab_parallel, options, where = case
    choice = choose_loss(
        name, options, device_type=device_type, dtype=dtype, vocab_parallel=vocab_parallel, gpu_kernels=True, **where
    )
    assert (choice.entry, choice.kernels) == expected
    assert choice.reason


@pytest.mark.parametrize(
    "name, device_type, dtype, vocab_parallel, where, words",
    [
        ("cce", "cpu", torch.bfloat16, False, {}, "CUDA only, not on cpu; use 'chunked' or 'auto'"),
        ("cce", "cuda", torch.float32, False, {}, "backward takes only bf16/fp16 hidden states"),
        ("cce", "cuda", torch.bfloat16, True, {"bias": True}, "take no bias; use 'chunked' or 'auto'"),
        ("cce_torch_compile", "cpu", torch.float32, False, {"bias": True}, "bias"),
        ("liger", "cuda", torch.float64, False, {}, "forward takes only bf16/fp16/fp32"),
        ("liger", "cuda", torch.bfloat16, True, {}, "the vocab-parallel head runs 'auto', 'chunked' or 'cce'"),
        (
            "cce_torch_compile",
            "cpu",
            torch.float32,
            True,
            {},
            "the vocab-parallel head runs 'auto', 'chunked' or 'cce'",
        ),
        ("cross_entropy", "cpu", torch.float32, True, {}, "not 'cross_entropy'"),
    ],
)
def test_what_an_entry_cannot_compute_is_one_line_naming_the_fix(
    name, device_type, dtype, vocab_parallel, where, words
):
    with pytest.raises(ConfigError) as info:
        choose_loss(
            name, {}, device_type=device_type, dtype=dtype, vocab_parallel=vocab_parallel, gpu_kernels=True, **where
        )
    assert info.value.key == "loss.name" and words in str(info.value) and "\n" not in str(info.value)


def test_cce_kernels_of_another_release_are_refused_in_one_line(monkeypatch):
    """The vocab-parallel backend calls 25.1.1's kernels by position: another release's are refused."""
    import importlib.metadata

    pytest.importorskip("cut_cross_entropy.cce")  # the check runs where the kernels import
    from losses.kernels import cce_vocab_parallel

    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "25.9.0" if name == "cut-cross-entropy" else real_version(name)
    )
    monkeypatch.setitem(cce_vocab_parallel._SIGNATURES, ("utils", "_handle_eps"), ("eps", "dtype"))
    cce_vocab_parallel.cce_kernels.cache_clear()
    try:
        with pytest.raises(ImportError) as err:
            cce_vocab_parallel.cce_kernels()
    finally:
        cce_vocab_parallel.cce_kernels.cache_clear()
    message = str(err.value)
    assert "\n" not in message and "cut-cross-entropy 25.9.0" in message and "cut-cross-entropy==25.1.1" in message


def test_direct_construction_checks_options_too():
    head = make_head(make_inputs(0)[1])
    with pytest.raises(ValueError, match="'cce' cannot apply label smoothing"):
        CCELoss(head, label_smoothing=0.1)
    with pytest.raises(TypeError, match="chunk_sise"):
        ChunkedCrossEntropy(head, chunk_sise=3)
    with pytest.raises(ValueError, match="reduction"):
        ChunkedCrossEntropy(head, reduction="avg")
    assert isinstance(ChunkedCrossEntropy(head, chunk_size=3), OutputLoss)
