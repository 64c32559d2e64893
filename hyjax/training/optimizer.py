"""The optimizer of a run, built from `train` and `method`: learning-rate schedule, AdamW / Adafactor /
SGD, per-group learning rates, gradient clipping, the hybrid-weights transform, the adapters'
constraints, and skipping of steps whose gradients are not finite.

The chain, outermost first:

    apply_if_finite(                         # a NaN/inf gradient leaves parameters and state untouched
      chain(clip_by_global_norm,             # train.grad_clip_norm
            hybrid_weights(...),             # method hybrid only: sets lambda from the gradient norms
            multi_transform(groups),         # one base optimizer per lr_multipliers group (0: frozen),
                                             # Cayley steps on full-capacity unitary matrices
            unit_norm_projection()))         # unitary adapters' reflection vectors back to unit norm

With `method.hybrid.mix=update` the groups run inside `hybrid_weights(inner=...)`, which scales their
updates by lambda.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from hyjax.optim import hybrid_weights
from hyjax.optim.stiefel import cayley_retraction
from hyjax.optim.unit_norm import unit_norm_projection
from hyjax.adapters.unitary_full import Orthogonal

# apply_if_finite never lets non-finite updates through by itself; the loop stops the run after
# `train.max_skipped_steps` consecutive skips instead.
_NEVER = 2**31 - 1


def learning_rate_schedule(train, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `train.warmup_steps`, then cosine / linear decay to
    `learning_rate * final_lr_fraction` at `total_steps`, or constant."""
    peak = train.learning_rate
    decay_steps = max(total_steps - train.warmup_steps, 1)
    if train.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.final_lr_fraction)
    elif train.schedule == "linear":
        after = optax.linear_schedule(peak, peak * train.final_lr_fraction, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if train.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, train.warmup_steps)
    return optax.join_schedules([warmup, after], [train.warmup_steps])


def base_optimizer(train, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """`train.optimizer` at `learning_rate`, with decoupled weight decay."""
    if train.optimizer == "adamw":
        return optax.adamw(learning_rate, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay)
    if train.optimizer == "adafactor":
        return optax.adafactor(learning_rate, weight_decay_rate=train.weight_decay or None)
    sgd = optax.sgd(learning_rate, momentum=train.b1 or None)
    return optax.chain(optax.add_decayed_weights(train.weight_decay), sgd) if train.weight_decay else sgd


def path_string(key_path) -> str:
    """`layers/attn/q_proj/a` from a `jax.tree_util` key path (dict keys and node field names)."""
    parts = []
    for entry in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return "/".join(parts)


def group_labels(trainable: Any, lr_multipliers) -> Any:
    """The optimizer group of every trainable leaf: `"orthogonal"` for full-capacity unitary matrices,
    else `"group<i>"` for the first `lr_multipliers` pattern that matches its path, else `"default"`."""
    patterns = [re.compile(pattern) for pattern, _ in lr_multipliers]

    def label(key_path, leaf):
        path = path_string(key_path)
        for i, pattern in enumerate(patterns):
            if pattern.search(path):
                return f"group{i}"
        return "default"

    def node_label(key_path, node):
        if isinstance(node, Orthogonal):
            return jax.tree.map(lambda _: "orthogonal", node)
        return label(key_path, node)

    return jax.tree_util.tree_map_with_path(node_label, trainable, is_leaf=lambda n: isinstance(n, Orthogonal))


def _grouped(train, schedule: optax.Schedule) -> optax.GradientTransformation:
    """One base optimizer per learning-rate group (multiplier 0: frozen) and Cayley steps for
    `Orthogonal` matrices, by `group_labels`."""
    groups = {"default": base_optimizer(train, schedule), "orthogonal": cayley_retraction(schedule)}
    for i, (_, multiplier) in enumerate(train.lr_multipliers):
        if multiplier == 0:
            groups[f"group{i}"] = optax.set_to_zero()
        else:
            groups[f"group{i}"] = base_optimizer(train, lambda step, m=multiplier: m * schedule(step))
    return optax.multi_transform(groups, lambda tree: group_labels(tree, train.lr_multipliers))


def build_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)` of a `RunConfig` (the chain in the module docstring)."""
    train = config.train
    schedule = learning_rate_schedule(train, total_steps)
    grouped = _grouped(train, schedule)
    chain = []
    if train.grad_clip_norm is not None:
        chain.append(optax.clip_by_global_norm(train.grad_clip_norm))
    if config.method.name == "hybrid":
        kwargs = config.hybrid_weights_kwargs()
        if kwargs["mix"] == "update":
            chain.append(hybrid_weights(**kwargs, inner=grouped))
        else:
            chain += [hybrid_weights(**kwargs), grouped]
    else:
        chain.append(grouped)
    if config.method.name == "unitary":
        chain.append(unit_norm_projection())
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=_NEVER), schedule
