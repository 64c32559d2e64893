"""Write tiny LLaMA GGUF files the way llama.cpp's `convert_hf_to_gguf.py` (LlamaModel) does.

Test utility: build a random model with transformers, write it here, and check that a GGUF loader
reproduces the model. Conventions copied from the converter (our own code, same behaviour):

* tensor names: `model.embed_tokens` -> `token_embd`, `model.layers.N.self_attn.{q,k,v,o}_proj` ->
  `blk.N.attn_{q,k,v,output}`, `input_layernorm` -> `attn_norm`, `post_attention_layernorm` ->
  `ffn_norm`, `mlp.{gate,up,down}_proj` -> `ffn_{gate,up,down}`, `model.norm` -> `output_norm`,
  `lm_head` -> `output` (left out when `tie_word_embeddings`);
* Q and K rows are permuted from HF's rotate-half RoPE layout to the interleaved (GPT-J) pair
  layout: per head, HF row `i` (first half) / `i + d/2` (second half) -> GGUF rows `2i` / `2i + 1`;
* metadata `general.architecture = llama` and the `llama.*` hyper-parameters, in converter order;
  `rope_type = llama3` adds the `rope_freqs.weight` F32 tensor of per-frequency divisors (with
  `original_max_position_embeddings` read from the rope parameters, default 8192);
* 1-D tensors (norms) stay F32 whatever `default_type` says, as in llama.cpp.

Quantization: types gguf-py can *quantize* (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, ...)
get the real weights, rounded. Types it can only *dequantize* (K-quants, IQ4_NL, IQ4_XS) get random
blocks with small finite f16 scales, so their values are whatever those bytes decode to, NOT the
given weights. Either way `write_llama_gguf` returns the exact float32 arrays the file holds, by HF
name and in HF layout (Q/K permutation undone): what a correct loader must produce.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

# Dequantize-only types: byte offsets of the f16 scale fields in one block, and the largest
# |multiplier| those scales get (so a scale of ~1/max_mult keeps values around +-1).
_RANDOM_BLOCK_LAYOUT: dict[QT, tuple[tuple[int, ...], int]] = {
    QT.Q2_K: ((80, 82), 45),
    QT.Q3_K: ((108,), 128),
    QT.Q4_K: ((0, 2), 945),
    QT.Q5_K: ((0, 2), 1953),
    QT.Q6_K: ((208,), 4064),
    QT.IQ4_NL: ((0,), 127),
    QT.IQ4_XS: ((0,), 4064),
}
QUANTIZABLE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)
RANDOM_BLOCK_TYPES = tuple(_RANDOM_BLOCK_LAYOUT)


@dataclasses.dataclass(frozen=True)
class RawTensor:
    """A tensor written verbatim: any GGML type id (even one no reader knows) and its bytes.

    `shape` is in numpy/HF order (rows first), as for every other tensor here; no Q/K permutation.
    """

    type_id: int
    shape: tuple[int, ...]
    data: bytes


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of an HF LLaMA parameter: `model.layers.0.mlp.up_proj.weight` -> `blk.0.ffn_up.weight`."""
    if m := _LAYER_RE.fullmatch(hf_name):
        layer, module, suffix = m.groups()
        if module in _LAYER_MAP:
            return f"blk.{layer}.{_LAYER_MAP[module]}.{suffix}"
    else:
        module, _, suffix = hf_name.rpartition(".")
        if module in _TOP_MAP and suffix in ("weight", "bias"):
            return f"{_TOP_MAP[module]}.{suffix}"
    raise ValueError(f"{hf_name=} is not a LLaMA parameter this writer knows; known modules: "
                     f"{sorted(_TOP_MAP)} and model.layers.N.{{{', '.join(_LAYER_MAP)}}}")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp interleaved rows (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: llama.cpp interleaved rows -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hf_config: dict) -> np.ndarray | None:
    """The `rope_freqs.weight` divisors llama.cpp writes for `rope_type == "llama3"`, else None."""
    rope = _rope_parameters(hf_config)
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    dim = _head_dim(hf_config)
    base = _rope_theta(hf_config)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_llama_gguf(
    path: str | os.PathLike,
    hf_state_dict: dict[str, np.ndarray],
    hf_config: dict,
    tensor_types: dict[str, QT] | None = None,
    default_type: QT = QT.F32,
    tokenizer_fields: dict[str, Any] | None = None,
    *,
    raw_tensors: dict[str, RawTensor] | None = None,
    metadata_overrides: dict[str, Any] | None = None,
    name: str = "hyjax-test-llama",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a LLaMA GGUF like llama.cpp's converter and return what the file holds.

    Args:
      path: output file.
      hf_state_dict: HF parameter name -> array (torch tensors: pass `.numpy()`); HF layout.
        `lm_head.weight` is skipped when `hf_config["tie_word_embeddings"]`; `*.rotary_emb.inv_freq`
        is skipped.
      hf_config: `LlamaConfig.to_dict()` or a config.json dict (old `rope_theta`/`rope_scaling` or new
        `rope_parameters` form).
      tensor_types: HF name -> GGML type, overriding `default_type`.
      default_type: type of every 2-D tensor not in `tensor_types`; 1-D tensors default to F32.
      tokenizer_fields: extra metadata, full keys (e.g. `tokenizer.ggml.model`) -> value; ints are
        written UINT32, floats FLOAT32, lists as arrays (int items INT32); or pass `(value, GGUFValueType)`
        (`(list, (VT.ARRAY, sub_type))` for arrays) to force a type.
      raw_tensors: HF name -> `RawTensor`, written verbatim in place of (or besides) the state dict entry.
      metadata_overrides: key -> value (typed as for `tokenizer_fields`) replacing a metadata key;
        None removes it (for testing a loader's errors).
      name: `general.name`.
      seed: seeds the random blocks of dequantize-only types.

    Returns:
      HF name -> float32 array the file holds, in HF layout (Q/K permutation undone), i.e. the
      weights a correct loader must produce; raw tensors are left out; `rope_freqs.weight` (GGUF
      name) is included for llama3 rope.
    """
    tensor_types = dict(tensor_types or {})
    raw_tensors = dict(raw_tensors or {})
    unknown = set(tensor_types) - set(hf_state_dict)
    if unknown:
        raise ValueError(f"tensor_types names {sorted(unknown)} that are not in hf_state_dict")
    n_head = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads") or n_head
    tied = bool(hf_config.get("tie_word_embeddings", False))
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(os.fspath(path), arch="llama")
    metadata = _llama_metadata(hf_config, name, default_type)
    for key, value in (tokenizer_fields or {}).items():
        metadata[key] = _typed(key, value)
    metadata["general.quantization_version"] = (gguf.GGML_QUANT_VERSION, VT.UINT32, None)
    for key, value in (metadata_overrides or {}).items():
        if value is None:
            metadata.pop(key, None)
            writer.kv_data[0].pop(key, None)
        else:
            metadata[key] = _typed(key, value)
    for key, (value, vtype, sub_type) in metadata.items():
        writer.add_key_value(key, value, vtype, sub_type)

    held: dict[str, np.ndarray] = {}
    for hf_name, array in hf_state_dict.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        if hf_name in raw_tensors:
            continue
        array = np.asarray(array, dtype=np.float32)
        heads = n_head if ".q_proj." in hf_name else n_kv if ".k_proj." in hf_name else None
        if heads is not None:
            array = permute_qk(array, heads)
        qtype = tensor_types.get(hf_name, default_type if array.ndim >= 2 else QT.F32)
        stored, values = _encode(hf_name, array, qtype, rng)
        gguf_name = gguf_tensor_name(hf_name)
        if qtype in (QT.F32, QT.F16):
            writer.add_tensor(gguf_name, stored)
        else:
            writer.add_tensor(gguf_name, stored, raw_dtype=qtype)
        held[hf_name] = unpermute_qk(values, heads) if heads is not None else values
    if (factors := llama3_rope_factors(hf_config)) is not None:
        writer.add_tensor("rope_freqs.weight", factors)
        held["rope_freqs.weight"] = factors
    for hf_name, raw in raw_tensors.items():
        data = np.frombuffer(raw.data, dtype=np.int8)
        # A non-uint8 array makes GGUFWriter take raw_shape as is and store type_id unchecked.
        writer.add_tensor(gguf_tensor_name(hf_name), data, raw_shape=raw.shape, raw_dtype=raw.type_id)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _encode(hf_name: str, array: np.ndarray, qtype: QT, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(array to hand GGUFWriter, float32 values it decodes to), both in GGUF row layout."""
    if qtype not in QUANTIZABLE_TYPES and qtype not in _RANDOM_BLOCK_LAYOUT:
        raise ValueError(f"{hf_name}: cannot write type {qtype.name}; supported: quantized from the weights "
                         f"{[t.name for t in QUANTIZABLE_TYPES]}, random blocks "
                         f"{[t.name for t in RANDOM_BLOCK_TYPES]}; use raw_tensors for anything else")
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        raise ValueError(f"{hf_name}: row length {array.shape[-1]} (shape {array.shape}) is not a multiple "
                         f"of the {qtype.name} block size {block}; pick another type for this tensor")
    if qtype in QUANTIZABLE_TYPES:
        stored = gguf.quants.quantize(array, qtype)
    else:
        offsets, max_mult = _RANDOM_BLOCK_LAYOUT[qtype]
        n_blocks = array.size // block
        blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for off in offsets:
            scale = rng.uniform(0.5, 1.0, size=n_blocks) / max_mult
            blocks[:, off:off + 2] = scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
        stored = blocks.reshape(*array.shape[:-1], array.shape[-1] // block * type_size)
    values = np.asarray(gguf.quants.dequantize(stored, qtype), dtype=np.float32).reshape(array.shape)
    if not np.all(np.isfinite(values)):
        raise AssertionError(f"{hf_name}: {qtype.name} encoding produced non-finite values")
    return stored, values


def _rope_parameters(hf_config: dict) -> dict:
    return hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}


def _rope_theta(hf_config: dict) -> float:
    return float(_rope_parameters(hf_config).get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def _head_dim(hf_config: dict) -> int:
    return hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]


def _file_type(default_type: QT) -> int:
    if default_type == QT.F32:
        return gguf.LlamaFileType.ALL_F32
    return getattr(gguf.LlamaFileType, f"MOSTLY_{default_type.name}", gguf.LlamaFileType.GUESSED)


def _llama_metadata(cfg: dict, name: str, default_type: QT) -> dict[str, tuple[Any, VT, VT | None]]:
    """The metadata LlamaModel.set_gguf_parameters writes, in its order (architecture is added by GGUFWriter)."""
    u32 = lambda v: (int(v), VT.UINT32, None)  # noqa: E731
    f32 = lambda v: (float(v), VT.FLOAT32, None)  # noqa: E731
    md = {
        "general.type": ("model", VT.STRING, None),
        "general.name": (name, VT.STRING, None),
        "llama.block_count": u32(cfg["num_hidden_layers"]),
        "llama.context_length": u32(cfg.get("max_position_embeddings", 2048)),
        "llama.embedding_length": u32(cfg["hidden_size"]),
        "llama.feed_forward_length": u32(cfg["intermediate_size"]),
        "llama.attention.head_count": u32(cfg["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        "llama.rope.freq_base": f32(_rope_theta(cfg)),
        "llama.attention.layer_norm_rms_epsilon": f32(cfg.get("rms_norm_eps", 1e-6)),
    }
    if cfg.get("head_dim") is not None:
        md["llama.attention.key_length"] = u32(cfg["head_dim"])
        md["llama.attention.value_length"] = u32(cfg["head_dim"])
    md["general.file_type"] = u32(_file_type(default_type))
    md["llama.vocab_size"] = u32(cfg["vocab_size"])
    md["llama.rope.dimension_count"] = u32(_head_dim(cfg))
    rope = _rope_parameters(cfg)
    if rope.get("rope_type", rope.get("type")) == "linear" and "factor" in rope:
        md["llama.rope.scaling.type"] = ("linear", VT.STRING, None)
        md["llama.rope.scaling.factor"] = f32(rope["factor"])
    return md


def _typed(key: str, value: Any) -> tuple[Any, VT, VT | None]:
    """(value, type, sub_type) for a metadata value, inferring the GGUF type when not given."""
    if isinstance(value, tuple) and len(value) == 2:
        value, vtype = value
        if isinstance(vtype, tuple):
            return value, vtype[0], vtype[1]
        return value, vtype, None
    if isinstance(value, bool):
        return value, VT.BOOL, None
    if isinstance(value, int):
        return value, VT.UINT32, None
    if isinstance(value, float):
        return value, VT.FLOAT32, None
    if isinstance(value, str):
        return value, VT.STRING, None
    if isinstance(value, (list, np.ndarray)) and len(value) > 0:
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        return items, VT.ARRAY, VT.get_type(items[0])
    raise ValueError(f"metadata {key!r}: cannot infer a GGUF type for {value!r}; pass (value, GGUFValueType)")
