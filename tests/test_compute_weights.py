"""``ComputeWeights`` against FSDP2 on a one-rank mesh, the path it replaces: bf16 forward and backward
from fp32 parameters, gradients accumulated in fp32 over micro-steps, the same parameters bitwise
after several optimizer steps, tied weights and activation checkpointing included, under each of
FSDP's reshard settings (a resharded block's copy is freed after its forward and cast again for its
backward); outside it the model holds its fp32 parameters, as a checkpoint sees them.
"""

import pytest
import torch
import torch.nn.functional as F

from config.job_config import ActivationCheckpoint
from models import Transformer, build_model_args
from models.initialize import init_weights
from parallelisms.activation_checkpoint import apply_activation_checkpointing
from parallelisms.compute_weights import ComputeWeights
from parallelisms.distributed import init_mesh
from parallelisms.fsdp import apply_fsdp
from parallelisms.grad_clip import clip_divisor, total_grad_norm
from parallelisms.pipeline import PipelinePlan, build_stage_module
from tests.dist_utils import run_distributed
from tests.weights import whole_parameters
from training.flat_adamw import FlatAdamW

STEPS, MICRO_STEPS, SEQ = 3, 2, 32
CASES = [  # model (tied or untied head), fsdp_reshard_after_forward, activation checkpointing
    ("qwen3", "default", "none"),
    ("llama3", "default", "none"),
    ("qwen3", "always", "selective"),
    ("llama3", "always", "full"),
    ("llama3", "never", "none"),
]


def _model(name: str, reshard: str, ac: str, fsdp_mesh=None, device: str = "cpu") -> Transformer:
    args = build_model_args(name, "debug")
    with torch.device("meta"):
        model = Transformer(args)
    apply_activation_checkpointing(model, ActivationCheckpoint(mode=ac, selective_ac_option="op"))
    if fsdp_mesh is not None:
        apply_fsdp(model, fsdp_mesh, "bfloat16", "float32", reshard, pp_enabled=False)
    model.to_empty(device=device)
    init_weights(model, seed=0, device=torch.device(device))
    return model


def _micro_steps(model: Transformer, step: int) -> None:
    """Forward and backward of a materialized-logits loss in fp32 from the model's bf16 hidden states."""
    g = torch.Generator().manual_seed(step)
    for _ in range(MICRO_STEPS):
        tokens = torch.randint(0, model.args.vocab_size, (2, SEQ), generator=g)
        hidden = model(tokens)
        logits = model.output(hidden, lambda h, w, b: F.linear(h, w, b).float())
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare(rank: int, world_size: int, name: str, reshard: str, ac: str) -> dict[str, list[str]]:
    """Names of the parameters whose first-step gradients, and whose values after ``STEPS`` AdamW steps,
    differ between FSDP2 and ComputeWeights."""
    mesh = init_mesh("cpu", (1,), ("dp_shard",))
    fsdp, plain = _model(name, reshard, ac, mesh), _model(name, reshard, ac)
    weights = ComputeWeights([plain], torch.bfloat16, reshard, pp_enabled=False)
    optimizers = [
        FlatAdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) for m in (fsdp, plain)
    ]
    differ = {"gradients": [], "parameters": []}
    for step in range(STEPS):
        _micro_steps(fsdp, step)
        with weights:
            _micro_steps(plain, step)
        if step == 0:
            for (n, p), q in zip(fsdp.named_parameters(), plain.parameters()):
                if q.grad is None or q.grad.dtype != torch.float32 or not torch.equal(_full(p.grad), q.grad):
                    differ["gradients"].append(n)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    mine = whole_parameters([plain])
    for n, p in whole_parameters([fsdp]).items():
        if mine[n].dtype != torch.float32 or not torch.equal(p, mine[n]):
            differ["parameters"].append(n)
    return differ


@pytest.mark.parametrize("name, reshard, ac", CASES, ids=["-".join(c) for c in CASES])
def test_training_equals_fsdp_on_one_rank(name, reshard, ac):
    assert run_distributed(_compare, 1, name, reshard, ac) == [{"gradients": [], "parameters": []}]


def _stages(fsdp_mesh, reshard: str) -> list[Transformer]:
    """The two stages of a two-stage split of the untied debug model, as one pipeline rank holding both would."""
    with torch.device("meta"):
        model = Transformer(build_model_args("llama3", "debug"))
    plan = PipelinePlan(((0, 2), (2, 4)), pp_degree=1, pp_rank=0, schedule="1F1B", n_microbatches=2, microbatch_size=1)
    stages = [build_stage_module(model, plan, s) for s in range(2)]
    for stage in stages:
        if fsdp_mesh is not None:
            apply_fsdp(stage, fsdp_mesh, "bfloat16", "float32", reshard, pp_enabled=True)
        stage.to_empty(device="cpu")
        init_weights(stage, seed=0, device=torch.device("cpu"))
    return stages


def _pipelined_step(stages: list[Transformer]) -> None:
    """Two microbatches through both stages, forward, forward, backward, backward (1F1B's order on the last
    rank), each stage's backward from the gradient of its output, as torch's pipelining runs them."""
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 2048, (1, SEQ), generator=g) for _ in range(2)]
    flows = []
    for micro in tokens:
        sent = stages[0](micro)
        received = sent.detach().requires_grad_()
        hidden = stages[1](received)
        logits = stages[1].output(hidden, lambda h, w, b: F.linear(h, w, b).float())
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), micro[:, 1:].flatten())
        flows.append((sent, received, loss))
    for sent, received, loss in flows:
        loss.backward()
        sent.backward(received.grad)


def _compare_stages(rank: int, world_size: int, reshard: str) -> list[str]:
    """Names of the stages' parameters whose fp32 gradients differ between FSDP2 and ComputeWeights."""
    fsdp, plain = _stages(init_mesh("cpu", (1,), ("dp_shard",)), reshard), _stages(None, reshard)
    _pipelined_step(fsdp)
    with ComputeWeights(plain, torch.bfloat16, reshard, pp_enabled=True):
        _pipelined_step(plain)
    return [
        f"stage {i}: {n}"
        for i, (a, b) in enumerate(zip(fsdp, plain))
        for (n, p), q in zip(a.named_parameters(), b.parameters())
        if q.grad is None or q.grad.dtype != torch.float32 or not torch.equal(_full(p.grad), q.grad)
    ]


@pytest.mark.parametrize("reshard", ["default", "always"])
def test_pipeline_stages_equal_fsdp_on_one_rank(reshard):
    """Two stages on one rank and microbatches in flight: under ``always`` a stage's copies are freed after each
    forward and cast again for each backward."""
    assert run_distributed(_compare_stages, 1, reshard) == [[]]


def test_a_resharded_block_holds_its_copy_only_from_its_forward_or_backward_on():
    model = _model("llama3", "default", "none")
    weights = ComputeWeights([model], torch.bfloat16, "default", pp_enabled=False)
    first, last = model.layers["0"], model.layers["3"]
    seen = {}
    first.register_forward_hook(lambda m, a, out: seen.update(after=m.attention.wq.weight))
    with weights:
        hidden = model(torch.randint(0, 2048, (1, SEQ)))
        copy = seen["after"]
        assert copy.dtype == torch.bfloat16 and copy.untyped_storage().size() == 0  # freed after its forward
        assert last.attention.wq.weight.untyped_storage().size() > 0  # the last block is kept, as FSDP keeps it
        hidden.float().square().mean().backward()
        assert copy.untyped_storage().size() == 0  # cast for the backward, freed after its gradients
    assert first.attention.wq.weight.grad.dtype == torch.float32


def test_outside_the_context_the_model_holds_its_fp32_parameters():
    model = _model("qwen3", "default", "none")
    before = dict(model.named_parameters())
    weights = ComputeWeights([model], torch.bfloat16, "never", pp_enabled=False)
    with weights:
        inside = dict(model.named_parameters(remove_duplicate=False))
        assert all(p.dtype == torch.bfloat16 for p in inside.values())
        # the tied embedding and head: one bf16 copy in both places
        assert inside["output.weight"] is inside["tok_embeddings.weight"]
        hidden = model(torch.randint(0, 2048, (1, SEQ)))
        assert hidden.dtype == torch.bfloat16
        torch.testing.assert_close(
            inside["layers.0.attention.wq.weight"].float(), before["layers.0.attention.wq.weight"], rtol=2**-8, atol=0
        )
    assert dict(model.named_parameters()) == before
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    assert all(p.untyped_storage().size() == 0 for p in inside.values())  # freed for the optimizer step


def test_nothing_to_cast_is_a_no_op():
    model = _model("llama3", "default", "none")
    before = dict(model.named_parameters())
    with ComputeWeights([model], torch.float32, "default", pp_enabled=False):
        assert dict(model.named_parameters()) == before


def _steps_with_clipping(casts: bool, name: str, micro_steps: int) -> tuple[Transformer, list, list]:
    """``STEPS`` steps as ``TrainStep`` takes them: micro-steps, the clipped norm, ``FlatAdamW``."""
    model = _model(name, "default", "selective")
    weights = ComputeWeights([model], torch.bfloat16, "default", pp_enabled=False, optimizer_casts=casts)
    params = list(model.parameters())
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    optimizer = FlatAdamW(params, **hyper, copies=weights.copies())
    norms, grad_dtypes = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        with weights:
            for _ in range(micro_steps):
                tokens = torch.randint(0, model.args.vocab_size, (2, SEQ), generator=g)
                logits = model.output(model(tokens), lambda h, w, b: F.linear(h, w, b).float())
                F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grad_dtypes.append({p.grad.dtype for p in params})
        norm = total_grad_norm(params, None)
        norms.append(norm)
        optimizer.grad_scale = clip_divisor(norm, max_norm=0.5)  # clips: the norms are larger
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, norms, grad_dtypes


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
@pytest.mark.parametrize("micro_steps", [1, 2])
def test_the_optimizer_casting_gives_the_same_steps(name, micro_steps):
    """With ``optimizer_casts`` a parameter's one gradient of the step stays bf16 and the norm and FlatAdamW read
    it so (on the CPU FlatAdamW casts it); a second is added in fp32; the copies are kept through the step,
    and FlatAdamW casts them after torch's kernel. Either way the same numbers as casting at once: the norms
    and the parameters after three clipped steps, bitwise."""
    kept, kept_norms, kept_dtypes = _steps_with_clipping(True, name, micro_steps)
    cast, cast_norms, cast_dtypes = _steps_with_clipping(False, name, micro_steps)
    assert cast_dtypes == [{torch.float32}] * STEPS
    assert kept_dtypes == [{torch.bfloat16} if micro_steps == 1 else {torch.float32}] * STEPS
    assert all(torch.equal(a, b) for a, b in zip(kept_norms, cast_norms)), (kept_norms, cast_norms)
    assert float(kept_norms[0]) > 0.5
    differ = [n for (n, p), q in zip(kept.named_parameters(), cast.parameters()) if not torch.equal(p, q)]
    assert differ == []


def _record_casts(monkeypatch) -> list[torch.Tensor]:
    """The masters ``ComputeWeights`` (and anything else) cast through ``torch._foreach_copy_`` from now on."""
    cast = []
    foreach_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (cast.extend(src), foreach_copy(dst, src)))
    return cast


def test_kept_copies_are_cast_again_only_where_their_weights_moved(monkeypatch):
    """Where the optimizer casts, a copy is cast again only if its weight changed by an op that moved its version
    counter (an in-place op, as a checkpoint load's ``copy_``); a weight the optimizer updates, writing the copy
    too, moves none, and its copy is used as written. Simulated here through ``.data``, which moves none
    either."""
    model = _model("qwen3", "default", "none")
    weights = ComputeWeights([model], torch.bfloat16, "default", pp_enabled=False, optimizer_casts=True)
    copies = weights.copies()
    assert len(copies) == len(list(model.parameters()))
    cast = _record_casts(monkeypatch)
    tokens = torch.randint(0, 2048, (1, SEQ))
    with weights:
        model(tokens).float().square().mean().backward()
    # Every copy cast for the forward, the resharded blocks' again for their backward: all held afterwards.
    assert {id(m) for m in cast} == {id(m) for m in copies}
    assert all(c.untyped_storage().size() > 0 and torch.equal(c, m.bfloat16()) for m, c in copies.items())
    assert all(m.grad.dtype == torch.bfloat16 for m in copies)
    written, loaded = model.layers["0"].attention.wq.weight, model.layers["1"].feed_forward.w1.weight
    with torch.no_grad():
        written.data.add_(1.0)  # as the Triton kernel updates a weight: no version moved, the copy written
        copies[written].data.copy_(written.data)
        copies[written].data[0, 0] = 7.0  # a mark: a copy cast again would lose it
        loaded.mul_(2.0)  # in place: its version moved
    cast.clear()
    used = []  # what the forward multiplies by (block 0's copy is freed after it)
    model.layers["0"].attention.wq.register_forward_hook(lambda m, args, out: used.append(m.weight[0, 0].item()))
    with weights, torch.no_grad():
        model(tokens)
    assert [id(m) for m in cast] == [id(loaded)]
    assert used == [7.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("reshard", ["default", "never"])
def test_on_cuda_the_optimizer_writes_the_copies_the_forward_uses(reshard, monkeypatch):
    """FlatAdamW's kernel updates the fp32 weights from the bf16 gradients and writes the bf16 copies: after each
    step every copy is its weight's cast, bit for bit, and a step casts only what its backward re-gathers (the
    resharded blocks), where casting everything at the forward was the alternative."""
    model = _model("qwen3", reshard, "selective", device="cuda")
    weights = ComputeWeights([model], torch.bfloat16, reshard, pp_enabled=False, optimizer_casts=True)
    copies = weights.copies()
    optimizer = FlatAdamW(
        list(model.parameters()), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, copies=copies
    )
    resharded = {id(m) for g in weights._groups if g.resharded for m in g.masters}
    assert (reshard == "never") == (not resharded)
    cast = _record_casts(monkeypatch)
    for step in range(4):
        cast.clear()
        g = torch.Generator(device="cuda").manual_seed(step)
        with weights:
            tokens = torch.randint(0, model.args.vocab_size, (2, SEQ), generator=g, device="cuda")
            logits = model.output(model(tokens), lambda h, w, b: F.linear(h, w, b).float())
            F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        if step > 0:
            assert sorted(id(m) for m in cast) == sorted(resharded)
        optimizer.grad_scale = clip_divisor(total_grad_norm(list(model.parameters()), None), max_norm=0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert all(torch.equal(c, m.bfloat16()) for m, c in copies.items())
    assert optimizer._buckets[0].bf16_grads is not None  # the kernel ran
