"""Architecture presets of the LLaMA-family models hyjax targets, as published in their `config.json`."""

from __future__ import annotations

import difflib

from hyjax.model.config import LlamaConfig, RopeScaling

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)


def _smollm2(hidden, inter, layers, heads, kv, theta):
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, rope_theta=theta, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_embeddings=True, bos_token_id=1, eos_token_id=2)


def _llama2(hidden, inter, layers, heads, kv):
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def _llama3(hidden, inter, layers, heads, rope_scaling):
    return LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=8, rope_theta=500000.0, rope_scaling=rope_scaling,
                       rms_norm_eps=1e-5, max_position_embeddings=131072 if rope_scaling else 8192,
                       bos_token_id=128000, eos_token_id=(128001, 128008, 128009) if rope_scaling else 128001)


PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": _smollm2(576, 1536, 30, 9, 3, 100000.0),
    "smollm2-360m": _smollm2(960, 2560, 32, 15, 5, 100000.0),
    "smollm2-1.7b": _smollm2(2048, 8192, 24, 32, 32, 130000.0),
    "tinyllama-1.1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5,
                                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "llama2-7b": _llama2(4096, 11008, 32, 32, 32),
    "llama2-13b": _llama2(5120, 13824, 40, 40, 40),
    "llama2-70b": _llama2(8192, 28672, 80, 64, 8),
    "llama3-8b": _llama3(4096, 14336, 32, 32, None),
    "llama3-70b": _llama3(8192, 28672, 80, 64, None),
    "llama3.1-8b": _llama3(4096, 14336, 32, 32, _LLAMA31_ROPE),
    "llama3.1-70b": _llama3(8192, 28672, 80, 64, _LLAMA31_ROPE),
    "llama3.1-405b": _llama3(16384, 53248, 126, 128, _LLAMA31_ROPE),
}

# The chat template each preset's instruct variant uses (see hyjax.tokenization.chat_templates).
CHAT_TEMPLATES: dict[str, str] = {
    "smollm2-135m": "chatml", "smollm2-360m": "chatml", "smollm2-1.7b": "chatml",
    "tinyllama-1.1b": "zephyr",
    "llama2-7b": "llama2", "llama2-13b": "llama2", "llama2-70b": "llama2",
    "llama3-8b": "llama3", "llama3-70b": "llama3",
    "llama3.1-8b": "llama3", "llama3.1-70b": "llama3", "llama3.1-405b": "llama3",
}


def preset(name: str, **overrides) -> LlamaConfig:
    """The named preset, with optional field overrides (e.g. `preset("llama3.1-8b", dtype="bfloat16")`)."""
    key = name.lower()
    if key not in PRESETS:
        close = difflib.get_close_matches(key, PRESETS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown model preset {name!r}{hint} Known presets: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]
