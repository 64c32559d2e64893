"""`hyjax.planning.cost`: the compiled step's FLOPs and HBM traffic with every loop iteration counted,
checked against XLA's own `cost_analysis()`, which is exact on a program without loops (every layer
unrolled) and counts a loop body once."""

from __future__ import annotations

import functools

import pytest

from hyjax.config import load_config
from hyjax.model import LlamaConfig
from hyjax.training import plan_run, run_layout
from hyjax.planning.cost import program_cost
from hyjax.planning.planner import CHIPS, roofline, topology_devices

MODEL = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                    num_kv_heads=2)


@functools.cache
def compiled_step(method: str, unroll: int, batch: int = 4, micro: int | None = None, topology: str | None = None):
    """The training step of the 4-layer model on sequences of 64 (`topology`: compiled for that TPU pod, fsdp
    over its chips; None: this host's one device), its layers scanned `unroll` at a time."""
    mesh = ["mesh.data=1", "mesh.fsdp=-1"] if topology else []
    config = load_config(None, ["model.preset=null", f"method.name={method}", f"train.global_batch_size={batch}",
                                f"train.micro_batch_size={micro or batch}", "data.max_length=64", "train.steps=10",
                                "export.peft_adapter=false", "method.lora_ga.rank=4", "method.boft.block_size=8",
                                *mesh])
    devices = topology_devices(topology) if topology else None
    plan = plan_run(config, MODEL.replace(scan_unroll=unroll), run_layout(config.mesh, devices), total_steps=10)
    return plan.train_step().lower(*plan.abstract_arguments()).compile()


@pytest.mark.parametrize("method", ["full", "lora", "hybrid"])
def test_without_loops_the_count_is_xlas(method):
    """Every layer unrolled, one micro-batch: no loop is left, and our reading of the program gives XLA's
    FLOPs, transcendentals and bytes."""
    compiled = compiled_step(method, unroll=MODEL.num_layers)
    xla, ours = compiled.cost_analysis(), program_cost(compiled.as_text())
    assert ours.flops == pytest.approx(xla["flops"], rel=2e-3)
    assert ours.transcendentals == pytest.approx(xla["transcendentals"], rel=2e-3)
    assert ours.bytes == pytest.approx(xla["bytes accessed"], rel=2e-2)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_scanned_step_counts_every_layer(method):
    """Layers scanned one at a time: XLA counts one layer, we count all four, as the unrolled step does."""
    scanned, unrolled = compiled_step(method, unroll=1), compiled_step(method, unroll=MODEL.num_layers)
    xla_once, xla_all = scanned.cost_analysis()["flops"], unrolled.cost_analysis()["flops"]
    assert xla_once < 0.6 * xla_all  # the undercount being corrected
    assert program_cost(scanned.as_text()).flops == pytest.approx(xla_all, rel=0.02)


def test_micro_batches_count_once_each():
    """Two micro-batches of 2 rows cost what one batch of 4 does, less one optimizer update: within 2%."""
    accumulated = program_cost(compiled_step("lora", unroll=1, batch=4, micro=2).as_text())
    whole = program_cost(compiled_step("lora", unroll=1, batch=4).as_text())
    assert accumulated.flops == pytest.approx(whole.flops, rel=0.02)
    half = program_cost(compiled_step("lora", unroll=1, batch=2).as_text())
    assert whole.flops == pytest.approx(2 * half.flops, rel=0.05)


def test_tpu_matmuls_written_as_convolutions_count_as_xla_counts_them():
    """On TPU most matmuls, and attention's batched ones, are convolutions whose batch-like dimensions
    are dilated windows; counting whole windows would count attention many times over."""
    pytest.importorskip("libtpu")
    compiled = compiled_step("lora", unroll=MODEL.num_layers, topology="v5p:2x2x1")
    assert "convolution(" in compiled.as_text()
    xla, ours = compiled.cost_analysis(), program_cost(compiled.as_text())
    assert ours.flops == pytest.approx(xla["flops"], rel=0.01)
    scanned = program_cost(compiled_step("lora", unroll=1, topology="v5p:2x2x1").as_text())
    assert scanned.flops == pytest.approx(xla["flops"], rel=0.03)


def test_roofline_takes_the_longer_of_compute_and_memory():
    cost = program_cost(compiled_step("lora", unroll=1).as_text())
    chip = CHIPS["v5p"]
    bound = roofline(cost, chip)
    assert bound["compute_s"] == pytest.approx(cost.flops / 459e12)
    assert bound["memory_s"] == pytest.approx(cost.bytes / 2765e9)
    assert bound["step_s"] == max(bound["compute_s"], bound["memory_s"])
    assert bound["flop_utilization"] == pytest.approx(cost.flops / bound["step_s"] / 459e12)
    assert 0 < bound["flop_utilization"] <= 1


def test_a_pallas_kernel_counts_the_work_its_estimate_gives():
    """XLA cannot see inside a Pallas kernel: compiled for TPU, a kernel that doubles its input but declares
    123,456,789 FLOPs, 4,321 transcendentals and 987,654,321 bytes counts them (its backend config, which
    the compiled text prints over several lines, is read whole)."""
    pytest.importorskip("libtpu")
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def double(x_ref, out_ref):
        out_ref[...] = x_ref[...] * 2

    def declared(x):
        return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                              cost_estimate=pl.CostEstimate(flops=123_456_789, transcendentals=4_321,
                                                            bytes_accessed=987_654_321))(x)

    mesh = topologies.make_mesh(topologies.get_topology_desc("v5p:2x2x1", "tpu"), (4,), ("data",))
    step = jax.shard_map(declared, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    x = jax.ShapeDtypeStruct((1024, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    cost = program_cost(jax.jit(step).lower(x).compile().as_text())
    assert cost.custom_calls == 1
    assert 123_456_789 <= cost.flops < 123_456_789 + 1e5  # the kernel's, and nothing of size around it
    assert cost.transcendentals == 4_321
    assert 987_654_321 <= cost.bytes < 987_654_321 + 1e6
