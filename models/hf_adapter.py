"""Our parameter names and hyperparameters in Hugging Face's terms (Qwen3ForCausalLM, LlamaForCausalLM).

The decoders are the same math: RoPE uses the same rotate-half layout (models/rope.py),
so q/k weights need no permutation, and only names differ. A tied head has no
``lm_head.weight`` in a Hugging Face folder, as our checkpoints store it once,
as the embedding.
"""

import re
from typing import Any

from models.args import ModelArgs, RopeScaling

_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")

# Our model name -> (Hugging Face model_type, architecture).
HF_MODELS = {"qwen3": ("qwen3", "Qwen3ForCausalLM"), "llama3": ("llama", "LlamaForCausalLM")}


def to_hf_name(fqn: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = _LAYER_NAME.match(fqn)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    module = fqn.removesuffix(".weight")
    if module in _TOP:
        return f"{_TOP[module]}.weight"
    raise KeyError(f"{fqn} has no Hugging Face name")


_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(s: RopeScaling) -> dict:
    return {"rope_type": "llama3", **{key: getattr(s, key) for key in _SCALING_KEYS}}


def hf_config(name: str, args: ModelArgs, dtype: str) -> dict[str, Any]:
    """A ``config.json`` in the published models' layout (``rope_theta`` and ``rope_scaling`` at the top)."""
    model_type, architecture = HF_MODELS[name]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": _rope_scaling(args.rope_scaling) if args.rope_scaling else None,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": args.init_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if name == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    else:
        config.update(mlp_bias=False, pretraining_tp=1)
    return config


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide the weights' meaning, with the defaults transformers would fill in.

    transformers 5 writes ``rope_parameters`` (theta and scaling in one dict) where 4.x and the
    published files have ``rope_theta`` and ``rope_scaling``; both read the same here.
    """
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or rope
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling = None if kind == "default" else {"rope_type": kind, **{k: scaling.get(k) for k in _SCALING_KEYS}}
    out = {
        key: config.get(key)
        for key in (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "rms_norm_eps",
            "hidden_act",
        )
    }
    out.update(
        head_dim=config.get("head_dim") or (config.get("hidden_size") or 0) // (config.get("num_attention_heads") or 1),
        rope_theta=config.get("rope_theta", rope.get("rope_theta")),
        rope_scaling=scaling,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", False),
        mlp_bias=config.get("mlp_bias", False),
    )
    return out


def config_mismatches(config: dict[str, Any], name: str, args: ModelArgs) -> list[str]:
    """``field: folder X vs recipe Y`` for every field of a ``config.json`` that differs from ours."""
    theirs, ours = _comparable(config), _comparable(hf_config(name, args, "float32"))
    return [f"{key}: folder {theirs[key]!r} vs recipe {ours[key]!r}" for key in ours if theirs[key] != ours[key]]
