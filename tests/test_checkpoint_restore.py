"""`RunCheckpointer.restore`: a checkpoint holding state this code no longer builds (older code's extra
optimizer group) restores every array the run needs; one lacking any of them is refused, never filled
in from the template."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax.training import RunCheckpointer


def _checkpointer(directory):
    return RunCheckpointer(directory, keep=None, async_save=False, fingerprint={"model": "m", "method": "lora"})


def test_state_older_code_kept_beside_the_run_is_left_on_disk(tmp_path):
    saved = {"trainable": jnp.arange(4.0), "groups": {"default": jnp.ones(2), "retired": {"count": jnp.int32(7)}}}
    _checkpointer(tmp_path).save(3, saved, {"data_position": {"epoch": 0, "step": 3}})
    wanted = {"trainable": jnp.zeros(4), "groups": {"default": jnp.zeros(2)}}
    state, meta = _checkpointer(tmp_path).restore(3, wanted)
    np.testing.assert_array_equal(state["trainable"], np.arange(4.0))
    np.testing.assert_array_equal(state["groups"]["default"], np.ones(2))
    assert jax.tree.structure(state) == jax.tree.structure(wanted) and meta["data_position"]["step"] == 3


def test_a_checkpoint_lacking_part_of_the_state_is_refused(tmp_path):
    _checkpointer(tmp_path).save(3, {"trainable": jnp.arange(4.0)}, {})
    with pytest.raises(ValueError, match="tree structures do not match"):
        _checkpointer(tmp_path).restore(3, {"trainable": jnp.zeros(4), "moments": jnp.zeros(4)})
