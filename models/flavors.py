"""Published Llama 3 and Qwen3 configurations, plus tiny debug flavors.

Numbers are those of the models' Hugging Face ``config.json`` files.
"""

from models.args import ModelArgs, RopeScaling

_QWEN3 = dict(head_dim=128, vocab_size=151_936, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True, max_seq_len=40_960)
_LLAMA3 = dict(vocab_size=128_256, rope_theta=500_000.0, norm_eps=1e-5, qk_norm=False, max_seq_len=131_072)

QWEN3_FLAVORS = {
    # Tiny layers and vocabulary so a CPU trains it in seconds; `[model] vocab_size = 151936`
    # gives it the real Qwen3 vocabulary (and the real loss-memory problem).
    "debug": ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=192,
        tie_word_embeddings=True,
        **{**_QWEN3, "head_dim": 16, "vocab_size": 2048, "max_seq_len": 4096},
    ),
    "0.6B": ModelArgs(
        dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, tie_word_embeddings=True, **_QWEN3
    ),
    "1.7B": ModelArgs(
        dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144, tie_word_embeddings=True, **_QWEN3
    ),
    "4B": ModelArgs(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728, tie_word_embeddings=True, **_QWEN3),
    "8B": ModelArgs(
        dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288, tie_word_embeddings=False, **_QWEN3
    ),
}

LLAMA3_FLAVORS = {
    "debug": ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=192,
        tie_word_embeddings=False,
        **{**_LLAMA3, "vocab_size": 2048, "max_seq_len": 4096},
    ),
    # Llama 3.2 1B
    "1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        **_LLAMA3,
    ),
    # Llama 3.1 8B
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        tie_word_embeddings=False,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192),
        **_LLAMA3,
    ),
}

MODEL_FLAVORS = {"qwen3": QWEN3_FLAVORS, "llama3": LLAMA3_FLAVORS}
