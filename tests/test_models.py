"""Model flavors, hidden-state output, stage splitting and layout-independent init."""

import copy
import dataclasses

import pytest
import torch

from models import MODEL_FLAVORS, Transformer, build_model_args
from models.initialize import init_weights

# Totals from the model cards / Hugging Face parameter counts.
PUBLISHED = {
    ("llama3", "1B"): 1_235_814_400,
    ("llama3", "8B"): 8_030_261_248,
}
# Qwen3 model cards state rounded totals and non-embedding counts (billions).
QWEN3_CARD = {"0.6B": (0.6, 0.44), "1.7B": (1.7, 1.4), "4B": (4.0, 3.6), "8B": (8.2, 6.95)}


def _meta_model(name, flavor, **overrides):
    args = dataclasses.replace(build_model_args(name, flavor), **overrides)
    with torch.device("meta"):
        return Transformer(args)


@pytest.mark.parametrize("flavor", ["1B", "8B"])
def test_llama3_parameter_count_matches_published(flavor):
    model = _meta_model("llama3", flavor)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[("llama3", flavor)]


@pytest.mark.parametrize("flavor", list(QWEN3_CARD))
def test_qwen3_parameter_count_matches_model_card(flavor):
    model = _meta_model("qwen3", flavor)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    card_total, card_non_embedding = QWEN3_CARD[flavor]
    assert round(total / 1e9, 1) == card_total
    digits = 2 if card_non_embedding * 100 % 10 else 1
    non_embedding = total - embedding * (1 if model.args.tie_word_embeddings else 2)
    assert round(non_embedding / 1e9, digits) == card_non_embedding
    assert model.args.num_params() == total


def test_qwen3_flavors_use_published_hyperparameters():
    a = MODEL_FLAVORS["qwen3"]["1.7B"]
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim) == (2048, 28, 16, 8, 128, 6144)
    assert a.vocab_size == 151_936 and a.rope_theta == 1e6 and a.tie_word_embeddings and a.qk_norm
    assert build_model_args("qwen3", "debug", vocab_size=151_936).vocab_size == 151_936


def _small(name="qwen3", vocab=97):
    model = Transformer(dataclasses.replace(build_model_args(name, "debug"), vocab_size=vocab, max_seq_len=32))
    init_weights(model, seed=3, device=torch.device("cpu"))
    return model


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_forward_returns_hidden_states_and_forward_logits_projects_them(name):
    model = _small(name)
    tokens = torch.randint(0, 97, (2, 11))
    hidden = model(tokens)
    assert hidden.shape == (2, 11, model.args.dim)
    logits = model.forward_logits(tokens)
    torch.testing.assert_close(logits, hidden @ model.output.weight.t())


def test_tied_head_shares_the_embedding_after_meta_materialization():
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(build_model_args("qwen3", "debug"), vocab_size=97, max_seq_len=32))
    model.to_empty(device="cpu")
    init_weights(model, seed=0, device=torch.device("cpu"))
    assert model.output.weight is model.tok_embeddings.weight
    assert not _small("llama3").args.tie_word_embeddings


def test_model_is_causal():
    model = _small()
    tokens = torch.randint(0, 97, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 97
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_stage_pieces_compose_to_the_whole_model_with_the_same_init():
    """Deleting modules leaves working stages whose names and init match the full model."""
    full = _small()
    with torch.device("meta"):
        meta = Transformer(full.args)
    first, last = copy.deepcopy(meta), copy.deepcopy(meta)
    for name in ["2", "3"]:
        del first.layers[name]
    for name in ["0", "1"]:
        del last.layers[name]
    first.norm = first.output = None
    last.tok_embeddings = None
    for part in (first, last):
        part.to_empty(device="cpu")
        init_weights(part, seed=3, device=torch.device("cpu"))
    # The last stage's head is its own copy, initialized equal to the embedding.
    torch.testing.assert_close(last.output.weight, full.tok_embeddings.weight)
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(last(first(tokens)), full(tokens))


def test_flops_per_token_counts_the_vocabulary_matmul_once():
    a = build_model_args("llama3", "8B")
    non_embedding = a.num_params() - 2 * a.vocab_size * a.dim
    expected = 6 * (non_embedding + a.vocab_size * a.dim) + 12 * a.n_layers * a.n_heads * a.head_dim * 4096
    assert a.flops_per_token(4096) == expected


def test_rope_matches_a_complex_rotation_reference():
    from models.rope import apply_rope, rope_cos_sin

    head_dim, seq = 8, 5
    x = torch.randn(1, seq, 2, head_dim, dtype=torch.float64)
    out = apply_rope(x, rope_cos_sin(head_dim, seq, 10000.0, None).double())
    inv = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * inv
    half = head_dim // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)[None, :, None]
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1).to(out.dtype), atol=1e-6, rtol=1e-6)
