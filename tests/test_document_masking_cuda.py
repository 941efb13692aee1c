"""block_causal on a GPU: FlexAttention's block mask against SDPA with the dense mask the CPU runs.

bf16, forward and backward, relative error max |flex - dense| / max |dense| < 2e-2; each
test prints its errors. The windows hold Qwen3-1.7B-sized heads and documents of the shipped
corpus's size (~450 tokens), plus the edge cases: one-token and empty documents, a document
across a 128-block boundary, and a window with no EOS at all.
"""

import copy
import dataclasses

import pytest
import torch

from config.job_config import ActivationCheckpoint
from models import build_model_args
from models.attention import dense_block_causal_mask, document_ids, flex_block_causal_mask, masked_attention
from models.initialize import canonical_name
from models.rope import rope_cos_sin
from models.transformer import Transformer
from parallelisms.activation_checkpoint import apply_activation_checkpointing
from parallelisms.compile import apply_compile

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EOS, SEQ, TOL = 0, 2048, 2e-2


def _tokens(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (3, SEQ), generator=g)
    ends = torch.cumsum(torch.randint(300, 600, (8,), generator=g), 0)  # ~450-token documents
    tokens[0, ends[ends < SEQ]] = EOS
    tokens[1, [0, 1, 2, 127, 128, 129, 700, SEQ - 1]] = EOS  # empty, one-token, across blocks 0|1, last
    return tokens.to(device)  # row 2: one document filling the window


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _report(name: str, errors: dict[str, float]) -> None:
    print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()) + f" (limit {TOL:.0e})")
    assert max(errors.values()) < TOL, errors


def test_flex_attention_matches_the_dense_mask():
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(3, 16, SEQ, 128, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn(q.shape, generator=g, device=device, dtype=torch.bfloat16)
    doc_ids = document_ids(_tokens(device), EOS)
    results = []
    for mask in (flex_block_causal_mask(doc_ids), dense_block_causal_mask(doc_ids)):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = masked_attention(*inputs, mask)
        out.backward(grad_out)
        results.append([out, *(t.grad for t in inputs)])
    _report(
        "flex_attention vs SDPA with the dense mask",
        {name: _relative_error(f, d) for name, f, d in zip(("out", "dq", "dk", "dv"), *results)},
    )


_OP_AC = ActivationCheckpoint(mode="selective", selective_ac_option="op")
WRAPPINGS = {  # name: (activation checkpointing, torch.compile)
    "op AC, compiled": (_OP_AC, True),  # configs/qwen3_1p7b.toml
    "op AC, eager": (_OP_AC, False),
    "full AC, eager": (ActivationCheckpoint(mode="full"), False),
}


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_wrapped_block_with_flex_matches_the_plain_block_with_the_dense_mask(wrapping):
    """A block as parallelize wraps it (Qwen3-1.7B's recipe: op-level selective AC and torch.compile
    fullgraph) with the block mask, against the plain block with the dense mask; compiled, a second
    microbatch's documents must not recompile it."""
    device = torch.device("cuda")
    args = dataclasses.replace(
        build_model_args("qwen3", "1.7B"),
        n_layers=1,
        dim=1024,
        ffn_dim=3072,
        vocab_size=1000,
        max_seq_len=SEQ,
        attn_mask_type="block_causal",
        eos_id=EOS,
    )
    torch.manual_seed(2)
    model = Transformer(args).to(device, torch.bfloat16)
    recipe = copy.deepcopy(model)
    ac, compiled = WRAPPINGS[wrapping]
    apply_activation_checkpointing(recipe, ac)
    if compiled:
        apply_compile(recipe)
    tokens = _tokens(device)
    x = torch.randn(*tokens.shape, args.dim, device=device, dtype=torch.bfloat16)
    rope = rope_cos_sin(args.head_dim, SEQ, args.rope_theta, None, device)
    doc_ids = document_ids(tokens, EOS)
    results = []
    for part, mask in ((recipe, flex_block_causal_mask(doc_ids)), (model, dense_block_causal_mask(doc_ids))):
        h = x.detach().requires_grad_()
        out = part.layers["0"](h, rope, mask)
        out.float().square().mean().backward()
        results.append({"out": out, "dx": h.grad, **{canonical_name(n): p.grad for n, p in part.named_parameters()}})
    flex, dense = results
    _report(
        f"block, {wrapping} (flex) vs plain block (dense)",
        {
            name: _relative_error(flex[name], dense[name])
            for name in (
                "out",
                "dx",
                "layers.0.attention.wq.weight",
                "layers.0.attention.wk.weight",
                "layers.0.feed_forward.w1.weight",
            )
        },
    )
    with torch.compiler.set_stance("fail_on_recompile"):
        other = flex_block_causal_mask(document_ids(tokens.roll(100, dims=1), EOS))
        recipe.layers["0"](x.detach().requires_grad_(), rope, other).float().square().mean().backward()
