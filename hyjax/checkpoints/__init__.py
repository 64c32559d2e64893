"""Reading and writing model checkpoints: GGUF and Hugging Face safetensors folders."""

from __future__ import annotations

import os
import pathlib

from hyjax.checkpoints.errors import CheckpointError
from hyjax.checkpoints.gguf_reader import load_gguf
from hyjax.checkpoints.hf import load_hf_checkpoint, save_hf_checkpoint
from hyjax.model.config import LlamaConfig
from hyjax.model.params import Params


def load_checkpoint(path: str | os.PathLike, **config_overrides) -> tuple[LlamaConfig, Params]:
    """`(config, params)` from a `.gguf` file or a Hugging Face folder (config.json + safetensors)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .gguf file or a folder)")
    if path.is_dir():
        return load_hf_checkpoint(path, **config_overrides)
    if path.suffix == ".gguf":
        return load_gguf(path, **config_overrides)
    raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face checkpoint folder")


__all__ = ["CheckpointError", "load_checkpoint", "load_gguf", "load_hf_checkpoint", "save_hf_checkpoint"]
