"""A step whose loss or gradient is not finite changes no weight, for every method: the trainable
parameters, the optimizer's inner state (moments, the hybrid's lambdas), the zeroth-order base weights
and the adapters' frozen parts stay as they were; the step counts as taken and skipped."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hyjax.config import load_config
from hyjax.methods.registry import METHODS
from hyjax.training import distributed, prepare_run, run_layout
from test_train_run import tiny_run_overrides


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_step_with_a_non_finite_loss_changes_no_weight(method, tiny_checkpoint, sentiment_data, tmp_path):
    config = load_config(None, tiny_run_overrides(tiny_checkpoint, sentiment_data, tmp_path / "run",
                                                  f"method.name={method}", "method.lora_ga.n_batches=2",
                                                  "method.hybrid_lora.n_batches=2", "train.micro_batch_size=2"))
    setup = prepare_run(config, layout=run_layout(config.mesh), log=lambda text: None)
    local = next(setup.data.train)
    local["loss_mask"][3, -1] = np.nan  # one answer-mask entry of the second of two micro-batches
    batch = distributed.global_batch(local, setup.plan.shardings.batch, config.train.grad_accum_steps,
                                     config.train.global_batch_size)
    state = setup.initial_state()
    before = jax.device_get(state)  # the jitted step may donate the state's buffers
    after, metrics = setup.plan.train_step()(state, setup.frozen, batch)
    after = jax.device_get(after)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(before.step) + 1
    assert (before.base is not None) == (method == "zo_fo")
    for part in ("trainable", "base"):
        kept, was = jax.tree.leaves(getattr(after, part)), jax.tree.leaves(getattr(before, part))
        assert len(kept) == len(was)
        for a, b in zip(kept, was):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after.opt_state.inner_state), jax.tree.leaves(before.opt_state.inner_state)):
        np.testing.assert_array_equal(a, b)
