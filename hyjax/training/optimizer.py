"""The optimizer of a run, built from `train` and `method`: learning-rate schedule, AdamW / Adafactor /
SGD, per-group learning rates, gradient clipping, the hybrid-weights transform, the adapters'
constraints, and skipping of steps whose gradients are not finite.

The chain, outermost first:

    apply_if_finite(                         # a NaN/inf gradient leaves parameters and state untouched
      chain(clip_by_global_norm,             # train.grad_clip_norm (one norm over every group)
            <the method's part>))            # Method.optimizer around the groups:
                                             #   multi_transform(groups): one base optimizer per
                                             #   lr_multipliers group (0: frozen) and the method's
                                             #   own groups (Method.optimizer_groups: the unitary's
                                             #   Cayley steps), each group clipped by its own norm
                                             #   first with train.grad_clip_per_group;
                                             #   hybrid: hybrid_weights(...) first (sets lambda from the
                                             #   gradient norms); unitary: unit_norm_projection() after
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from hyjax.methods import Method, method_of
from hyjax.optim.optimizers import base_optimizer
from hyjax.optim.schedule import learning_rate_schedule

# apply_if_finite never lets non-finite updates through by itself; the loop stops the run after
# `train.max_skipped_steps` consecutive skips instead.
_NEVER = 2**31 - 1


def path_string(key_path) -> str:
    """`layers/attn/q_proj/a` from a `jax.tree_util` key path (dict keys and node field names)."""
    parts = []
    for entry in key_path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
    return "/".join(parts)


def group_labels(trainable: Any, lr_multipliers, method: Method | None = None, section=None) -> Any:
    """The optimizer group of every trainable leaf: the method's own group for the subtrees it claims
    (`Method.group_of`, every leaf under such a subtree), else `"group<i>"` for the first
    `lr_multipliers` pattern that matches its path, else `"default"`."""
    patterns = [re.compile(pattern) for pattern, _ in lr_multipliers]

    def own(node) -> str | None:
        return None if method is None else method.group_of(section, node)

    def label(key_path, node):
        group = own(node)
        if group is not None:
            return jax.tree.map(lambda _: group, node)
        path = path_string(key_path)
        for i, pattern in enumerate(patterns):
            if pattern.search(path):
                return f"group{i}"
        return "default"

    return jax.tree_util.tree_map_with_path(label, trainable, is_leaf=lambda node: own(node) is not None)


def _grouped(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """One base optimizer per learning-rate group (multiplier 0: frozen) and the method's own groups
    (`Method.optimizer_groups`), by `group_labels`; with `train.grad_clip_per_group` each group's gradient
    is first clipped to `train.grad_clip_norm` by its own norm.

    Why per group: under one global norm the largest group sets every group's scale. The hybrid's LoRA-GA
    branch, whose gradient is 5-10x its BOFT branch's, would scale BOFT's steps by its own fluctuations,
    which BOFT alone never sees. Clipping inside the groups also puts it after the hybrid's lambda rule
    (`Method.optimizer` wraps the groups), so the rule compares the branches' unclipped norms rather than
    two norms clipped to the same bound."""
    train, method = config.train, method_of(config)

    def clipped(optimizer):
        if train.grad_clip_norm is None or not train.grad_clip_per_group:
            return optimizer
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), optimizer)

    groups = {"default": clipped(base_optimizer(train, schedule))}
    groups.update({label: clipped(group) for label, group in method.optimizer_groups(config, schedule).items()})
    for i, (_, multiplier) in enumerate(train.lr_multipliers):
        if multiplier == 0:
            groups[f"group{i}"] = optax.set_to_zero()
        else:
            groups[f"group{i}"] = clipped(base_optimizer(train, lambda step, m=multiplier: m * schedule(step)))
    return optax.multi_transform(groups, lambda tree: group_labels(tree, train.lr_multipliers, method, config.method))


def build_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)` of a `RunConfig` (the chain in the module docstring; the method adds
    its part through `Method.optimizer`)."""
    train = config.train
    schedule = learning_rate_schedule(train, total_steps)
    per_update, updates = schedule, total_steps
    if train.objective == "grpo" and config.grpo.num_iterations > 1:
        # GRPO updates num_iterations times per step; the optimizer counts updates, the schedule steps
        per_update = lambda count, n=config.grpo.num_iterations: schedule(count // n)  # noqa: E731
        updates = total_steps * config.grpo.num_iterations
    chain = []
    if train.grad_clip_norm is not None and not train.grad_clip_per_group:
        chain.append(optax.clip_by_global_norm(train.grad_clip_norm))
    chain += method_of(config).optimizer(config, _grouped(config, per_update), updates)
    return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=_NEVER), schedule
