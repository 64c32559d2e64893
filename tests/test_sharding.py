"""The mesh, the rules table and the logical axes of every array of a run (one device: shapes and
specs only), and one training step on 8 fake CPU devices under several meshes against one device."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from hyjax import adapters
from hyjax.adapters.lora import LoRAConfig
from hyjax.config import ConfigError, load_config
from hyjax.model import LlamaConfig, abstract_params
from hyjax.adapters.axes import adapted_axes, base_axes
from hyjax.sharding import Axes, Layout, Rules, ShardingError, optimizer_state_axes, resolve_shape

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def test_rules_map_names_to_mesh_axes_once_per_array():
    rules = Rules()
    assert rules.spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")
    assert rules.spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)  # fsdp already used
    assert rules.spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert rules.override([("vocab", [])]).spec(("vocab", "embed")) == P(None, "fsdp")


@pytest.mark.parametrize("entries, message", [
    ([("embd", ["fsdp"])], "did you mean 'embed'"),
    ([("embed", ["model"])], "'model', which is not a mesh axis"),
])
def test_rules_overrides_are_checked(entries, message):
    with pytest.raises(ShardingError, match=message):
        Rules().override(entries)


def test_mesh_section_rejects_bad_rules_before_anything_runs():
    with pytest.raises(ConfigError, match="mesh.rules.*did you mean 'heads'"):
        load_config(None, ["mesh.rules=[[headz, [tensor]]]"])
    with pytest.raises(ConfigError, match="at most one may be -1"):
        load_config(None, ["mesh.fsdp=-1"])


@pytest.mark.parametrize("sizes, devices, expected", [
    (dict(data=-1, fsdp=2, tensor=2), 8, dict(data=2, fsdp=2, tensor=2)),
    (dict(data=1, fsdp=-1, tensor=1), 512, dict(data=1, fsdp=512, tensor=1)),
])
def test_resolve_shape_fills_the_free_axis(sizes, devices, expected):
    assert resolve_shape(sizes, devices) == expected


@pytest.mark.parametrize("sizes, devices, message", [
    (dict(data=-1, fsdp=3, tensor=1), 8, "do not divide the 8 devices"),
    (dict(data=2, fsdp=2, tensor=1), 8, "make 4 devices, but the run has 8"),
])
def test_resolve_shape_errors(sizes, devices, message):
    with pytest.raises(ShardingError, match=message):
        resolve_shape(sizes, devices)


def _lora_tree():
    spec = adapters.AdapterSpec.for_method(LoRAConfig(rank=4))
    return jax.eval_shape(lambda p: adapters.apply(spec, p, jax.random.key(0)), abstract_params(TINY))


def test_adapter_parameters_take_the_axes_of_the_weight_they_adapt():
    axes = adapted_axes(_lora_tree(), base_axes(TINY))
    q_proj = axes["layers"]["attn"]["q_proj"]
    assert q_proj.base == Axes(("layers", "embed", "heads"))
    assert q_proj.a == Axes(("layers", "embed", "adapter_rank"))
    assert q_proj.b == Axes(("layers", "adapter_rank", "heads"))
    assert axes["layers"]["mlp"]["down_proj"].a == Axes(("layers", "mlp", "adapter_rank"))
    assert axes["embed"] == Axes(("vocab", "embed"))


def test_optimizer_moments_follow_their_parameters_and_the_rest_is_replicated():
    tree = _lora_tree()
    trainable, _ = adapters.split_trainable(tree)
    trainable_axes, _ = adapters.split_trainable(adapted_axes(tree, base_axes(TINY)))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, trainable)
    axes = optimizer_state_axes(opt_state, trainable, trainable_axes)
    adam = axes[0]
    assert adam.mu["layers"]["attn"]["q_proj"]["a"] == Axes(("layers", "embed", "adapter_rank"))
    assert adam.nu["layers"]["mlp"]["up_proj"]["b"] == Axes(("layers", "adapter_rank", "mlp"))
    assert adam.count == Axes(())


class _FakeMesh:
    """Just the sizes `Layout.check` reads (a real 8-device mesh needs 8 devices)."""

    axis_names = ("data", "fsdp", "tensor")

    def __init__(self, **shape):
        self.shape = shape


def test_check_names_the_array_and_dimension_that_does_not_divide():
    layout = Layout(_FakeMesh(data=1, fsdp=1, tensor=3))
    params = abstract_params(TINY)
    with pytest.raises(ShardingError, match=r"model\['embed'\] has shape \(256, 64\): dimension 0 \(vocab, size 256\) "
                                            r"does not divide by mesh axes tensor 3"):
        layout.check(params, base_axes(TINY), "model")


PROJECT = pathlib.Path(__file__).resolve().parents[1]


def test_one_step_on_8_devices_matches_one_device(tiny_checkpoint, sentiment_data, tmp_path):
    """Data, FSDP, tensor and mixed meshes with logits at the answer positions: the same loss and the same
    updated parameters as one device with logits everywhere (float32), with the base weights really split; zo_fo's SPSA update of the base weights equals one
    device's up to the rounding of its loss difference."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(PROJECT / "tests" / "sharded_step_check.py"), str(tiny_checkpoint),
                             str(sentiment_data["train"]), str(tmp_path), "lora,full,hybrid,hybrid_lora,zo_fo"],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    shards = {"data8": [2, 64, 64], "fsdp8": [2, 8, 64], "tensor8": [2, 64, 8], "data2_fsdp2_tensor2": [2, 32, 32],
              "fsdp4_tensor2": [2, 16, 32]}
    for method, runs in results.items():
        reference = runs.pop("one_device")
        assert reference["update_scale"] > 1e-2, method  # the step really changes the parameters
        assert set(runs) == set(shards)
        for mesh, run in runs.items():
            np.testing.assert_allclose(run["loss"], reference["loss"], rtol=1e-6, err_msg=f"{method} {mesh}")
            assert run["max_update_difference"] < 2e-6 * max(1.0, reference["update_scale"]), (method, mesh, run)
            assert run["q_proj_shard"] == shards[mesh], (method, mesh)
            if method == "zo_fo":  # the SPSA direction is drawn per shard, the same values on every mesh
                assert reference["base_update_scale"] > 1e-2
                assert run["max_base_update_difference"] < 1e-3 * reference["base_update_scale"], (mesh, run)
