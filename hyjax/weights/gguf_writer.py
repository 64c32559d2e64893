"""A LLaMA model written as a GGUF file that llama.cpp, ollama and transformers' GGUF loader read.

The layout is llama.cpp's converter's (`convert_hf_to_gguf.py`, LlamaModel): `llama.*` hyperparameters,
the tokenizer as `tokenizer.*` metadata (`hyjax.tokenization.gguf_vocab`), tensor names from
`hyjax.weights.names` (which agree with gguf's tensor name map), `[d_out, d_in]` rows, and the query
and key rows permuted from the rotate-half rope layout to llama.cpp's interleaved one (the inverse of
what `gguf_reader` undoes). One-dimensional tensors (the norms) stay F32 whatever the file type, as in
llama.cpp, and matrices whose rows do not split into Q8_0's blocks of 32 are written F16 in a Q8_0 file,
as llama.cpp's converter does.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import gguf
import numpy as np

from hyjax.model.config import LlamaConfig
from hyjax.model.params import Params
from hyjax.model.rope import inverse_frequencies
from hyjax.tokenization.base import Tokenizer
from hyjax.tokenization.gguf_vocab import tokenizer_fields, write_tokenizer
from hyjax.weights.errors import CheckpointError
from hyjax.weights.names import export_tensors

Q = gguf.GGMLQuantizationType
# file type name -> (tensor type of the matrices, llama.cpp's general.file_type)
GGUF_FILE_TYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


def permute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's rotate-half rows -> llama.cpp's interleaved rows: per head, rows (half, pair) ->
    (pair, half). Inverse of `gguf_reader._unpermute_rows`."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_gguf(path: str | os.PathLike, config: LlamaConfig, params: Params, tokenizer: Tokenizer, *,
              file_type: str = "f16", name: str = "hyjax") -> pathlib.Path:
    """Writes `params` (a plain, merged parameter tree) and `tokenizer` as a LLaMA GGUF file.

    Args:
      path: the `.gguf` file; written under a temporary name and renamed, so a failed write leaves
        no partial file.
      file_type: one of `GGUF_FILE_TYPES`: the type of the matrices (norms and rope factors stay F32).
      name: `general.name`.
    """
    if file_type not in GGUF_FILE_TYPES:
        raise ValueError(f"GGUF file type {file_type!r} is not one of {sorted(GGUF_FILE_TYPES)}")
    matrix_type, llama_file_type = GGUF_FILE_TYPES[file_type]
    fields = tokenizer_fields(tokenizer, config.vocab_size)  # before any writing: refuses early

    def fill(writer: gguf.GGUFWriter) -> None:
        _write_hyperparameters(writer, config, name, llama_file_type)
        write_tokenizer(writer, fields)
        for tensor_name, array in export_tensors(config, params, "gguf").items():
            array = np.asarray(array, np.float32)
            if tensor_name.endswith("attn_q.weight"):
                array = permute_rope_rows(array, config.num_heads)
            elif tensor_name.endswith("attn_k.weight"):
                array = permute_rope_rows(array, config.num_kv_heads)
            _add_tensor(writer, tensor_name, array, matrix_type)
        if config.rope_scaling is not None:  # llama.cpp's LLaMA-3.1 scaling: per-frequency divisors
            base = inverse_frequencies(config.replace(rope_scaling=None))
            writer.add_tensor("rope_freqs.weight", np.asarray(base / inverse_frequencies(config), np.float32))

    return write_gguf_file(path, fill)


def write_gguf_file(path: str | os.PathLike, fill: Callable[[gguf.GGUFWriter], None]) -> pathlib.Path:
    """Writes a LLaMA-architecture GGUF file whose metadata and tensors `fill(writer)` adds, under a
    temporary name renamed at the end, so a failed write (a full disk) leaves no partial file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _add_tensor(writer: gguf.GGUFWriter, tensor_name: str, array: np.ndarray, matrix_type: Q) -> None:
    kind = matrix_type if array.ndim >= 2 else Q.F32
    if kind == Q.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        kind = Q.F16  # llama.cpp's converter falls back the same way
    if kind == Q.F32:
        writer.add_tensor(tensor_name, array)
    elif kind == Q.F16:
        writer.add_tensor(tensor_name, array.astype(np.float16))
    else:
        writer.add_tensor(tensor_name, gguf.quants.quantize(array, kind), raw_dtype=kind)


def _write_hyperparameters(writer: gguf.GGUFWriter, config: LlamaConfig, name: str, file_type: int) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.head_dim != config.hidden_size // config.num_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(int(file_type))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
