"""The LLaMA-family model: config, presets, the Flax NNX module and its functional API."""

from hyjax.model.config import LlamaConfig, RopeScaling, UnsupportedConfigError
from hyjax.model.llama import KVCache, Llama
from hyjax.model.params import (
    abstract_params,
    apply,
    count_params,
    decode,
    graphdef,
    init_params,
    logical_axes,
)
from hyjax.model.presets import PRESETS, preset

__all__ = [
    "KVCache", "Llama", "LlamaConfig", "PRESETS", "RopeScaling", "UnsupportedConfigError", "abstract_params",
    "apply", "count_params", "decode", "graphdef", "init_params", "logical_axes", "preset",
]
