"""Logits only where the loss is: the batches' `loss_positions`, and a loss and gradients equal to the
full-logits computation (packing, gradient accumulation, several processes' shares of one batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax import adapters
from hyjax import model as M
from hyjax.adapters import LoRAConfig
from hyjax.data import BatchIterator, Example, loss_positions, loss_slots
from hyjax.training.step import answer_nll_sum

CONFIG = M.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2)


def _examples(count: int, seed: int) -> list[Example]:
    """Prompts of 3..20 tokens, answers of 1..5 (so packed rows hold several answers each)."""
    rng = np.random.default_rng(seed)
    return [Example(prompt_ids=tuple(int(t) for t in rng.integers(1, 100, rng.integers(3, 21))),
                    answer_ids=tuple(int(t) for t in rng.integers(1, 100, rng.integers(1, 6))))
            for _ in range(count)]


def test_loss_slots_are_powers_of_two_below_the_row_length():
    assert [loss_slots(n, 64) for n in (0, 1, 2, 3, 5, 8, 9, 32, 33)] == [1, 1, 2, 4, 8, 8, 16, 32, 64]
    assert loss_slots(20, 24) == 24 and loss_slots(16, 16) == 16
    mask = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(loss_positions(mask, 4), [[1, 2, 4, -1], [-1, -1, -1, -1], [0, -1, -1, -1]])
    with pytest.raises(ValueError, match="row 0 has 3 loss tokens"):
        loss_positions(mask, 2)


@pytest.mark.parametrize("pack", [False, True])
def test_every_process_and_micro_batch_gets_the_same_slots_covering_every_loss_token(pack):
    examples = _examples(64, 0)
    kwargs = dict(global_batch_size=8, max_length=48, pad_id=0, seed=3, pack=pack, bucket=16)
    whole = BatchIterator(examples, process_index=0, process_count=1, **kwargs)
    parts = [BatchIterator(examples, process_index=p, process_count=2, **kwargs) for p in range(2)]
    for step in range(whole.steps_per_epoch(0)):
        batch = whole.global_batch(0, step)
        slots = batch["loss_positions"].shape[1]
        counts = np.sum(batch["loss_mask"] > 0, axis=1)
        assert slots == loss_slots(int(counts.max()), batch["tokens"].shape[1])
        assert slots < batch["tokens"].shape[1]  # the head really runs on fewer positions
        for row, mask in enumerate(batch["loss_mask"]):
            np.testing.assert_array_equal(batch["loss_positions"][row, : counts[row]], np.flatnonzero(mask))
            assert np.all(batch["loss_positions"][row, counts[row]:] == -1)
        for p, part in enumerate(parts):  # each process's rows, with the global batch's K
            np.testing.assert_array_equal(part.batch(0, step)["loss_positions"], batch["loss_positions"][p::2])


def test_logits_at_positions_are_the_full_logits_there():
    params = M.init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, CONFIG.vocab_size)
    index = jnp.array([[0, 5], [11, 2], [7, 7]])
    full = M.apply(CONFIG, params, tokens)
    np.testing.assert_allclose(M.apply(CONFIG, params, tokens, logit_positions=index),
                               jnp.take_along_axis(full, index[..., None], axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pack", [False, True])
def test_loss_and_gradients_equal_the_full_logits_version(pack):
    """Two micro-batches accumulated, LoRA on every projection: the step's loss and gradients with the
    head at the loss positions equal those with logits everywhere, within 1e-5 relative (float32)."""
    params = M.init_params(CONFIG, jax.random.key(2))
    adapted = adapters.apply(adapters.AdapterSpec.for_method(LoRAConfig(rank=4)), params, jax.random.key(3))
    trainable, frozen = adapters.split_trainable(adapted)
    trainable = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), trainable)
    batches = BatchIterator(_examples(32, 1), global_batch_size=8, max_length=48, pad_id=0, seed=0, pack=pack,
                            bucket=16, process_index=0, process_count=1)
    batch = batches.global_batch(0, 0)
    assert batch["loss_positions"].shape[1] < batch["tokens"].shape[1]
    micro = {key: jnp.asarray(value.reshape(2, 4, -1)) for key, value in batch.items()}
    full = {key: value for key, value in micro.items() if key != "loss_positions"}

    @jax.jit
    def loss_and_grads(trainable, batch):
        def loss(t):
            sums = [answer_nll_sum(CONFIG, adapters.combine(t, frozen), jax.tree.map(lambda x: x[i], batch))
                    for i in range(2)]
            return sum(s[0] for s in sums) / sum(s[1] for s in sums)
        return jax.value_and_grad(loss)(trainable)

    gathered_loss, gathered_grads = loss_and_grads(trainable, micro)
    full_loss, full_grads = loss_and_grads(trainable, full)
    assert float(full_loss) > 1.0
    np.testing.assert_allclose(gathered_loss, full_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(gathered_grads), jax.tree.leaves(full_grads)):
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
