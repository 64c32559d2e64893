"""Where each of our parameters lives in Hugging Face and GGUF checkpoints, and how to assemble them.

Our kernels are `[d_in, d_out]`; both Hugging Face and GGUF store `[d_out, d_in]`, so kernels are
transposed on the way in and out. Per-layer tensors are stacked on a leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

from hyjax.weights.errors import CheckpointError
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


def stored_names(config: LlamaConfig, name: TensorName, fmt: str) -> list[str]:
    """The `fmt` ('hf' or 'gguf') names of the checkpoint tensors parameter `name` is stacked from: one
    per layer for per-layer parameters, else one."""
    template = getattr(name, fmt)
    return [template.format(i=i) for i in range(config.num_layers)] if name.per_layer else [template]


def stored_shape(name: TensorName, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a checkpoint stores for parameter `name` of our `shape` (per layer: `[d_out, d_in]`
    for kernels, which we hold as `[layers, d_in, d_out]`)."""
    shape = tuple(shape[1:] if name.per_layer else shape)
    return tuple(reversed(shape)) if name.is_kernel else shape


def check_shape(tensor_name: str, stored: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Raises CheckpointError when checkpoint tensor `tensor_name` is stored with another shape than the
    config implies (both in the checkpoint's layout)."""
    if tuple(stored) != tuple(expected):
        raise CheckpointError(
            f"tensor {tensor_name} has shape {tuple(stored)} but the config implies {tuple(expected)}; "
            "the checkpoint and its config do not belong together"
        )


# safetensors dtypes of weights we read (cast to param_dtype); integers and booleans are not weights.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_dtype(tensor_name: str, stored: str) -> None:
    """Raises CheckpointError when checkpoint tensor `tensor_name` is not stored as floating point."""
    if stored not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {tensor_name} is stored as {stored}, not as floating point "
                              f"({', '.join(FLOAT_DTYPES)}); the checkpoint is corrupt or holds no model weights")


def assemble_params(config: LlamaConfig, read: Callable[[str], np.ndarray], fmt: str) -> Params:
    """Builds our parameter dict from a checkpoint, calling `read(name)` for each `fmt` ('hf' or 'gguf')
    tensor name; checks every shape against the config and casts to `config.param_dtype`."""
    expected = abstract_params(config)
    params: Params = {}
    for name in tensor_names(config):
        want = stored_shape(name, _get(expected, name.path).shape)
        pieces = []
        for tensor_name in stored_names(config, name, fmt):
            array = read(tensor_name)
            check_shape(tensor_name, array.shape, want)
            if not jnp.issubdtype(array.dtype, jnp.floating):
                check_dtype(tensor_name, str(array.dtype))
            pieces.append(np.asarray(array.T if name.is_kernel else array, dtype=config.jnp_param_dtype))
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
