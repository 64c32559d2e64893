"""The shardings of a training run: from the config's mesh section to a `NamedSharding` for every
base weight, adapter parameter, optimizer-state leaf and batch array.

Both `train` (real arrays) and `hyjax.plan` (abstract ones, for a TPU topology) build them here, so
the planner compiles exactly the program a pod would run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from hyjax import adapters
from hyjax.model import abstract_params, logical_axes
from hyjax.sharding import (
    BATCH_AXES,
    Axes,
    Layout,
    Rules,
    activation_sharding,
    adapted_axes,
    build_mesh,
    optimizer_state_axes,
    replicated,
)
from hyjax.training.step import TrainState

def run_layout(mesh_section, devices=None) -> Layout:
    """The `Layout` of a `MeshSection` over `devices` (default: every device of every process)."""
    mesh = build_mesh(**mesh_section.sizes(), slices=mesh_section.slices, devices=devices)
    return Layout(mesh, Rules().override(mesh_section.rules))


def check_batch_split(config, layout: Layout) -> None:
    """Raises `ConfigError` unless each micro-batch's rows divide by the ways the batch is split."""
    from hyjax.config import ConfigError

    micro_batch, ways = config.train.micro_batch, layout.ways("batch")
    if micro_batch % ways:
        raise ConfigError(f"train.micro_batch_size={micro_batch} (null: global_batch_size) must divide by the "
                          f"{ways} ways the batch is split (mesh data x fsdp)")


def base_axes(model_config) -> dict:
    """`Axes` of every base weight (the model's own logical names)."""
    return jax.tree.map(Axes, logical_axes(model_config), is_leaf=lambda x: isinstance(x, tuple))


def base_shardings(layout: Layout, model_config) -> dict:
    """`NamedSharding` of every base weight, after checking that the mesh divides each split dimension."""
    axes = base_axes(model_config)
    layout.check(abstract_params(model_config), axes, "model")
    return layout.shardings(axes)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Shardings of the training step's arguments: `(state, frozen, batch)`."""

    state: Any  # TrainState of NamedSharding
    frozen: Any
    batch: Any  # one NamedSharding for every [accumulation, micro_batch, T] array

    @property
    def arguments(self) -> tuple:
        return self.state, self.frozen, self.batch


def adapted_shardings(layout: Layout, model_config, adapted: dict) -> dict:
    """`NamedSharding` of every array of an adapted tree (abstract or real), checked against the mesh."""
    axes = adapted_axes(adapted, base_axes(model_config))
    layout.check(adapted, axes, "adapted model")
    return layout.shardings(axes)


def step_shardings(layout: Layout, model_config, adapted: dict, optimizer, zeroth_order=None) -> StepShardings:
    """The shardings of the step for an adapted tree (abstract or real) and its optimizer; with
    `zeroth_order` (a `ZerothOrder`) the base weights it trains are part of the state, in their own
    shardings."""
    axes = adapted_axes(adapted, base_axes(model_config))
    layout.check(adapted, axes, "adapted model")
    trainable, frozen = adapters.split_trainable(adapted)
    trainable_axes, frozen_axes = adapters.split_trainable(axes)
    zeroth_order_axes = None
    if zeroth_order is not None:
        zeroth_order_axes, frozen_axes = zeroth_order.split(frozen_axes)
    opt_state = jax.eval_shape(optimizer.init, trainable)
    state_axes = TrainState(step=replicated(0), trainable=trainable_axes,
                            opt_state=optimizer_state_axes(opt_state, trainable, trainable_axes),
                            rng=replicated(1), base=zeroth_order_axes)
    return StepShardings(state=layout.shardings(state_axes), frozen=layout.shardings(frozen_axes),
                         batch=layout.sharding(BATCH_AXES))


def create_state(trainable, optimizer, seed: int, shardings: StepShardings, base=None) -> TrainState:
    """A fresh `TrainState` (with `base`: the zeroth-order weights), built on the devices directly in its
    shardings."""
    return jax.jit(lambda t, b: TrainState.create(t, optimizer, seed, b), out_shardings=shardings.state)(
        trainable, base)


def jit_train_step(step_fn, layout: Layout, shardings: StepShardings, donate: bool = True):
    """`step_fn(state, frozen, batch)` (from `make_train_step`) compiled with the run's shardings: the
    state keeps its layout from step to step (and is donated), metrics come back replicated, and the
    model's marked activations follow the layout."""

    def sharded_step(state, frozen, batch):
        with activation_sharding(layout):
            return step_fn(state, frozen, batch)

    return jax.jit(sharded_step, in_shardings=shardings.arguments, out_shardings=(shardings.state, layout.replicated),
                   donate_argnums=0 if donate else ())
