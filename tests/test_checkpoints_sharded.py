"""Sharded loading of base-model checkpoints: each shard read once, by region, equal to the whole load.

The checks on 8 devices need `XLA_FLAGS` set before jax starts, so they run in ONE subprocess (this
file run as a script, `_check_on_8_devices`), which prints its findings as JSON for the tests to assert on.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from gguf_writer import write_llama_gguf
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from hyjax import model as M
from hyjax.weights import (
    CheckpointError,
    load_checkpoint,
    load_checkpoint_sharded,
    load_gguf,
    load_hf_checkpoint,
    load_hf_sharded,
    load_orbax_sharded,
    save_hf_checkpoint,
    save_orbax_model,
    sharded,
)
from hyjax.weights.names import export_tensors, stored_names, stored_shape, tensor_names

TINY = M.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2)
KERNEL = P(None, "fsdp", "tensor")
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Leaf name -> spec on the ("data", "fsdp", "tensor") mesh: as training lays parameters out (q_proj fully
# sharded over all 8 devices, layers included), and another layout to restore into.
TRAIN = dict(embed=P("tensor", "fsdp"), lm_head=P("fsdp", "tensor"), final_norm=P(), attn_norm=P(None, "fsdp"),
             mlp_norm=P(None, "fsdp"), **{k: KERNEL for k in KERNELS[1:]}, q_proj=P("data", "fsdp", "tensor"))
OTHER = dict(embed=P(("data", "fsdp"), "tensor"), lm_head=P(None, ("fsdp", "tensor")), final_norm=P("fsdp"),
             attn_norm=P(), mlp_norm=P("data", "tensor"), **{k: P("data", "tensor", "fsdp") for k in KERNELS})


def _layout(mesh, specs):
    """A `shardings` callable: config -> NamedSharding per parameter, by leaf name."""
    return lambda config: jax.tree_util.tree_map_with_path(
        lambda path, _: jax.sharding.NamedSharding(mesh, specs[path[-1].key]), M.abstract_params(config))


def _one_device(config):
    return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), M.abstract_params(config))


def _leaves(tree) -> dict[str, object]:
    return {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_equal(got, want):
    assert set(_leaves(got)) == set(_leaves(want))
    for leaf, value in _leaves(got).items():
        assert value.dtype == _leaves(want)[leaf].dtype, leaf
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_leaves(want)[leaf]), err_msg=leaf)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    """`hf/` (safetensors) and `m.gguf` of TINY with random values everywhere (norms included)."""
    folder = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), M.abstract_params(TINY))
    save_hf_checkpoint(folder / "hf", TINY, params)
    write_llama_gguf(folder / "m.gguf", export_tensors(TINY, params), TINY.to_hf_dict())
    return folder


@pytest.fixture(scope="module")
def on_8_devices(folder) -> dict:
    """What `_check_on_8_devices` found (it also writes `orbax/`, saved from arrays sharded on 8 devices)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_on_8_devices(folder: pathlib.Path) -> dict:
    """Loads every kind of checkpoint onto a (data 2, fsdp 2, tensor 2) mesh and reports, per leaf,
    `[bitwise equal to the whole load, same dtype, laid out as asked]` and what was read."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    train, other = _layout(mesh, TRAIN), _layout(mesh, OTHER)
    config, reference = load_hf_checkpoint(folder / "hf")

    def compare(got, want, shardings):
        asked = _leaves(shardings(config))
        return {leaf: [bool(np.array_equal(np.asarray(value), np.asarray(_leaves(want)[leaf]))),
                       str(value.dtype) == str(_leaves(want)[leaf].dtype), value.sharding == asked[leaf]]
                for leaf, value in _leaves(got).items()}

    regions: dict[str, list[int]] = {}  # stored tensor name -> elements of each region read
    read_region = sharded._read_region

    def counting(tensor_name, source, region):
        array = read_region(tensor_name, source, region)
        regions.setdefault(tensor_name, []).append(int(array.size))
        return array

    sharded._read_region = counting
    results = {}
    _, params = load_checkpoint_sharded(folder / "hf", train)
    results["hf"] = compare(params, reference, train)
    results["reads"] = _reads(config, train(config), regions)
    _, bf16 = load_hf_sharded(folder / "hf", other, param_dtype="bfloat16")
    results["hf_bf16"] = compare(bf16, load_hf_checkpoint(folder / "hf", param_dtype="bfloat16")[1], other)

    save_orbax_model(folder / "orbax", config, params)
    results["orbax"] = compare(load_orbax_sharded(folder / "orbax", other)[1], reference, other)
    results["orbax_bf16"] = compare(load_checkpoint_sharded(folder / "orbax", train, param_dtype="bfloat16")[1],
                                    jax.tree.map(lambda a: a.astype("bfloat16"), reference), train)
    results["gguf"] = compare(load_checkpoint_sharded(folder / "m.gguf", train)[1],
                              load_gguf(folder / "m.gguf")[1], train)
    return results


def _reads(config, shardings, regions) -> dict[str, dict]:
    """Per leaf: elements read in all, in its distinct shards, in the largest single read, and in one
    stored tensor (a layer's, for per-layer parameters); and whether it is replicated."""
    abstract = M.abstract_params(config)
    out = {}
    for name in tensor_names(config):
        shape = functools.reduce(operator.getitem, name.path, abstract).shape
        sharding = functools.reduce(operator.getitem, name.path, shardings)
        distinct = {tuple(s.indices(n) for s, n in zip(index, shape))
                    for index in sharding.devices_indices_map(shape).values()}
        sizes = [n for tensor in stored_names(config, name, "hf") for n in regions.get(tensor, [])]
        out["/".join(name.path)] = dict(
            read=sum(sizes), distinct=sum(math.prod(len(range(*b)) for b in bounds) for bounds in distinct),
            largest=max(sizes), tensor=math.prod(stored_shape(name, shape)), full=math.prod(shape),
            replicated=sharding.is_fully_replicated)
    return out


def _failures(found: dict) -> dict:
    """The leaves of a comparison that fail one of [equal, same dtype, laid out as asked]."""
    return {leaf: checks for leaf, checks in found.items() if not all(checks)}


# ------------------------------------------------------------------------------------ on 8 devices


@pytest.mark.parametrize("load", ["hf", "hf_bf16", "orbax", "orbax_bf16", "gguf"])
def test_sharded_loads_equal_whole_loads(on_8_devices, load):
    """Every parameter equals (bitwise, same dtype) what the whole-model loader gives, laid out as asked."""
    assert len(on_8_devices[load]) == len(tensor_names(TINY))
    assert _failures(on_8_devices[load]) == {}


def test_each_shard_is_read_once_by_region(on_8_devices):
    reads = on_8_devices["reads"]
    for leaf, found in reads.items():
        assert found["read"] == found["distinct"], (leaf, found)  # devices sharing a shard share its read
        if not found["replicated"]:
            assert found["largest"] < found["tensor"], (leaf, found)  # never a whole tensor in one piece
    q = reads["layers/attn/q_proj"]  # sharded over all 8 devices: read once in all, an eighth at a time
    assert q["read"] == q["full"] and q["largest"] == q["full"] // 8
    assert reads["final_norm"]["read"] == reads["final_norm"]["full"]  # replicated on 8: read once


def test_load_checkpoint_reads_an_orbax_model_folder(folder, on_8_devices):
    """A folder saved from arrays sharded on 8 devices loads whole on this process's one device."""
    config, params = load_checkpoint(folder / "orbax")
    assert config == TINY
    _assert_equal(params, load_hf_checkpoint(folder / "hf")[1])


# ------------------------------------------------------------------------------------ on one device


def test_orbax_round_trip_on_one_device(folder, tmp_path):
    config, params = load_hf_checkpoint(folder / "hf")
    save_orbax_model(tmp_path / "model", config, params)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "params"]
    loaded_config, loaded = load_orbax_sharded(tmp_path / "model", _one_device)
    assert loaded_config == config
    _assert_equal(loaded, params)


def test_wrong_shape_names_the_tensor(folder, tmp_path):
    shutil.copytree(folder / "hf", tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, "intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj\.weight has shape \(32, 64\).*\(32, 48\)"):
        load_hf_sharded(tmp_path / "hf", _one_device)


def test_missing_tensor_is_named(folder, tmp_path):
    shutil.copytree(folder / "hf", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.post_attention_layernorm\.weight is missing"):
        load_hf_sharded(tmp_path / "hf", _one_device)


def test_orbax_shape_mismatch_names_the_parameter(folder, tmp_path):
    config, params = load_hf_checkpoint(folder / "hf")
    save_orbax_model(tmp_path / "model", config.replace(intermediate_size=48), params)
    with pytest.raises(CheckpointError, match=r"layers/mlp/down_proj has shape \(2, 64, 32\).*\(2, 48, 32\)"):
        load_checkpoint_sharded(tmp_path / "model", _one_device)


def test_shardings_of_another_structure_are_refused(folder):
    with pytest.raises(ValueError, match="structure of abstract_params"):
        load_hf_sharded(folder / "hf", lambda config: {"embed": jax.sharding.SingleDeviceSharding(jax.devices()[0])})


if __name__ == "__main__":
    print(json.dumps(_check_on_8_devices(pathlib.Path(sys.argv[1]))))
