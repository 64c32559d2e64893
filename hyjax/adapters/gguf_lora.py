"""A LoRA adapter as a GGUF LoRA file: what llama.cpp's `--lora` (and ollama's ADAPTER) load on the base
model's GGUF.

The layout is llama.cpp's `convert_lora_to_gguf.py`'s, as the `gguf` package defines it: metadata
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted projection
two tensors named from gguf's tensor name map with `.lora_a` / `.lora_b` after the weight's name:

    blk.N.attn_q.weight.lora_a = A^T [r, d_in]      blk.N.attn_q.weight.lora_b = B^T [d_out, r]

llama.cpp adds `(alpha / r) * lora_b @ lora_a` to the weight it holds in its own row order, so for the
query and key projections lora_b's rows get the same rope permutation the base weights got in the model
file (`gguf_writer.permute_rope_rows`). Only plain LoRA fits: the file adds a low-rank term to the
*original* base weights, so LoRA-GA (whose base carries an offset), the hybrids and the other methods
export merged (`hyjax.weights.save_gguf` of `merge(adapted)`).
"""

from __future__ import annotations

import os
import pathlib

import gguf
import numpy as np

from hyjax.adapters.node import peft_unsupported
from hyjax.adapters.peft_io import _modules, _peft_method
from hyjax.model.config import LlamaConfig
from hyjax.weights.gguf_writer import permute_rope_rows, write_gguf_file


def export_gguf_lora(path: str | os.PathLike, config: LlamaConfig, adapted_params: dict, *,
                     name: str = "hyjax-lora") -> pathlib.Path:
    """Writes the LoRA adapters of `adapted_params` as a GGUF LoRA file for the base model's GGUF.

    Raises (pointing to the merged export) for trees that are not plain LoRA on projections with one
    rank and alpha. The file is written under a temporary name and renamed.
    """
    method, nodes, settings = _peft_method(config, adapted_params)
    if method != "LORA" or any(node.PEFT_SAVED_WHOLE for node in nodes.values()):
        kinds = sorted({type(node).__name__ for node in nodes.values()})
        raise peft_unsupported(f"a GGUF LoRA file holds plain LoRA only, and this tree has {', '.join(kinds)}")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    heads = {"self_attn.q_proj": config.num_heads, "self_attn.k_proj": config.num_kv_heads}
    tensors = {}
    for path_in_tree, node in nodes.items():
        template, per_layer = _modules(config)[path_in_tree]
        for i, values in enumerate(node.peft_layers(config.num_layers if per_layer else None)):
            module = template.format(i=i)
            weight = f"{name_map.get_name(module)}.weight"
            lora_b = np.asarray(values["lora_B.weight"], np.float32)
            for suffix, count in heads.items():
                if module.endswith(suffix):
                    lora_b = permute_rope_rows(lora_b, count)
            tensors[f"{weight}.lora_a"] = np.ascontiguousarray(values["lora_A.weight"], np.float32)
            tensors[f"{weight}.lora_b"] = np.ascontiguousarray(lora_b)
    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings["lora_alpha"]))
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)

    return write_gguf_file(path, fill)
