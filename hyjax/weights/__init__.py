"""Reading and writing model weights: GGUF, Hugging Face safetensors folders and Orbax model folders."""

from __future__ import annotations

import os
import pathlib

import jax

from hyjax.weights.errors import CheckpointError
from hyjax.weights.gguf_reader import load_gguf
from hyjax.weights.gguf_writer import GGUF_FILE_TYPES, save_gguf
from hyjax.weights.hf import load_hf_checkpoint, save_hf_checkpoint
from hyjax.weights.sharded import (
    is_orbax_model,
    load_checkpoint_sharded,
    load_hf_sharded,
    load_orbax_sharded,
    save_orbax_model,
)
from hyjax.model.config import LlamaConfig
from hyjax.model.params import Params, abstract_params


def load_checkpoint(path: str | os.PathLike, **config_overrides) -> tuple[LlamaConfig, Params]:
    """`(config, params)` from a `.gguf` file, a Hugging Face folder (config.json + safetensors) or an
    Orbax model folder (config.json + params/), every array whole on the default device."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .gguf file or a folder)")
    if is_orbax_model(path):
        return load_orbax_sharded(path, _on_default_device, **config_overrides)
    if path.is_dir():
        return load_hf_checkpoint(path, **config_overrides)
    if path.suffix == ".gguf":
        return load_gguf(path, **config_overrides)
    raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face or Orbax model folder")


def _on_default_device(config: LlamaConfig) -> Params:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device, abstract_params(config))


__all__ = ["CheckpointError", "GGUF_FILE_TYPES", "load_checkpoint", "load_checkpoint_sharded", "load_gguf",
           "load_hf_checkpoint", "load_hf_sharded", "load_orbax_sharded", "save_gguf", "save_hf_checkpoint",
           "save_orbax_model"]
