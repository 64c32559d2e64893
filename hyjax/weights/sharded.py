"""Base-model checkpoints read straight into sharded global `jax.Array`s.

Every parameter is built with `jax.make_array_from_callback`: for each shard the process's devices
hold, the callback reads only that shard's region of the checkpoint (Hugging Face safetensors by slice,
Orbax checkpoints through tensorstore), so no process reads or holds the whole model. Devices holding
the same (replicated) shard share one read.

An *Orbax model folder* is a Hugging Face `config.json` beside `params/`, an Orbax checkpoint of our
parameter dict; `save_orbax_model` writes one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import SafetensorError

from hyjax.weights.errors import CheckpointError
from hyjax.weights.gguf_reader import load_gguf
from hyjax.weights.hf import TensorSlices, _atomic_write
from hyjax.weights.names import (
    TensorName,
    check_dtype,
    check_shape,
    stored_names,
    stored_shape,
    tensor_names,
)
from hyjax.model.config import LlamaConfig
from hyjax.model.params import Params, abstract_params

# config -> pytree of `jax.sharding.Sharding` with the structure of `abstract_params(config)`.
Shardings = Callable[[LlamaConfig], Any]

PARAMS_DIR = "params"


def is_orbax_model(path: str | os.PathLike) -> bool:
    """Whether `path` is an Orbax model folder (`config.json` and a `params/` subfolder)."""
    path = pathlib.Path(path)
    return (path / "config.json").is_file() and (path / PARAMS_DIR).is_dir()


def load_checkpoint_sharded(path: str | os.PathLike, shardings: Shardings,
                            **config_overrides) -> tuple[LlamaConfig, Params]:
    """`(config, params)` with every parameter a global array laid out as `shardings(config)` says.

    `path` is an Orbax model folder, a Hugging Face folder (config.json + safetensors) or a `.gguf`
    file. The first two are read slice by slice, each process reading only what its devices hold. A
    GGUF file is a single quantized file, small next to the float model it encodes: it is dequantized
    whole in host memory (every process) and then sliced onto the devices.
    `config_overrides` replace config fields (e.g. `param_dtype="bfloat16"`).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected a .gguf file or a folder)")
    if path.is_dir():
        if is_orbax_model(path):
            return load_orbax_sharded(path, shardings, **config_overrides)
        return load_hf_sharded(path, shardings, **config_overrides)
    if path.suffix == ".gguf":
        return _load_gguf_sharded(path, shardings, **config_overrides)
    raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face or Orbax model folder")


# ------------------------------------------------------------------------------------ Hugging Face


def load_hf_sharded(folder: str | os.PathLike, shardings: Shardings,
                    **config_overrides) -> tuple[LlamaConfig, Params]:
    """Reads a Hugging Face LLaMA folder into global arrays sharded as `shardings(config)`.

    Each shard is read with `safe_open(...).get_slice(name)[region]`, one layer at a time, and cast to
    `config.param_dtype`; shapes are checked against the config (from the file headers) before any
    tensor data is read.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    config = LlamaConfig.from_hf_json(folder, **config_overrides)
    abstract, leaf_shardings = _abstract_and_shardings(config, shardings)
    by_path = {name.path: name for name in tensor_names(config)}
    with contextlib.ExitStack() as stack:
        open_slice = TensorSlices(folder, stack)

        def build(path, want: jax.ShapeDtypeStruct, sharding) -> jax.Array:
            name = by_path[tuple(key.key for key in path)]
            sources = [(t, open_slice(t)) for t in stored_names(config, name, "hf")]
            expected = stored_shape(name, want.shape)
            for tensor_name, source in sources:
                check_shape(tensor_name, tuple(source.get_shape()), expected)
                check_dtype(tensor_name, source.get_dtype())
            return _array_from_regions(name, want.shape, sharding, config.jnp_param_dtype,
                                       lambda i, region: _read_region(*sources[i], region))

        params = jax.tree_util.tree_map_with_path(build, abstract, leaf_shardings)
    return config, params


def _read_region(tensor_name: str, source, region: tuple[slice, ...]) -> np.ndarray:
    """`region` (in the checkpoint's layout) of one safetensors tensor; the only place data is read."""
    try:
        return source[region]
    except SafetensorError as err:
        raise CheckpointError(f"cannot read tensor {tensor_name} ({err}); the file may be corrupt: "
                              "re-download it") from err


def _array_from_regions(name: TensorName, shape: tuple[int, ...], sharding, dtype,
                        read: Callable[[int, tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """Parameter `name` as a global array; `read(i, region)` gives `region` of the i-th stored tensor
    (its layer i, or the one tensor), in the checkpoint's layout (kernels `[d_out, d_in]`)."""
    shards: dict[tuple, np.ndarray] = {}  # one read per distinct shard, however many devices hold it

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n) for s, n in zip(index, shape))
        if bounds not in shards:
            index = tuple(slice(*b) for b in bounds)
            within = index[1:] if name.per_layer else index  # the region of one stored tensor, ours
            region = tuple(reversed(within)) if name.is_kernel else within
            if name.per_layer:  # [layers in the shard, *region]
                value = np.stack([read(i, region) for i in range(*bounds[0])])
            else:
                value = read(0, region)
            value = np.swapaxes(value, -1, -2) if name.is_kernel else value  # kernels as ours, [.., d_in, d_out]
            shards[bounds] = np.asarray(value, dtype=dtype)
        return shards[bounds]

    return jax.make_array_from_callback(shape, sharding, shard, dtype=dtype)


# ------------------------------------------------------------------------------------ Orbax


def save_orbax_model(folder: str | os.PathLike, config: LlamaConfig, params: Params) -> pathlib.Path:
    """Writes an Orbax model folder: `config.json` (Hugging Face's) and `params/` (an Orbax checkpoint).

    Works with sharded global arrays (every process writes its shards; call it on all processes) and
    with host arrays. Orbax writes `params/` under a temporary name and renames it when complete;
    an existing `params/` is replaced. `config.json` is written last, by process 0.
    """
    folder = pathlib.Path(folder).absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create output folder {folder}: {err}") from err
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(folder / PARAMS_DIR, params, force=True)
    if jax.process_index() == 0:
        _atomic_write(folder / "config.json",
                      lambda tmp: pathlib.Path(tmp).write_text(json.dumps(config.to_hf_dict(), indent=2)))
    return folder


def load_orbax_sharded(folder: str | os.PathLike, shardings: Shardings,
                       **config_overrides) -> tuple[LlamaConfig, Params]:
    """Restores an Orbax model folder into global arrays sharded as `shardings(config)`, cast to
    `config.param_dtype`; tensorstore reads only the slices this process's devices hold."""
    folder = pathlib.Path(folder).absolute()
    if not is_orbax_model(folder):
        raise CheckpointError(f"{folder} is not an Orbax model folder (config.json and {PARAMS_DIR}/); "
                              "write one with save_orbax_model")
    config = LlamaConfig.from_hf_json(folder, **config_overrides)
    abstract, leaf_shardings = _abstract_and_shardings(config, shardings)
    targets = jax.tree.map(lambda want, sharding: jax.ShapeDtypeStruct(want.shape, config.jnp_param_dtype,
                                                                       sharding=sharding),
                           abstract, leaf_shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(folder / PARAMS_DIR).item_metadata.tree
        _check_orbax_shapes(folder, abstract, stored)
        params = checkpointer.restore(folder / PARAMS_DIR, targets)
    return config, params


def _check_orbax_shapes(folder: pathlib.Path, abstract: Params, stored) -> None:
    want = _shapes_by_name(abstract)
    have = _shapes_by_name(stored)
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"parameter {name} is missing from the Orbax checkpoint in {folder}")
        if have[name] != shape:
            raise CheckpointError(
                f"parameter {name} has shape {have[name]} in {folder} but the config implies {shape}; "
                "the checkpoint and its config do not belong together")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"the Orbax checkpoint in {folder} holds parameters {extra} that its config "
                              "does not have (tie_word_embeddings?); the checkpoint and its config do not "
                              "belong together")


def _shapes_by_name(tree) -> dict[str, tuple[int, ...]]:
    """`{"layers/attn/q_proj": shape, ...}` of a tree of arrays or array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(key.key) for key in path): tuple(leaf.shape) for path, leaf in leaves}


# ------------------------------------------------------------------------------------ GGUF


def _load_gguf_sharded(path: pathlib.Path, shardings: Shardings, **config_overrides) -> tuple[LlamaConfig, Params]:
    with jax.default_device(_host_device()):
        config, host = load_gguf(path, **config_overrides)
    _, leaf_shardings = _abstract_and_shardings(config, shardings)

    def place(value: jax.Array, sharding) -> jax.Array:
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index], dtype=value.dtype)

    return config, jax.tree.map(place, host, leaf_shardings)


def _host_device():
    """This process's CPU device, so a whole dequantized model never lands on one accelerator (None,
    i.e. the default device, when the CPU backend is disabled)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


# ------------------------------------------------------------------------------------ shared


def _abstract_and_shardings(config: LlamaConfig, shardings: Shardings) -> tuple[Params, Params]:
    abstract = abstract_params(config)
    tree = shardings(config)
    if jax.tree.structure(tree) != jax.tree.structure(abstract):
        raise ValueError(
            "shardings(config) must give one jax.sharding.Sharding per parameter, with the structure of "
            f"abstract_params(config): {jax.tree.structure(abstract)}; got {jax.tree.structure(tree)}")
    return abstract, tree
