"""The LLaMA architecture's hyperparameters, and their translation to and from Hugging Face `config.json`.

A field of a Hugging Face config that would change the computation and that we do not implement (a bias,
another rope type, a different activation) is refused with a message naming it: it is never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import jax.numpy as jnp

from pallas_kernels.dispatch import IMPLS

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")  # of parameters and computation
# The architecture's sizes: whole numbers >= 1 (head_dim may be None: hidden_size / num_heads).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
          "max_position_embeddings")


class UnsupportedConfigError(ValueError):
    """A checkpoint's configuration asks for something this LLaMA implementation does not compute."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's frequency-dependent rope scaling (`rope_type: llama3` in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a LLaMA-style decoder.

    `param_dtype` is the storage dtype of the weights, `dtype` the dtype matmuls and activations are
    computed in (normalisation, softmax and logits always run in float32). `remat` chooses what the
    scanned layers save for the backward pass: "none" (save everything), "full" (recompute everything),
    "dots" (save matmul outputs), "dots_no_batch" (save matmul outputs without batch dimensions).
    `attention` picks the attention kernels: "auto" (flash attention through Pallas on TPU and GPU,
    XLA on CPU), "pallas" or "xla" (see `hyjax.model.attention`); it changes no result beyond rounding.
    `scan_unroll` layers run per iteration of the layer scan: 1 keeps one loop body (the smallest
    program), `num_layers` unrolls every layer (XLA's cost analysis, which counts a loop body once, then
    counts the whole model).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    scan_unroll: int = 1

    def __post_init__(self):
        for name in _SIZES:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UnsupportedConfigError(f"{name}={value!r} must be a whole number >= 1")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise UnsupportedConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each key/value head among a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in IMPLS:
            raise ValueError(f"attention={self.attention!r} is not one of {IMPLS}")
        if not 1 <= self.scan_unroll <= self.num_layers:
            raise ValueError(f"scan_unroll={self.scan_unroll} must be in [1, num_layers={self.num_layers}]")
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value not in DTYPES:
                raise ValueError(f"{name}={value!r} must be one of {', '.join(DTYPES)}")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with some fields changed (e.g. `config.replace(dtype="bfloat16", remat="dots")`)."""
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Exact parameter count of the model this config describes."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        per_layer = attn + 3 * d * f + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + d

    # ----------------------------------------------------------------------------------- Hugging Face

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face `LlamaForCausalLM` config (legacy rope keys, read by transformers 4 and 5)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": self.param_dtype,
        }

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Reads a Hugging Face LLaMA config, refusing every field that would change the computation."""
        hf = dict(hf)
        unknown = sorted(set(hf) - _HF_FIELDS_READ - set(_HF_FIELDS_REQUIRED_VALUE) - _HF_FIELDS_METADATA)
        if unknown:
            raise UnsupportedConfigError(
                f"config field(s) {unknown} are not supported by hyjax's LLaMA; if they do not change the "
                "model's computation, remove them from config.json"
            )
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral") or (model_type == "mistral" and hf.get("sliding_window")):
            raise UnsupportedConfigError(f"model_type={model_type!r} is not supported; hyjax loads 'llama' models")
        for key, allowed in _HF_FIELDS_REQUIRED_VALUE.items():
            if key in hf and hf[key] is not None and hf[key] not in allowed:
                raise UnsupportedConfigError(
                    f"config field {key}={hf[key]!r} is not supported (hyjax computes {key}={allowed[0]!r})"
                )
        rope_theta, rope_scaling = _read_rope(hf)
        eos = hf.get("eos_token_id")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        dtype = hf.get("torch_dtype") or hf.get("dtype")
        if dtype in DTYPES:
            fields["param_dtype"] = dtype
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_json(cls, path: str | pathlib.Path, **overrides) -> "LlamaConfig":
        """Reads `config.json` (a file or the folder holding it)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no Hugging Face config at {path}: a checkpoint folder needs config.json")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(hf, dict):
            raise ValueError(f"{path} must hold a JSON object of the model's settings, not a {type(hf).__name__}")
        return cls.from_hf_dict(hf, **overrides)


# Fields that are read into LlamaConfig.
_HF_FIELDS_READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "model_type",
    "torch_dtype", "dtype",
}
# Fields accepted only with the value our computation implements (first value is the one we compute).
_HF_FIELDS_REQUIRED_VALUE = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "attention_dropout": (0.0, 0),
    "pretraining_tp": (1,),
    "rope_interleaved": (False,),
    "sliding_window": (None,),
    "is_encoder_decoder": (False,),
    "add_cross_attention": (False,),
    "tie_encoder_decoder": (False,),
}
# Bookkeeping fields that do not affect the computation.
_HF_FIELDS_METADATA = {
    "architectures", "transformers_version", "_name_or_path", "initializer_range", "use_cache",
    "pad_token_id", "is_llama_config", "transformers.js_config", "tokenizer_class", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "id2label", "label2id", "chunk_size_feed_forward",
    "max_window_layers", "use_sliding_window", "problem_type", "is_decoder", "torchscript", "pruned_heads",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "tf_legacy_loss", "use_bfloat16", "cross_attention_hidden_size",
    # generation defaults (they steer decoding, not the model)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}


def _read_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Rope base and scaling from either the legacy (`rope_theta`, `rope_scaling`) or the newer
    (`rope_parameters`) form of a Hugging Face config."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    if "type" in legacy:
        legacy["rope_type"] = legacy.pop("type")
    conflicts = sorted(k for k in set(params) & set(legacy) if params[k] != legacy[k])
    if conflicts:
        raise UnsupportedConfigError(
            f"rope_scaling and rope_parameters disagree on {conflicts}; keep one of them in config.json"
        )
    params.update(legacy)
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", "default")
    if rope_type == "default":
        extra = sorted(k for k in params if params[k] is not None)
        if extra:
            raise UnsupportedConfigError(f"rope_type 'default' with extra rope parameters {extra} is not supported")
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"rope_type={rope_type!r} is not supported; hyjax implements 'default' and 'llama3' rope"
        )
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    extra = sorted(set(params) - known)
    if extra:
        raise UnsupportedConfigError(f"llama3 rope scaling field(s) {extra} are not supported")
    scaling = RopeScaling(**{k: params[k] for k in known if k in params})
    if not math.isfinite(scaling.factor) or scaling.factor <= 0:
        raise UnsupportedConfigError(f"rope scaling factor must be positive, got {scaling.factor}")
    return float(theta), scaling
