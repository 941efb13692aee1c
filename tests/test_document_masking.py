"""``model.attn_mask_type = "block_causal"``: no attention across an EOS in a packed window.

One process, CPU, fp32 (the dense-mask path; FlexAttention's is checked against it on a
GPU in test_document_masking_cuda.py). The multi-process pipeline cases are in
test_parallel_equivalence.py.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config.job_config import ActivationCheckpoint
from models import Transformer, build_model_args
from models.attention import dense_block_causal_mask, document_ids
from models.initialize import init_weights
from models.rope import apply_rope
from parallelisms.activation_checkpoint import apply_activation_checkpointing
from parallelisms.compile import apply_compile
from parallelisms.pipeline import PipelinePlan, build_stage_module
from tests.dist_utils import Launched, train_command
from tests.word_tokenizer import write_word_tokenizer
from training.checkpoint import model_fingerprint

EOS, VOCAB = 0, 97


def _model(mask_type="block_causal", n_layers=4):
    args = dataclasses.replace(
        build_model_args("qwen3", "debug"),
        vocab_size=VOCAB,
        max_seq_len=64,
        n_layers=n_layers,
        attn_mask_type=mask_type,
        eos_id=EOS,
    )
    model = Transformer(args)
    init_weights(model, seed=3, device=torch.device("cpu"))
    return model


def _documents(lengths, generator):
    """Random documents (ids 1..VOCAB-1), each followed by EOS except a last one cut by the window."""
    docs = [torch.randint(1, VOCAB, (n,), generator=generator) for n in lengths]
    return [torch.cat([d, torch.tensor([EOS])]) for d in docs[:-1]] + [docs[-1]]


def test_document_ids_count_the_eos_before_each_position():
    tokens = torch.tensor([[5, EOS, 7, 8, EOS, EOS, 9], [EOS, 1, 2, 3, 4, 5, EOS]])
    expected = torch.tensor([[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])
    assert torch.equal(document_ids(tokens, EOS), expected.int())


def test_dense_mask_matches_a_brute_force_mask():
    """Query q sees key k iff k <= q and no EOS lies in positions k..q-1."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4, (3, 24), generator=g)  # EOS = 0: a quarter of the ids, runs of EOS included
    tokens[0, 0] = tokens[0, -1] = EOS
    expected = torch.zeros(3, 1, 24, 24, dtype=torch.bool)
    for b in range(3):
        for q in range(24):
            for k in range(q + 1):
                expected[b, 0, q, k] = not (tokens[b, k:q] == EOS).any()
    assert torch.equal(dense_block_causal_mask(document_ids(tokens, EOS)), expected)


def _token_losses(model, tokens):
    """Per-position next-token cross-entropy, ``[batch, seq - 1]``."""
    logits = model.forward_logits(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


def test_packed_window_loss_equals_each_document_alone():
    """Position by position, where the target is in the same document (an EOS's target is the next
    document's first token, which a document alone has no counterpart for). Two windows, different
    layouts; RoPE positions stay global, so a document sits at another offset than alone."""
    g = torch.Generator().manual_seed(1)
    layouts = [[6, 9, 4, 0, 9], [13, 2, 9, 5]]  # an empty document: an EOS right after an EOS
    windows = [_documents(lengths, g) for lengths in layouts]
    assert {sum(len(d) for d in docs) for docs in windows} == {32}
    tokens = torch.stack([torch.cat(docs) for docs in windows])
    block_causal = _model()
    causal = copy.deepcopy(block_causal)
    causal.args = dataclasses.replace(causal.args, attn_mask_type="causal")
    with torch.no_grad():
        packed, packed_causal = _token_losses(block_causal, tokens), _token_losses(causal, tokens)
        for row, docs in enumerate(windows):
            start = 0
            for n, doc in enumerate(docs):
                same_document = len(doc) - 1  # its last position's target is the next document's, or none
                if same_document > 0:
                    alone = _token_losses(block_causal, doc[None])[0, :same_document]
                    got = packed[row, start : start + same_document]
                    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
                    if n > 0:  # the same window without the mask: earlier documents leak in
                        assert not torch.allclose(
                            packed_causal[row, start : start + same_document], alone, rtol=1e-3, atol=1e-3
                        )
                start += len(doc)


def _old_causal_forward(model, tokens):
    """The model's forward as it was before masks existed, the reference the causal path must match bitwise."""
    x = model.tok_embeddings(tokens)
    for layer in model.layers.values():
        a, h = layer.attention, layer.attention_norm(x)
        bsz, seq, _ = h.shape
        q = a.wq(h).view(bsz, seq, a.n_heads, a.head_dim)
        k = a.wk(h).view(bsz, seq, a.n_kv_heads, a.head_dim)
        v = a.wv(h).view(bsz, seq, a.n_kv_heads, a.head_dim)
        q, k = a.q_norm(q), a.k_norm(k)
        q, k = apply_rope(q, model.rope_cache), apply_rope(k, model.rope_cache)
        repeats = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + a.wo(out.transpose(1, 2).reshape(bsz, seq, -1))
        x = x + layer.feed_forward(layer.ffn_norm(x))
    return model.norm(x)


def test_causal_is_unchanged_bitwise():
    model = _model("causal")
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    tokens[:, 10] = EOS  # an EOS changes nothing under causal
    with torch.no_grad():
        assert torch.equal(model(tokens), _old_causal_forward(model, tokens))
    assert model.stage_kwargs(tokens) == {}  # nothing extra for pipeline stages to carry


def test_pipeline_stages_given_stage_kwargs_compose_to_the_whole_model():
    model = _model()
    g = torch.Generator().manual_seed(4)
    tokens = torch.stack([torch.cat(_documents([5, 12, 13], g)), torch.cat(_documents([20, 3, 7], g))])
    plan = PipelinePlan(((0, 2), (2, 4)), pp_degree=2, pp_rank=0, schedule="1F1B", n_microbatches=1, microbatch_size=2)
    first, last = (build_stage_module(model, plan, stage) for stage in (0, 1))  # copies, weights included
    kwargs = model.stage_kwargs(tokens)
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens, **kwargs), **kwargs), model(tokens), rtol=0, atol=0)
        with pytest.raises(ValueError, match="needs doc_ids"):
            last(first(tokens))


def test_activation_checkpointing_and_compiled_blocks_take_the_mask():
    """The recipe's block wrapping (op-level selective AC, then torch.compile(fullgraph=True)) gives the
    eager block_causal model's loss and gradients."""
    eager = _model(n_layers=2)
    wrapped = copy.deepcopy(eager)
    apply_activation_checkpointing(wrapped, ActivationCheckpoint(mode="selective", selective_ac_option="op"))
    apply_compile(wrapped)
    g = torch.Generator().manual_seed(5)
    tokens = torch.stack([torch.cat(_documents([9, 14, 9], g)), torch.cat(_documents([3, 20, 9], g))])
    for model in (eager, wrapped):
        _token_losses(model, tokens).sum().backward()
    for (name, p), q in zip(eager.named_parameters(), wrapped.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_the_mask_is_no_part_of_a_checkpoints_model():
    """A causal checkpoint resumes or fine-tunes under block_causal, and one written before masks existed loads."""
    args = build_model_args("qwen3", "debug")
    masked = dataclasses.replace(args, attn_mask_type="block_causal", eos_id=256)
    assert model_fingerprint(masked) == model_fingerprint(args)
    assert "attn_mask_type" not in model_fingerprint(args)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Both train.py launches below, started together: each spends ~5 s importing on one core."""
    root = tmp_path_factory.mktemp("refusals")
    tokenizer = write_word_tokenizer(root, eos_token="<END>")  # none of the common EOS names
    tokens = root / "other.tokens"  # written by another tokenizer: ids below 256, none the bytes tokenizer's EOS 256
    (torch.arange(2048, dtype=torch.int32) % 200).numpy().astype("<u4").tofile(tokens)
    block_causal = ["--model.attn_mask_type", "block_causal"]
    commands = {
        "no_eos_token": train_command(1, root / "no_eos_token", "--model.tokenizer", str(tokenizer), *block_causal),
        "no_eos_in_data": train_command(
            1,
            root / "no_eos_in_data",
            "--training.dataset",
            "tokens",
            "--training.dataset_path",
            str(tokens),
            *block_causal,
        ),
    }
    launches = {name: Launched(command, root / name) for name, command in commands.items()}
    yield launches, tokens
    for launch in launches.values():
        launch.stop()


def test_block_causal_without_an_eos_token_stops_before_the_model_is_built(refusals):
    result = refusals[0]["no_eos_token"].result()
    assert result.returncode == 2
    assert result.stderr.startswith("config error: model.tokenizer: ") and result.stderr.count("\n") == 1
    assert "set model.eos_token" in result.stderr


def test_block_causal_on_data_without_the_tokenizers_eos_stops_naming_it(refusals):
    """Tokens written by another tokenizer (ids below 256, none the bytes tokenizer's EOS 256): one line."""
    launches, tokens = refusals
    result = launches["no_eos_in_data"].result()
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (
        f"config error: model.attn_mask_type: {tokens} holds no EOS (id 256, the end of sequence of the run's "
        "tokenizer) in any of its 64 windows, so block_causal, which masks at EOS, would train exactly as causal; "
        "if the data was tokenized with another tokenizer, re-tokenize it with the run's (scripts/pretokenize) or "
        'set model.eos_token to the EOS it was written with; else set model.attn_mask_type = "causal"\n'
    )
