"""Where each of our parameters lives in Hugging Face and GGUF checkpoints, and how to assemble them.

Our kernels are `[d_in, d_out]`; both Hugging Face and GGUF store `[d_out, d_in]`, so kernels are
transposed on the way in and out. Per-layer tensors are stacked on a leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from hyjax.checkpoints.errors import CheckpointError
from hyjax.model.config import LlamaConfig
from hyjax.model.params import Params, abstract_params


@dataclasses.dataclass(frozen=True)
class TensorName:
    path: tuple[str, ...]  # our path in the parameter dict
    hf: str                # Hugging Face name ("{i}" is the layer index)
    gguf: str              # GGUF name ("{i}" is the layer index)
    is_kernel: bool        # stored transposed

    @property
    def per_layer(self) -> bool:
        return self.path[0] == "layers"


TENSOR_NAMES = (
    TensorName(("embed",), "model.embed_tokens.weight", "token_embd.weight", False),
    TensorName(("layers", "attn_norm"), "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", False),
    TensorName(("layers", "attn", "q_proj"), "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", True),
    TensorName(("layers", "attn", "k_proj"), "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", True),
    TensorName(("layers", "attn", "v_proj"), "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", True),
    TensorName(("layers", "attn", "o_proj"), "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", True),
    TensorName(("layers", "mlp_norm"), "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", False),
    TensorName(("layers", "mlp", "gate_proj"), "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", True),
    TensorName(("layers", "mlp", "up_proj"), "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", True),
    TensorName(("layers", "mlp", "down_proj"), "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", True),
    TensorName(("final_norm",), "model.norm.weight", "output_norm.weight", False),
    TensorName(("lm_head",), "lm_head.weight", "output.weight", True),
)


def tensor_names(config: LlamaConfig) -> tuple[TensorName, ...]:
    """The tensors a model with this config has (no `lm_head` when embeddings are tied)."""
    return tuple(n for n in TENSOR_NAMES if not (config.tie_embeddings and n.path == ("lm_head",)))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def assemble_params(config: LlamaConfig, read: Callable[[str], np.ndarray], fmt: str) -> Params:
    """Builds our parameter dict from a checkpoint, calling `read(name)` for each `fmt` ('hf' or 'gguf')
    tensor name; checks every shape against the config and casts to `config.param_dtype`."""
    expected = abstract_params(config)
    params: Params = {}
    for name in tensor_names(config):
        template = getattr(name, fmt)
        want = _get(expected, name.path)
        layers = range(config.num_layers) if name.per_layer else [None]
        pieces = []
        for i in layers:
            tensor_name = template.format(i=i)
            array = read(tensor_name)
            if name.is_kernel:
                array = array.T
            want_shape = want.shape[1:] if name.per_layer else want.shape
            if tuple(array.shape) != tuple(want_shape):
                stored = tuple(reversed(array.shape)) if name.is_kernel else tuple(array.shape)
                raise CheckpointError(
                    f"tensor {tensor_name} has shape {stored} but the config implies "
                    f"{tuple(reversed(want_shape)) if name.is_kernel else tuple(want_shape)}; "
                    "the checkpoint and its config do not belong together"
                )
            pieces.append(np.asarray(array, dtype=config.jnp_param_dtype))
        value = np.stack(pieces) if name.per_layer else pieces[0]
        _set(params, name.path, jnp.asarray(value))
    return params


def export_tensors(config: LlamaConfig, params: Params, fmt: str = "hf") -> dict[str, np.ndarray]:
    """Our parameter dict as checkpoint tensors (`fmt` names, `[d_out, d_in]` kernels, one per layer)."""
    out = {}
    for name in tensor_names(config):
        value = np.asarray(_get(params, name.path))
        template = getattr(name, fmt)
        if name.per_layer:
            for i in range(config.num_layers):
                out[template.format(i=i)] = np.ascontiguousarray(value[i].T if name.is_kernel else value[i])
        else:
            out[template] = np.ascontiguousarray(value.T if name.is_kernel else value)
    return out
