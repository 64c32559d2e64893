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
from hyjax.adapters.boft import BOFTConfig
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
    assert q_proj.a == Axes(("layers", ("embed", "heads"), "heads"), best_effort=True)
    assert q_proj.b == Axes(("layers", "embed", ("heads", "embed")), best_effort=True)
    assert axes["layers"]["mlp"]["down_proj"].a == Axes(("layers", ("mlp", "embed"), "embed"), best_effort=True)
    assert axes["embed"] == Axes(("vocab", "embed"))


def test_optimizer_moments_follow_their_parameters_and_the_rest_is_replicated():
    tree = _lora_tree()
    trainable, _ = adapters.split_trainable(tree)
    trainable_axes, _ = adapters.split_trainable(adapted_axes(tree, base_axes(TINY)))
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, trainable)
    axes = optimizer_state_axes(opt_state, trainable, trainable_axes)
    adam = axes[0]
    assert adam.mu["layers"]["attn"]["q_proj"]["a"] == trainable_axes["layers"]["attn"]["q_proj"]["a"]
    assert adam.nu["layers"]["mlp"]["up_proj"]["b"] == Axes(("layers", "embed", ("mlp", "embed")), best_effort=True)
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


@pytest.mark.parametrize("method, shape, mesh, specs", [
    # LoRA rank 8 on fsdp 64: A's rows split over fsdp and tensor; B's rank stays whole, its columns take both.
    (LoRAConfig(rank=8), {"a": (126, 16384, 8), "b": (126, 8, 16384)}, dict(data=1, fsdp=64, tensor=8),
     {"a": P(None, ("fsdp", "tensor"), None), "b": P(None, None, ("tensor", "fsdp"))}),
    # BOFT on LLaMA-405B's down_proj (d_in 53248 = 3328 blocks of 16): blocks over tensor (3328 does not divide
    # by 512), each block's 256 entries over fsdp; s over fsdp then tensor.
    (BOFTConfig(block_size=16, n_factors=2), {"r": (126, 2, 3328, 256), "s": (126, 16384)},
     dict(data=1, fsdp=64, tensor=8), {"r": P(None, None, "tensor", "fsdp"), "s": P(None, ("fsdp", "tensor"))}),
])
def test_adapter_arrays_split_over_every_mesh_axis_of_their_weight_where_they_divide(method, shape, mesh, specs):
    """`Layout.fitted` keeps, per dimension, the longest prefix of its mesh axes that divides it."""
    base = "down_proj" if isinstance(method, BOFTConfig) else "q_proj"
    d_in, d_out = (53248, 16384) if base == "down_proj" else (16384, 16384)
    names = {"q_proj": ("layers", "embed", "heads"), "down_proj": ("layers", "mlp", "embed")}[base]
    node = jax.eval_shape(lambda w: method.init_stacked(w, jax.random.key(0), stacked_axes=1),
                          jax.ShapeDtypeStruct((126, d_in, d_out), np.float32))
    assert {k: getattr(node, k).shape for k in shape} == shape
    layout = Layout(_FakeMesh(**mesh))
    fitted = layout.fitted({"w": node}, adapted_axes({"w": node}, {"w": names}))["w"]
    assert {k: layout.spec(getattr(fitted, k)) for k in specs} == specs
    layout.check({"w": node}, {"w": fitted})


PROJECT = pathlib.Path(__file__).resolve().parents[1]


# The structured adapters (XLA and Pallas in interpret mode) on the mesh that splits o_proj's and down_proj's
# d_in over tensor (two butterfly factors: each device keeps its windows of those features), and, for the
# trainable bytes per device, on fsdp 8; flash attention (splash in interpret mode) with every axis split.
STRUCTURED = ["boft@fsdp8+fsdp4_tensor2", "unitary@fsdp8+fsdp4_tensor2",
              "boft:pallas%method.boft.n_factors=2@fsdp4_tensor2",
              "hybrid:pallas%method.boft.n_factors=2@fsdp4_tensor2", "unitary:pallas@fsdp4_tensor2",
              "lora%model.attention=pallas@data2_fsdp2_tensor2"]
# Every method on the mesh that splits all three axes at once, and on one more mesh, so that each mesh of
# one axis (and fsdp4 x tensor2) is checked by at least one method.
MIXED_AND_ONE_AXIS = ["lora@data2_fsdp2_tensor2+data8", "full@data2_fsdp2_tensor2+fsdp8",
                      "hybrid@data2_fsdp2_tensor2+tensor8", "hybrid_lora@data2_fsdp2_tensor2+fsdp4_tensor2",
                      "zo_fo@data2_fsdp2_tensor2+fsdp8"]
FSDP = {"data8": 1, "fsdp8": 8, "tensor8": 1, "data2_fsdp2_tensor2": 2, "fsdp4_tensor2": 4}


def test_one_step_on_8_devices_matches_one_device(tiny_checkpoint, sentiment_data, tmp_path):
    """Data, FSDP, tensor and mixed meshes with logits at the answer positions: the same loss and the same
    updated parameters as one device with logits everywhere (float32), with the base weights really split,
    and each device holding at most 1.1x its fsdp share of the adapters; zo_fo's SPSA update of the base
    weights equals one device's up to the rounding of its loss difference."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    groups = [MIXED_AND_ONE_AXIS, STRUCTURED]  # two processes, one per core
    checks = [subprocess.Popen([sys.executable, str(PROJECT / "tests" / "sharded_step_check.py"), str(tiny_checkpoint),
                                str(sentiment_data["train"]), str(tmp_path / str(index)), ",".join(group)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for index, group in enumerate(groups)]
    results, cases = {}, [case for group in groups for case in group]
    for check in checks:
        stdout, stderr = check.communicate(timeout=1500)
        assert check.returncode == 0, stderr[-4000:]
        results.update(json.loads(stdout.strip().splitlines()[-1]))
    shards = {"data8": [2, 64, 64], "fsdp8": [2, 8, 64], "tensor8": [2, 64, 8], "data2_fsdp2_tensor2": [2, 32, 32],
              "fsdp4_tensor2": [2, 16, 32]}
    assert set(results) == {case.split("@")[0] for case in cases}
    for case, runs in results.items():
        method = case.split(":")[0]
        reference = runs.pop("one_device")
        assert reference["update_scale"] > 1e-2, case  # the step really changes the parameters
        expected = next(c for c in cases if c.split("@")[0] == case).partition("@")[2]
        assert set(runs) == set(expected.split("+") if expected else shards)
        for mesh, run in runs.items():
            np.testing.assert_allclose(run["loss"], reference["loss"], rtol=1e-6, err_msg=f"{case} {mesh}")
            assert run["max_update_difference"] < 2e-6 * max(1.0, reference["update_scale"]), (case, mesh, run)
            assert run["q_proj_shard"] == shards[mesh], (case, mesh)
            if method != "full":  # adapters split like their weights: the fsdp share or less
                assert run["trainable_bytes"] <= 1.1 * reference["trainable_bytes"] / FSDP[mesh], (case, mesh, run)
            if method == "zo_fo":  # the SPSA direction is drawn per shard, the same values on every mesh
                assert reference["base_update_scale"] > 1e-2
                assert run["max_base_update_difference"] < 1e-3 * reference["base_update_scale"], (mesh, run)


def test_pallas_kernels_run_on_each_devices_part():
    """Pallas kernels in interpret mode under `shard_map`, against one device's XLA reference. The butterfly
    (`on_local_tokens`), features split over tensor: each device keeps its 32 features when they are whole
    windows (m = 2: windows of 16), and gathers them otherwise (m = 4: 64). Flash attention
    (`on_local_heads`) on each device's rows and heads: key/value heads split with the query heads, repeated
    up to them, or all heads gathered; the same outputs at real positions, the same gradients."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, str(PROJECT / "tests" / "per_device_kernels_check.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    butterfly, flash = results["butterfly"], results["attention"]
    assert butterfly["2"]["activation_gathers"] == 0 and butterfly["4"]["activation_gathers"] >= 1
    assert max(r["max_difference"] for r in butterfly.values()) < 1e-5
    assert set(flash) == {"kv_split", "kv_repeated", "heads_gathered"}
    for case, run in flash.items():
        assert run["max_difference"] < 1e-5 and run["max_gradient_difference"] < 1e-4, (case, run)
