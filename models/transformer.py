"""A minimal decoder serving Llama 3 and Qwen3.

The model ends at the final norm and returns hidden states; the classifier
weight lives in ``self.output`` and is applied by the loss (see losses/).
Layers sit in an ``nn.ModuleDict`` keyed by their global index, so pipeline
stages are built by deleting modules: the remaining ones keep their names.
Attention is causal over the window, or under ``block_causal`` within each packed
document (models/attention.py).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.args import ModelArgs
from models.attention import AttentionMask, block_causal_mask, document_ids, masked_attention
from models.output_head import OutputHead
from models.rope import apply_rope, rope_cos_sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(args.head_dim, eps=args.norm_eps) if args.qk_norm else None

    def forward(self, x: Tensor, cos_sin: Tensor, mask: Optional[AttentionMask] = None) -> Tensor:
        """``mask`` None: causal over the whole window."""
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        # Repeating K/V keeps SDPA on its fastest (flash) kernels for every GQA ratio.
        repeats = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = masked_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, cos_sin: Tensor, mask: Optional[AttentionMask] = None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos_sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token ids (or, on a later pipeline stage, hidden states) in; hidden states out.

    A pipeline stage is this module with some of ``tok_embeddings``, ``layers``,
    ``norm`` and ``output`` set to ``None``/deleted; ``forward`` works for any such subset.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.attn_mask_type == "block_causal" and args.eos_id is None:
            raise ValueError("attn_mask_type 'block_causal' needs eos_id, the token that ends a document")
        self.args = args
        self.tok_embeddings: Optional[nn.Embedding] = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in range(args.n_layers)})
        self.norm: Optional[nn.RMSNorm] = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output: Optional[OutputHead] = OutputHead(args.dim, args.vocab_size)
        # False when the head is a separate copy kept equal by summing gradients
        # (pipeline stages, vocab-parallel head; see parallelisms/tied_embeddings.py).
        self.share_embedding = args.tie_word_embeddings
        self.tie_weights()
        self.register_buffer("rope_cache", self._rope_cache(), persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the head (when both are here); ``to_empty`` on a plain module unties them."""
        if self.share_embedding and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def _rope_cache(self, device: Optional[torch.device] = None) -> Tensor:
        a = self.args
        return rope_cos_sin(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device)

    def forward(self, x: Tensor, doc_ids: Optional[Tensor] = None) -> Tensor:
        """``doc_ids`` (block_causal): each position's document, ``document_ids(tokens)``; the first
        stage computes it from its tokens when not given, later pipeline stages need it given."""
        mask = None
        if self.args.attn_mask_type == "block_causal":
            if doc_ids is None:
                if self.tok_embeddings is None:
                    raise ValueError("block_causal: a pipeline stage after the first needs doc_ids (stage_kwargs)")
                doc_ids = document_ids(x, self.args.eos_id)
            mask = block_causal_mask(doc_ids)  # once per microbatch, shared by every layer
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(x)
        for layer in self.layers.values():
            x = layer(x, self.rope_cache, mask)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def stage_kwargs(self, tokens: Tensor) -> dict[str, Tensor]:
        """What every pipeline stage's forward takes besides its activations (the schedule splits
        it into microbatches): under block_causal the document ids, which a stage that sees hidden
        states cannot compute; nothing when causal, so causal stages exchange nothing extra."""
        if self.args.attn_mask_type == "causal":
            return {}
        return {"doc_ids": document_ids(tokens, self.args.eos_id)}

    def forward_logits(self, tokens_or_hidden: Tensor) -> Tensor:
        """Inference/eval: full-vocabulary logits ``[batch, seq, vocab]``. Never used in training."""
        return self.output.logits(self(tokens_or_hidden))

    def init_spec(self, fqn: str) -> tuple[str, float]:
        """How parameter ``fqn`` is initialized: ("normal", std) or ("ones", 0.0).

        Normal(0, 0.02) for every matrix, as the published Llama 3 / Qwen3 configs
        state (``initializer_range``); norms start at one.
        """
        return ("ones", 0.0) if "norm" in fqn else ("normal", self.args.init_std)

    def init_key(self, fqn: str) -> str:
        """The name that seeds ``fqn``'s random init: a tied head shares the embedding's."""
        if self.args.tie_word_embeddings and fqn == "output.weight":
            return "tok_embeddings.weight"
        return fqn

    def init_buffers(self, device: torch.device) -> None:
        self.rope_cache = self._rope_cache(device)
