"""Hugging Face checkpoint folders: `config.json` plus one or many `*.safetensors` (with an index).

Tensors are read lazily, one at a time, with `safetensors.safe_open`, so a sharded checkpoint is never
held twice in host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from hyjax.weights.errors import CheckpointError
from hyjax.weights.names import assemble_params, export_tensors
from hyjax.model.config import LlamaConfig
from hyjax.model.params import Params

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _tensor_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Maps every tensor name to the safetensors file that holds it."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r})") from err
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        present = sorted(p.name for p in folder.iterdir())
        hint = " (PyTorch .bin files are not read: convert them to safetensors)" if any(
            p.endswith(".bin") for p in present) else ""
        raise CheckpointError(f"no *.safetensors file in {folder}{hint}; the folder holds {present[:12]}")
    mapping = {}
    for file in files:
        with _open(file) as handle:
            mapping.update({name: file for name in handle.keys()})
    return mapping


@contextlib.contextmanager
def _open(file: pathlib.Path):
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (named by {INDEX_NAME}); re-download the checkpoint")
    try:
        with safe_open(str(file), framework="numpy") as handle:
            yield handle
    except SafetensorError as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated or corrupt: re-download it"
        ) from err


class TensorSlices:
    """The tensors of a Hugging Face folder as lazy safetensors slices (`slices(name)[region]` reads only
    that region); each file is opened once, and closed with the `contextlib.ExitStack` given."""

    def __init__(self, folder: pathlib.Path, stack: contextlib.ExitStack):
        self.folder, self.stack = folder, stack
        self.files = _tensor_files(folder)
        self.handles: dict[pathlib.Path, object] = {}

    def __call__(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(_open(file))
        try:
            return self.handles[file].get_slice(name)
        except SafetensorError as err:
            raise CheckpointError(f"cannot read tensor {name} from {file} ({err}); re-download it") from err


def load_hf_checkpoint(folder: str | os.PathLike, **config_overrides) -> tuple[LlamaConfig, Params]:
    """Reads a Hugging Face LLaMA folder into `(config, params)`.

    `config_overrides` replace config fields (e.g. `param_dtype="bfloat16"`, `remat="dots"`).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = LlamaConfig.from_hf_json(folder, **config_overrides)
    with contextlib.ExitStack() as stack:
        slices = TensorSlices(folder, stack)
        params = assemble_params(config, lambda name: slices(name)[:], "hf")
    return config, params


def save_hf_checkpoint(folder: str | os.PathLike, config: LlamaConfig, params: Params, tokenizer=None,
                       max_shard_bytes: int = 2 * 1024**3) -> pathlib.Path:
    """Writes `params` as a Hugging Face LLaMA folder that transformers' `from_pretrained` loads.

    Shards above `max_shard_bytes` go into several files with a `model.safetensors.index.json`. Each
    file is written under a temporary name and renamed, so an interrupted save leaves no half file.
    `tokenizer` (a `hyjax.tokenization.Tokenizer`) is saved beside the weights when given.
    """
    folder = pathlib.Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create output folder {folder}: {err}") from err
    tensors = export_tensors(config, params, "hf")
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": {t: n for n, shard in zip(names, shards) for t in shard}}
        _atomic_write(folder / INDEX_NAME, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic_write(folder / "config.json",
                  lambda tmp: pathlib.Path(tmp).write_text(json.dumps(config.to_hf_dict(), indent=2)))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.to_hf_dict()["eos_token_id"]}
    _atomic_write(folder / "generation_config.json",
                  lambda tmp: pathlib.Path(tmp).write_text(json.dumps(generation, indent=2)))
    if tokenizer is not None:
        tokenizer.save_hf(folder)
    return folder


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {path}: {err}") from err
