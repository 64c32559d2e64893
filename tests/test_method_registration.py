"""A method of one's own, added as the registry says (an adapter, a `Method`, one `register` call and a
YAML), with settings of its own and state beside its trainable tree: it trains, logs and draws that
state, checkpoints, and resumes exactly through the real job (`hyjax.training.train`), with no change to
hyjax.

The method, `gated_lora`: LoRA whose update is multiplied by a per-layer gate. The gate is not trained
by gradients: an Optax transform of the method keeps it in the optimizer state (ramping from 1/ramp to 1
over the first `ramp` updates, `method.settings.ramp`) and the method sets it into the adapted weights
before every forward (`Method.forward_state` / `with_forward_state`), as the hybrid does with its lambdas.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyjax.adapters import LoRAConfig, LoRAWeight
from hyjax.adapters.targets import map_paths
from hyjax.config import ConfigError, load_config
from hyjax.figures import pyplot, save
from hyjax.methods import METHODS, Method, register
from hyjax.training import restore, train
from test_train_run import _losses, tiny_run_overrides

RAMP = 3  # updates over which the gate ramps to 1 (the test's YAML; the method's default is 4)


# ------------------------------------------------------------------ the adapter


class GatedLoRAWeight(LoRAWeight):
    """LoRA with its update scaled by `gate` (one value per stacked layer), a frozen field."""

    gate: jax.Array = None
    NAME: ClassVar[str] = "gated_lora"
    PEFT_TYPE: ClassVar[str | None] = None

    def apply_to(self, x):
        plain = jnp.dot(x, self.base.astype(x.dtype))
        return plain + self.gate.astype(x.dtype) * (super().apply_to(x) - plain)

    def delta_2d(self):
        return self.gate * super().delta_2d()


@dataclasses.dataclass(frozen=True)
class GatedLoRAConfig(LoRAConfig):
    name: ClassVar[str] = "gated_lora"

    def init(self, base, key, gradient=None):
        lora = super().init(base, key, gradient)
        return GatedLoRAWeight(**{field.name: getattr(lora, field.name) for field in dataclasses.fields(lora)},
                               gate=jnp.zeros((), jnp.float32))  # the method's state sets it


# ------------------------------------------------------------------ its optimizer state and Method


class GateState(NamedTuple):
    count: jax.Array
    gates: dict  # by adapted weight path: [layers] float32


def _factor_paths(trainable, prefix=""):
    """`{path: a}` of every LoRA node's trainable dict `{"a", "b"}` in a trainable tree."""
    if set(trainable) == {"a", "b"}:
        return {prefix: trainable["a"]}
    found = {}
    for key, value in trainable.items():
        found.update(_factor_paths(value, f"{prefix}/{key}" if prefix else key))
    return found


@dataclasses.dataclass(frozen=True)
class GateSettings:
    """`method.settings` of gated_lora."""

    ramp: int = 4  # updates over which the gate ramps to 1

    def __post_init__(self):
        if self.ramp < 1:
            raise ValueError(f"ramp={self.ramp} must be at least 1")


def gate_ramp(ramp: int) -> optax.GradientTransformation:
    """Leaves the updates alone; moves every layer's gate to min(1, (updates + 1) / ramp)."""

    def init(params):
        return GateState(jnp.zeros((), jnp.int32), {path: jnp.full(a.shape[:-2], 1.0 / ramp, jnp.float32)
                                                    for path, a in _factor_paths(params).items()})

    def update(updates, state, params=None):
        gate = jnp.minimum(1.0, (state.count + 2).astype(jnp.float32) / ramp)
        return updates, GateState(state.count + 1, jax.tree.map(lambda g: jnp.full_like(g, gate), state.gates))

    return optax.GradientTransformation(init, update)


class GatedLoRA(Method):
    name = "gated_lora"
    sections = ("lora", "settings")  # it reads method.lora's settings and its own
    settings_type = GateSettings

    def adapter_config(self, section):
        return GatedLoRAConfig(**dataclasses.asdict(section.lora))

    def optimizer(self, config, grouped, total_updates):
        return [gate_ramp(config.method.own_settings().ramp), grouped]

    def forward_state(self, opt_state):
        (state,) = [node for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, GateState))
                    if isinstance(node, GateState)]
        return state.gates

    def with_forward_state(self, params, gates):
        return map_paths(lambda path, leaf: leaf.replace(gate=gates[path]) if path in gates else leaf, params)

    def logged(self, gates):
        return {"gate": {path: [float(v) for v in np.asarray(value).reshape(-1)] for path, value in gates.items()}}

    def figures(self, gates, output_dir):
        plt = pyplot()
        fig, ax = plt.subplots()
        ax.imshow(np.stack([np.asarray(gates[path]).reshape(-1) for path in sorted(gates)]), vmin=0, vmax=1)
        return {"gate_heatmap": str(save(fig, f"{output_dir}/gate_heatmap.png"))}


@pytest.fixture
def gated_lora(tmp_path):
    register(GatedLoRA())
    yaml = tmp_path / "gated_lora.yaml"
    yaml.write_text(f"method:\n  name: gated_lora\n  lora: {{rank: 2, alpha: 4.0}}\n  settings: {{ramp: {RAMP}}}\n")
    yield yaml
    del METHODS["gated_lora"]


def test_a_registered_method_with_state_of_its_own_trains_checkpoints_and_resumes(
        gated_lora, tiny_checkpoint, sentiment_data, tmp_path):
    def config(output):
        return load_config(gated_lora, tiny_run_overrides(tiny_checkpoint, sentiment_data, output,
                                                          "eval.generation_samples=0", "eval.num_examples=4"))

    whole = tmp_path / "whole"
    result = train(config(whole), log=lambda text: None)
    losses = _losses(whole)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    # the gate the method keeps in the optimizer state, logged every step and drawn at the end
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["gate"]["layers/attn/q_proj"] for r in records if "gate" in r}
    layers = result.setup.model_config.num_layers
    assert logged == {step: [float(np.float32(min(1.0, (step + 1) / RAMP)))] * layers for step in range(1, 7)}
    assert (whole / "gate_heatmap.png").is_file() and result.summary["files"]["gate_heatmap"].endswith(".png")
    # the forward reads it: the adapted tree of the final state carries the gate (0 as the adapter built it),
    # and B moved (with the adapter's own gate of 0 it would get no gradient)
    params = result.adapted
    np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"].gate, np.ones(layers, np.float32))
    assert float(np.abs(params["layers"]["attn"]["q_proj"].b).max()) > 0

    # resumed from the step-2 checkpoint, as a run stopped after step 2: every later step as uninterrupted
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for step in ("4", "6"):
        shutil.rmtree(resumed / "checkpoints" / step)
    train(config(resumed), log=lambda text: None)
    assert _losses(resumed) == losses
    final = restore(resumed)
    assert final.step == 6
    for a, b in zip(jax.tree.leaves(result.state), jax.tree.leaves(final.state)):
        np.testing.assert_array_equal(a, b)


def test_its_settings_are_checked_as_its_own_dataclass_says(gated_lora):
    def settings(*overrides):
        return load_config(gated_lora, ["export.peft_adapter=false", *overrides]).method.own_settings()

    assert settings() == GateSettings(ramp=RAMP) and settings("method.settings.ramp=5") == GateSettings(ramp=5)
    with pytest.raises(ConfigError, match="method.settings.ramp=0 must be at least 1"):
        settings("method.settings.ramp=0")
    with pytest.raises(ConfigError, match="unknown key 'method.settings.rmap'; did you mean 'method.settings.ramp'"):
        settings("method.settings.rmap=2")


def test_a_method_name_is_registered_once(gated_lora):
    with pytest.raises(ValueError, match="'gated_lora' is registered already"):
        register(GatedLoRA())
