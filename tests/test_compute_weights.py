"""``ComputeWeights`` against FSDP2 on a one-rank mesh, the path it replaces: bf16 forward and backward
from fp32 parameters, gradients accumulated in fp32 over micro-steps, the same parameters bitwise
after several optimizer steps, tied weights included; and outside it the model holds its fp32
parameters, as a checkpoint sees them.
"""

import pytest
import torch
import torch.nn.functional as F

from models import Transformer, build_model_args
from models.initialize import init_weights
from parallelisms.compute_weights import ComputeWeights
from parallelisms.distributed import init_mesh
from parallelisms.fsdp import apply_fsdp
from tests.dist_utils import run_distributed
from training.flat_adamw import FlatAdamW

STEPS, MICRO_STEPS, SEQ = 3, 2, 32


def _model(name: str, fsdp_mesh=None) -> Transformer:
    args = build_model_args(name, "debug")
    with torch.device("meta"):
        model = Transformer(args)
    if fsdp_mesh is not None:
        apply_fsdp(model, fsdp_mesh, "bfloat16", "float32", "default", pp_enabled=False)
    model.to_empty(device="cpu")
    init_weights(model, seed=0, device=torch.device("cpu"))
    return model


def _step(model: Transformer, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Micro-steps of a materialized-logits loss in fp32 from the model's bf16 hidden states, then AdamW."""
    g = torch.Generator().manual_seed(step)
    for _ in range(MICRO_STEPS):
        tokens = torch.randint(0, model.args.vocab_size, (2, SEQ), generator=g)
        hidden = model(tokens)
        logits = model.output(hidden, lambda h, w, b: F.linear(h, w, b).float())
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare(rank: int, world_size: int, name: str) -> list[str]:
    """Names of the parameters that differ between the two paths after ``STEPS`` optimizer steps."""
    mesh = init_mesh("cpu", (1,), ("dp_shard",))
    fsdp, plain = _model(name, mesh), _model(name)
    weights = ComputeWeights([plain], torch.bfloat16)
    optimizers = [
        FlatAdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) for m in (fsdp, plain)
    ]
    differ = []
    for step in range(STEPS):
        _step(fsdp, optimizers[0], step)
        with weights:
            _step(plain, optimizers[1], step)
    for (n, p), q in zip(fsdp.named_parameters(), plain.parameters()):
        if q.dtype != torch.float32 or not torch.equal(_full(p.detach()), q.detach()):
            differ.append(n)
    return differ


def _compare_grads(rank: int, world_size: int, name: str) -> list[str]:
    """Names of the parameters whose fp32 gradients differ after one step's micro-steps."""
    mesh = init_mesh("cpu", (1,), ("dp_shard",))
    fsdp, plain = _model(name, mesh), _model(name)
    weights = ComputeWeights([plain], torch.bfloat16)
    noop = type("NoStep", (), {"step": lambda self: None, "zero_grad": lambda self, set_to_none: None})()
    _step(fsdp, noop, 0)
    with weights:
        _step(plain, noop, 0)
    return [
        n
        for (n, p), q in zip(fsdp.named_parameters(), plain.parameters())
        if q.grad is None or q.grad.dtype != torch.float32 or not torch.equal(_full(p.grad), q.grad)
    ]


@pytest.mark.parametrize("name", ["qwen3", "llama3"])  # tied and untied embedding and head
def test_gradients_equal_fsdp_on_one_rank(name):
    assert run_distributed(_compare_grads, 1, name) == [[]]


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_training_equals_fsdp_on_one_rank(name):
    assert run_distributed(_compare, 1, name) == [[]]


def test_outside_the_context_the_model_holds_its_fp32_parameters():
    model = _model("qwen3")
    before = dict(model.named_parameters())
    weights = ComputeWeights([model], torch.bfloat16)
    with weights:
        inside = dict(model.named_parameters(remove_duplicate=False))
        assert all(p.dtype == torch.bfloat16 for p in inside.values())
        # the tied embedding and head: one bf16 copy in both places
        assert inside["output.weight"] is inside["tok_embeddings.weight"]
        hidden = model(torch.randint(0, 2048, (1, SEQ)))
        assert hidden.dtype == torch.bfloat16
    assert dict(model.named_parameters()) == before
    assert all(p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point())
    torch.testing.assert_close(
        inside["layers.0.attention.wq.weight"].float(), before["layers.0.attention.wq.weight"], rtol=2**-8, atol=0
    )


def test_nothing_to_cast_is_a_no_op():
    model = _model("llama3")
    before = dict(model.named_parameters())
    with ComputeWeights([model], torch.float32):
        assert dict(model.named_parameters()) == before
