"""GGUF checkpoints (llama.cpp's format), dequantized to float with the `gguf` package.

llama.cpp's converter reorders the rows of the query and key projections from the rotate-half rope
layout of Hugging Face checkpoints to an interleaved one; `_unpermute_rows` undoes that, so a GGUF
model runs through the same model code as a safetensors one.
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any

import gguf
import numpy as np

from hyjax.weights.errors import CheckpointError
from hyjax.weights.names import assemble_params
from hyjax.model.config import LlamaConfig, RopeScaling, UnsupportedConfigError
from hyjax.model.params import Params
from hyjax.model.rope import inverse_frequencies

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# llama.* metadata keys we read or that do not change the computation; any other is refused.
_KNOWN_LLAMA_KEYS = {
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "vocab_size",
    "rope.dimension_count", "attention.key_length", "attention.value_length",
}
# Keys accepted only with the value that means "off".
_NEUTRAL_LLAMA_KEYS = {"expert_count": 0, "expert_used_count": 0, "rope.scaling.type": "none"}


def read_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Opens a GGUF file (memory-mapped), with clear errors for a missing or malformed file.

    Parsing the metadata of a large vocabulary takes seconds, so readers are cached per file (keyed on
    its path, size and modification time): loading a model's weights and its tokenizer parses it once.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _open_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_gguf(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OverflowError) as err:  # a cut file ends inside a field or tensor
        raise CheckpointError(
            f"cannot read GGUF file {path} ({err}); it may be truncated, or use a tensor type this "
            f"version of the gguf package does not know"
        ) from err


def gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values."""
    return {key: field.contents() for key, field in reader.fields.items()}


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the GGUF file at `path` (tokenizer vocabulary included)."""
    return gguf_metadata(read_gguf(path))


def load_gguf(path: str | os.PathLike, **config_overrides) -> tuple[LlamaConfig, Params]:
    """Reads a LLaMA-architecture GGUF file into `(config, params)`, dequantizing every tensor."""
    reader = read_gguf(path)
    metadata = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(metadata, tensors, **config_overrides)

    def read(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"tensor {name} is missing from {path}")
        array = dequantize(tensors[name], path)
        if name.endswith("attn_q.weight"):
            array = _unpermute_rows(array, config.num_heads)
        elif name.endswith("attn_k.weight"):
            array = _unpermute_rows(array, config.num_kv_heads)
        return array

    return config, assemble_params(config, read, "gguf")


def dequantize(tensor, path) -> np.ndarray:
    """A GGUF tensor as float32 numpy, in row-major `[d_out, d_in]` order."""
    try:
        qtype = Q(tensor.tensor_type)
    except ValueError:
        qtype = None
    if qtype not in SUPPORTED_TYPES:
        type_name = getattr(qtype, "name", str(int(tensor.tensor_type)))
        raise CheckpointError(
            f"tensor {tensor.name} in {path} has GGUF type {type_name}, which hyjax does not read; supported: "
            f"{[t.name for t in SUPPORTED_TYPES]}. Re-quantize the model to one of these (llama.cpp's "
            "llama-quantize) or load its Hugging Face safetensors instead"
        )
    array = gguf.quants.dequantize(tensor.data, qtype)
    return np.asarray(array, dtype=np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's rope row permutation: per head, rows (pair, half) -> (half, pair)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def config_from_gguf(metadata: dict[str, Any], tensors: dict, **overrides) -> LlamaConfig:
    """A LlamaConfig from `llama.*` metadata, refusing any setting we do not compute."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise UnsupportedConfigError(f"GGUF general.architecture={arch!r} is not supported; hyjax reads 'llama'")
    llama = {k[len("llama."):]: v for k, v in metadata.items() if k.startswith("llama.")}
    for key, neutral in _NEUTRAL_LLAMA_KEYS.items():
        if key in llama and llama.pop(key) != neutral:
            raise UnsupportedConfigError(f"GGUF metadata llama.{key} is set; hyjax does not support it")
    unknown = sorted(set(llama) - _KNOWN_LLAMA_KEYS)
    if unknown:
        raise UnsupportedConfigError(
            f"GGUF metadata {['llama.' + k for k in unknown]} is not supported by hyjax's LLaMA"
        )
    try:
        heads = int(llama["attention.head_count"])
        hidden = int(llama["embedding_length"])
        fields = dict(
            vocab_size=int(llama.get("vocab_size") or len(metadata["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(llama["feed_forward_length"]),
            num_layers=int(llama["block_count"]),
            num_heads=heads,
            num_kv_heads=int(llama.get("attention.head_count_kv", heads)),
            head_dim=int(llama.get("attention.key_length", hidden // heads)),
            rope_theta=float(llama.get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(llama["attention.layer_norm_rms_epsilon"]),
            max_position_embeddings=int(llama.get("context_length", 2048)),
            tie_embeddings="output.weight" not in tensors,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        )
    except KeyError as err:
        raise CheckpointError(f"GGUF metadata lacks {err.args[0]!r}, which a LLaMA model needs") from err
    value_length = llama.get("attention.value_length", fields["head_dim"])
    rope_dims = llama.get("rope.dimension_count", fields["head_dim"])
    if value_length != fields["head_dim"] or rope_dims != fields["head_dim"]:
        raise UnsupportedConfigError(
            f"GGUF key_length={fields['head_dim']}, value_length={value_length}, rope.dimension_count="
            f"{rope_dims} differ; hyjax needs them equal (full-width rotary embeddings)"
        )
    config = LlamaConfig(**fields).replace(**overrides)
    if "rope_freqs.weight" in tensors:
        config = config.replace(rope_scaling=_llama3_scaling_from_factors(config, tensors["rope_freqs.weight"]))
    return config


def _llama3_scaling_from_factors(config: LlamaConfig, tensor) -> RopeScaling:
    """llama.cpp stores LLaMA-3.1 rope scaling as per-frequency divisors; we accept them when they are
    exactly LLaMA-3.1's published scaling, and refuse any other."""
    factors = dequantize(tensor, "rope_freqs.weight")
    scaling = RopeScaling()
    base = inverse_frequencies(config.replace(rope_scaling=None))
    scaled = inverse_frequencies(config.replace(rope_scaling=scaling))
    if factors.shape != base.shape or not np.allclose(base / factors, scaled, rtol=1e-4):
        raise UnsupportedConfigError(
            "GGUF tensor rope_freqs.weight holds rope scaling factors other than LLaMA-3.1's "
            f"{scaling}; hyjax does not support them"
        )
    return scaling
