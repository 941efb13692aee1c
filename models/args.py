"""Hyperparameters of one decoder, shared by Llama 3 and Qwen3."""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    """A flavor's numbers, plus how attention is masked.

    ``attn_mask_type`` and ``eos_id`` live here, as in TorchTitan, rather than being passed
    with every call: every copy of the model (pipeline stages are deep copies) then masks
    alike, and a caller that hands the first stage tokens (training, evaluation,
    ``forward_logits``) gets the same attention without knowing about masks. They change
    no weight, so checkpoints leave them out (``training/checkpoint.py``).
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's queries and keys
    max_seq_len: int
    rope_scaling: Optional[RopeScaling] = None
    init_std: float = 0.02
    attn_mask_type: str = "causal"  # the recipe's model.attn_mask_type, whose type lists the choices
    eos_id: Optional[int] = None  # block_causal: the token that ends a document (the tokenizer's EOS)

    def num_params(self) -> int:
        """Parameters as published: a tied embedding counts once."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2 + (2 * hd if self.qk_norm else 0)
        block = attn + 3 * d * self.ffn_dim + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * block + embeddings + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU: 6 x matmul parameters + causal-free attention term.

        The embedding lookup is no matmul, the output projection is one, so the
        parameter term counts the vocabulary matrix exactly once, tied or not.
        """
        matmul_params = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.dim)
        return 6 * matmul_params + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
