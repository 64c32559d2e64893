"""`plan_run`: everything a training step needs, from the config and the model's shapes alone.

One function builds, for `python -m hyjax.train`, `python -m hyjax.plan`, `hyjax.training.restore`
and the benchmarks alike: the run's method and adapter spec, the adapted tree (abstract), its
trainable / frozen / own-weights split, the objective (the supervised answer loss, or GRPO's on the
rollout batches its sampling stage produces before each step), the optimizer and schedule, the
shardings of every array, and the jitted step: one accumulate-clip-update of the objective's
micro-batch sums for every objective and method. Loading real weights is a separate step on top of it
(`hyjax.training.setup`), so the planner compiles exactly the program a run executes.

    plan = plan_run(config, model_config, layout, total_steps=1000)
    compiled = plan.train_step().lower(*plan.abstract_arguments()).compile()   # no weight read
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hyjax import adapters
from hyjax.adapters.axes import adapted_axes, base_axes
from hyjax.config import ConfigError, RunConfig
from hyjax.methods import Method, OwnWeights, method_of
from hyjax.model import abstract_params
from hyjax.model.config import LlamaConfig
from hyjax.rl.step import GRPOObjective
from hyjax.sharding import (
    BATCH_AXES,
    Layout,
    Rules,
    activation_sharding,
    build_mesh,
    optimizer_state_axes,
    replicated,
)
from hyjax.training.optimizer import build_optimizer
from hyjax.training.step import AnswerObjective, TrainState, make_eval_step, objective_update, seeded, state_params

# dtype of every [accumulation, micro_batch, T] array of a training batch (loss_positions: [..., K])
BATCH_DTYPES = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32, "loss_positions": jnp.int32}


def run_layout(mesh_section, devices=None) -> Layout:
    """The `Layout` of a `MeshSection` over `devices` (default: every device of every process)."""
    mesh = build_mesh(**mesh_section.sizes(), slices=mesh_section.slices, devices=devices)
    return Layout(mesh, Rules().override(mesh_section.rules))


def check_batch_split(config: RunConfig, layout: Layout) -> None:
    """Raises `ConfigError` unless each micro-batch's rows divide by the ways the batch is split."""
    micro_batch, ways = config.train.micro_batch, layout.ways("batch")
    if micro_batch % ways:
        raise ConfigError(f"train.micro_batch_size={micro_batch} (null: global_batch_size) must divide by the "
                          f"{ways} ways the batch is split (mesh data x fsdp)")


def base_shardings(layout: Layout, model_config: LlamaConfig) -> dict:
    """`NamedSharding` of every base weight, after checking that the mesh divides each split dimension."""
    axes = base_axes(model_config)
    layout.check(abstract_params(model_config), axes, "model")
    return layout.shardings(axes)


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Shardings of the training step's arguments: `(state, frozen, batch)`."""

    state: TrainState  # of NamedSharding
    frozen: dict
    batch: jax.sharding.NamedSharding  # every [accumulation, micro_batch, T] array

    @property
    def arguments(self) -> tuple:
        return self.state, self.frozen, self.batch


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A run's step, planned: see the module docstring. Built by `plan_run`."""

    config: RunConfig
    method: Method
    model_config: LlamaConfig
    layout: Layout
    total_steps: int
    selection: Any  # the method's start-up choice (`Method.select`: Hybrid-LoRA's modules), or None
    spec: adapters.AdapterSpec
    adapted: dict  # the adapted tree, abstract (jax.ShapeDtypeStruct leaves)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    own_weights: OwnWeights | None  # the weights the method trains itself (zo_fo's base weights, by SPSA)
    objective: Any  # AnswerObjective or GRPOObjective: its micro-batch sums and batch arrays
    adapted_shardings: dict  # NamedSharding of every array of the adapted tree
    shardings: StepShardings

    @property
    def trainable_counts(self) -> dict[str, int]:
        """Trainable parameters per adapter kind, and their `total` (`adapters.count_trainable`)."""
        return adapters.count_trainable(self.adapted)

    def split(self, adapted: dict) -> tuple[Any, dict, Any]:
        """`(trainable, frozen, base)` of an adapted tree (real or abstract): the adapter parameters, the
        rest, and the weights the method trains itself (taken out of `frozen`; None if it has none)."""
        return split_parts(adapted, self.own_weights)

    def check_adapted(self, adapted: dict) -> None:
        """Raises unless a real adapted tree has the planned structure, shapes and dtypes."""
        planned = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), self.adapted)
        real = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), adapted)
        if planned != real:
            raise ValueError("the adapted model differs from the run's plan (structure, shapes or dtypes); "
                             "this is a bug in the method's adapter_spec")

    def create_state(self, trainable, base=None) -> TrainState:
        """A fresh `TrainState`, built on the devices directly in its shardings."""
        seed, optimizer = self.config.train.seed, self.optimizer
        return jax.jit(lambda t, b: TrainState.create(t, optimizer, seed, b), out_shardings=self.shardings.state)(
            trainable, base)

    def abstract_arguments(self) -> tuple:
        """`train_step`'s arguments as `jax.ShapeDtypeStruct`s with their shardings: what it is lowered
        with when no weight is read (the planner). `(state, frozen, batch)`, and the update's key for an
        objective whose step is not the run's (GRPO). Batches are `data.max_length` long, with logits at
        every position (the most a step of the run can need), and hold the objective's arrays."""
        trainable, frozen, base = self.split(self.adapted)
        seed, optimizer = self.config.train.seed, self.optimizer
        state = jax.eval_shape(lambda t, b: TrainState.create(t, optimizer, seed, b), trainable, base)
        train = self.config.train
        shape = (train.grad_accum_steps, train.micro_batch, self.config.data.max_length)
        batch = {key: jax.ShapeDtypeStruct(shape, dtype, sharding=self.shardings.batch)
                 for key, dtype in {**BATCH_DTYPES, **self.objective.batch_fields}.items()}
        arguments = (_with_shardings(state, self.shardings.state), _with_shardings(frozen, self.shardings.frozen),
                     batch)
        if self.objective.counts_step:
            return arguments
        return *arguments, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.layout.replicated)

    def abstract_start(self) -> dict:
        """The adapters' starting values (`adapters.starting_values`: LoRA-GA's initial factors) as
        `jax.ShapeDtypeStruct`s with their shardings: how a checkpoint's are read back. Empty for most methods."""
        return _with_shardings(adapters.starting_values(self.adapted), adapters.starting_values(self.adapted_shardings))

    def update(self):
        """`update(state, frozen, batch, key) -> (state, metrics)`, not jitted: one optimizer update of the
        objective's loss (`accumulated_update` of its micro-batch sums), extended to the method's own
        weights when it has some (`OwnWeights.wrap`, on the same loss by forward passes)."""
        return objective_update(self.objective, self.model_config, self.optimizer, self.schedule, self.method,
                                self.own_weights)

    def train_step(self, donate: bool = True):
        """The run's update jitted with its shardings: `(state, frozen, batch) -> (state, metrics)` with
        the step's key drawn from the state (`seeded`), or for an objective that counts its own steps
        (GRPO, several updates per sampled batch) `(state, frozen, batch, key)`. The state keeps its
        layout from step to step (and is donated), metrics come back replicated, and the model's marked
        activations follow the layout."""
        update, layout = self.update(), self.layout
        step_fn = seeded(update) if self.objective.counts_step else update
        shardings = self.shardings.arguments + (() if self.objective.counts_step else (layout.replicated,))

        def sharded_step(*arguments):
            with activation_sharding(layout):
                return step_fn(*arguments)

        return jax.jit(sharded_step, in_shardings=shardings, out_shardings=(self.shardings.state, layout.replicated),
                       donate_argnums=0 if donate else ())

    def eval_step(self):
        """`(state, frozen, batch) -> (answer-token nll sum, answer tokens)` on `[B, T]` arrays, jitted."""
        return jax.jit(make_eval_step(self.model_config, self.method, self.own_weights))

    def params(self, state: TrainState, frozen: dict) -> dict:
        """The adapted parameter tree of a state (the method's forward state set, dropout off), for
        evaluation and export."""
        return state_params(state, frozen, self.method, self.own_weights)


def plan_run(config: RunConfig, model_config: LlamaConfig, layout: Layout, total_steps: int,
             selection: Any = None) -> RunPlan:
    """The `RunPlan` of `config` for a model of `model_config`'s shapes on `layout`.

    `selection`: the method's start-up choice (`Method.select`, or as a checkpoint recorded it);
    None for a method that makes one means the planner's stand-in (`Method.planned_selection`).
    Raises `ConfigError` / `ShardingError` naming what does not fit, before anything is compiled.
    """
    method = method_of(config)
    check_batch_split(config, layout)
    if selection is None:
        selection = method.planned_selection(config, model_config)
    spec = method.adapter_spec(config, model_config, selection)
    params = abstract_params(model_config)
    # the gradient estimate has the weights' shapes
    gradients = params if method.from_gradients(config.method) else None
    try:
        adapted = jax.eval_shape(lambda p, g: adapters.apply(spec, p, jax.random.key(0), gradients=g), params,
                                 gradients)
    except ValueError as err:
        raise ConfigError(f"method.name={config.method.name!r} does not fit the model: {err}") from err
    optimizer, schedule = build_optimizer(config, total_steps)
    own_weights = method.own_weights(config, total_steps)
    axes = layout.fitted(adapted, adapted_axes(adapted, base_axes(model_config)))
    layout.check(adapted, axes, "adapted model")
    trainable_axes, frozen_axes, own_axes = split_parts(axes, own_weights)
    trainable = adapters.split_trainable(adapted)[0]
    opt_state = jax.eval_shape(optimizer.init, trainable)
    state_axes = TrainState(step=replicated(0), trainable=trainable_axes,
                            opt_state=optimizer_state_axes(opt_state, trainable, trainable_axes),
                            rng=replicated(1), base=own_axes)
    shardings = StepShardings(state=layout.shardings(state_axes), frozen=layout.shardings(frozen_axes),
                              batch=layout.sharding(BATCH_AXES))
    return RunPlan(config=config, method=method, model_config=model_config, layout=layout, total_steps=total_steps,
                   selection=selection, spec=spec, adapted=adapted, optimizer=optimizer, schedule=schedule,
                   own_weights=own_weights, objective=objective_of(config), adapted_shardings=layout.shardings(axes),
                   shardings=shardings)


def objective_of(config: RunConfig):
    """The objective of `train.objective`: the supervised answer loss, or GRPO's with `grpo`'s settings."""
    if config.train.objective != "grpo":
        return AnswerObjective()
    grpo = config.grpo
    return GRPOObjective(temperature=grpo.temperature, beta=grpo.beta, clip_low=grpo.clip_low,
                         clip_high=grpo.clip_high, aggregation=grpo.aggregation)


def split_parts(tree: dict, own_weights: OwnWeights | None) -> tuple[Any, dict, Any]:
    """`(trainable, frozen, base)` of an adapted tree (arrays, shapes or axes): the adapter parameters,
    the rest, and the weights the method trains itself (taken out of `frozen`; None if it has none)."""
    trainable, frozen = adapters.split_trainable(tree)
    base = None
    if own_weights is not None:
        base, frozen = own_weights.split(frozen)
    return trainable, frozen, base


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
