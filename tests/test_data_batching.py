"""Batches: truncation, padding buckets, packing, shuffling, resumption, process sharding, the masked loss."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyjax.data import (
    BATCH_KEYS,
    BatchIterator,
    DataReport,
    Example,
    epoch_order,
    masked_cross_entropy,
    pack_rows,
    packed_batch,
    pad_batch,
    round_up,
    truncate,
)

PAD = 0
ONE = {"process_index": 0, "process_count": 1}  # a single-process run


def make_examples(n: int, seed: int = 0, max_prompt: int = 20, max_answer: int = 8) -> list[Example]:
    """Examples whose ids say where they come from: prompt ids 100 + k, answer ids 1000 * (k + 1) + j."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        p, a = int(rng.integers(1, max_prompt)), int(rng.integers(1, max_answer))
        out.append(Example(tuple([100 + k] * p), tuple(1000 * (k + 1) + j for j in range(a)), line=k + 1))
    return out


def example_of(batch, row, start, stop):
    """The example occupying columns [start, stop) of a row: (prompt ids, answer ids)."""
    tokens, targets, mask = (batch[k][row, start:stop] for k in ("tokens", "targets", "loss_mask"))
    seq = [*tokens, targets[-1]]
    first_answer = int(np.argmax(mask)) + 1
    return tuple(seq[:first_answer]), tuple(seq[first_answer:])


def check_batch_types(batch, rows, length):
    assert set(batch) == set(BATCH_KEYS)
    for key in BATCH_KEYS:
        width = batch["loss_positions"].shape[1] if key == "loss_positions" else length
        assert batch[key].shape == (rows, width), key
        assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32), key


# ---- truncation and padding --------------------------------------------------------------------


def test_truncation_drops_the_prompt_from_the_left_and_keeps_the_answer():
    ex = Example((1, 2, 3, 4, 5, 6), (7, 8, 9))
    assert len(ex) == 8
    assert truncate(ex, 8) == (ex, None)
    short, cut = truncate(ex, 5)
    assert cut == "prompt" and short.prompt_ids == (4, 5, 6) and short.answer_ids == (7, 8, 9) and len(short) == 5
    tiny, cut = truncate(ex, 2)
    assert cut == "answer" and tiny.prompt_ids == (6,) and tiny.answer_ids == (7, 8) and len(tiny) == 2


def test_truncation_is_counted_by_the_iterator():
    examples = [Example((1,) * 50, (2, 3)), Example((1,) * 5, (2,) * 40), Example((1,) * 3, (2,))]
    report = DataReport("x")
    it = BatchIterator(examples, global_batch_size=3, max_length=16, pad_id=PAD, report=report, **ONE)
    assert (report.truncated_prompt, report.truncated_answer) == (1, 1)
    batch = it.global_batch(0, 0)
    assert batch["tokens"].shape == (3, 16) and batch["loss_mask"].sum() == 2 + 16 + 1  # the cut answer fills all 16


def test_padding_rounds_up_to_the_bucket_and_caps_at_max_length():
    assert [round_up(n, 64, 200) for n in (1, 64, 65, 130, 199)] == [64, 64, 128, 192, 200]
    examples = [Example((5,) * 10, (6, 7)), Example((5,) * 70, (6,))]
    it = BatchIterator(examples, global_batch_size=1, max_length=100, pad_id=PAD, shuffle=False, **ONE)
    check_batch_types(it.global_batch(0, 0), 1, 64)
    check_batch_types(it.global_batch(0, 1), 1, 100)  # 70 positions -> 128, capped at 100
    batch = pad_batch(examples[:1], 64, PAD)
    assert batch["segment_ids"][0].tolist() == [1] * 11 + [0] * 53
    assert batch["positions"][0, :11].tolist() == list(range(11)) and not batch["positions"][0, 11:].any()
    assert batch["loss_mask"][0].tolist() == [0.0] * 9 + [1.0] * 2 + [0.0] * 53
    assert batch["targets"][0, 9:11].tolist() == [6, 7] and (batch["tokens"][0, 11:] == PAD).all()


def test_padded_batches_hold_every_example_once_per_epoch():
    examples = make_examples(37)
    it = BatchIterator(examples, global_batch_size=4, max_length=64, pad_id=PAD, bucket=16, **ONE)
    assert it.steps_per_epoch() == 9  # 37 // 4, remainder dropped
    seen = []
    for step in range(9):
        batch = it.global_batch(0, step)
        longest = int(batch["segment_ids"].sum(1).max())
        check_batch_types(batch, 4, round_up(longest, 16, 64))
        for row in range(4):
            n = int(batch["segment_ids"][row].sum())
            seen.append(example_of(batch, row, 0, n))
    assert len(set(seen)) == 36 and set(seen) <= {(e.prompt_ids, e.answer_ids) for e in examples}


def test_last_partial_batch_is_padding_when_kept():
    it = BatchIterator(make_examples(5), global_batch_size=4, max_length=64, pad_id=PAD,
                        drop_remainder=False, **ONE)
    assert it.steps_per_epoch() == 2
    last = it.global_batch(0, 1)
    assert last["segment_ids"][0].any() and not last["segment_ids"][1:].any() and not last["loss_mask"][1:].any()


# ---- packing -----------------------------------------------------------------------------------


def test_pack_rows_never_splits_an_example():
    assert pack_rows([3, 4, 2, 6, 1], 7) == [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="truncate first"):
        pack_rows([8], 7)


def test_packed_rows_have_segments_and_restarting_positions():
    examples = make_examples(50, max_prompt=30, max_answer=10)
    it = BatchIterator(examples, global_batch_size=2, max_length=64, pad_id=PAD, pack=True, **ONE)
    found = []
    for step in range(it.steps_per_epoch(0)):
        batch = it.global_batch(0, step)
        check_batch_types(batch, 2, 64)
        for row in range(2):
            seg = batch["segment_ids"][row]
            used = int((seg > 0).sum())
            assert (seg[:used] > 0).all() and not seg[used:].any()  # padding only at the end
            assert np.all(np.diff(seg[:used]) >= 0) and seg[0] == 1
            for s in range(1, int(seg.max()) + 1):
                cols = np.flatnonzero(seg == s)
                assert (np.diff(cols) == 1).all()  # contiguous
                assert batch["positions"][row, cols].tolist() == list(range(len(cols)))
                found.append(example_of(batch, row, cols[0], cols[-1] + 1))
            assert not batch["loss_mask"][row, used:].any()
    total_rows = len(it._rows(0))
    assert it.steps_per_epoch(0) == total_rows // 2
    # every example appears whole, once (those in a dropped last row aside)
    everything = {(e.prompt_ids, e.answer_ids) for e in examples}
    assert len(found) == len(set(found)) and set(found) <= everything
    assert len(found) >= len(examples) - max(len(r) for r in it._rows(0))
    assert sum(len(r) for r in it._rows(0)) == 50


def test_packed_batch_rejects_overfull_rows():
    with pytest.raises(ValueError):
        packed_batch([[Example((1,) * 5, (2,)), Example((1,) * 5, (2,))]], 8, PAD)


# ---- order, resumption, sharding ---------------------------------------------------------------


def test_shuffling_is_deterministic_by_seed_and_differs_across_epochs():
    a = [epoch_order(100, seed=1, epoch=e) for e in range(3)]
    b = [epoch_order(100, seed=1, epoch=e) for e in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[1], a[2])
    assert not np.array_equal(a[0], epoch_order(100, seed=2, epoch=0))
    assert sorted(a[0]) == list(range(100))
    assert np.array_equal(epoch_order(10, 0, 3, shuffle=False), np.arange(10))


def stream(it, n):
    return [next(it) for _ in range(n)]


def same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("pack", [False, True])
def test_resuming_at_epoch_and_step_reproduces_the_uninterrupted_run(pack):
    examples = make_examples(45)
    kw = dict(global_batch_size=4, max_length=64, pad_id=PAD, seed=7, pack=pack, bucket=8, **ONE)
    full_it = BatchIterator(examples, **kw)
    steps = sum(full_it.steps_per_epoch(e) for e in range(3)) + 2  # into a fourth epoch
    full = stream(full_it, steps)
    assert not np.array_equal(full[0]["tokens"], full[full_it.steps_per_epoch(0)]["tokens"])  # reshuffled
    for cut in (1, full_it.steps_per_epoch(0), full_it.steps_per_epoch(0) + 3):
        first = BatchIterator(examples, **kw)
        before = stream(first, cut)
        position = dict(first.position)  # what a checkpoint stores
        resumed = BatchIterator(examples, **kw, position=position)
        same(before + stream(resumed, steps - cut), full)
    with pytest.raises(ValueError, match="seed=7"):
        BatchIterator(examples, **{**kw, "seed": 8}, position=position)
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator(examples[:-1], **kw, position=position)
    with pytest.raises(ValueError, match="global_batch_size=4, this run has 8"):
        BatchIterator(examples, **{**kw, "global_batch_size": 8}, position=position)
    with pytest.raises(ValueError, match="cannot resume"):
        BatchIterator(examples, **kw, position={"epoch": 0, "step": 10_000})


@pytest.mark.parametrize("pack", [False, True])
def test_two_processes_concatenate_to_the_one_process_batch(pack):
    examples = make_examples(40)
    kw = dict(global_batch_size=6, max_length=64, pad_id=PAD, seed=3, pack=pack, bucket=16)
    one = BatchIterator(examples, **kw, **ONE)
    two = [BatchIterator(examples, **kw, process_index=p, process_count=2) for p in range(2)]
    for step in range(one.steps_per_epoch(1)):
        whole = one.batch(1, step)
        parts = [it.batch(1, step) for it in two]
        for key in BATCH_KEYS:
            assert parts[0][key].shape == parts[1][key].shape == (3, whole[key].shape[1])
            np.testing.assert_array_equal(whole[key][0::2], parts[0][key])
            np.testing.assert_array_equal(whole[key][1::2], parts[1][key])


def test_global_batch_must_divide_by_the_process_count():
    with pytest.raises(ValueError, match=r"global_batch_size=6 must be a positive multiple of the process count 4"):
        BatchIterator(make_examples(10), global_batch_size=6, max_length=64, pad_id=PAD, process_index=0,
                      process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        BatchIterator(make_examples(10), global_batch_size=4, max_length=64, pad_id=PAD, process_index=2,
                      process_count=2)


def test_too_few_examples_for_a_batch_is_an_error():
    it = BatchIterator(make_examples(3), global_batch_size=4, max_length=64, pad_id=PAD, **ONE)
    with pytest.raises(ValueError, match="no full batch"):
        next(it)


def test_iterator_defaults_to_the_jax_process_layout():
    it = BatchIterator(make_examples(8), global_batch_size=4, max_length=64, pad_id=PAD)
    assert (it.process_index, it.process_count) == (jax.process_index(), jax.process_count())


# ---- the loss ----------------------------------------------------------------------------------


def reference_loss(logits, targets, mask):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return (nll * mask).sum() / max(mask.sum(), 1.0)


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    it = BatchIterator(make_examples(40), global_batch_size=4, max_length=64, pad_id=PAD, pack=True, **ONE)
    batch = it.global_batch(0, 0)
    vocab = 9000
    targets = batch["targets"] % vocab
    logits = rng.normal(scale=3.0, size=(*targets.shape, vocab)).astype(np.float32)
    got = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(float(got), reference_loss(logits, targets, batch["loss_mask"]), rtol=1e-5)
    bf16 = masked_cross_entropy(jnp.asarray(logits, jnp.bfloat16), targets, batch["loss_mask"])
    assert bf16.dtype == jnp.float32
    assert float(masked_cross_entropy(logits, targets, np.zeros_like(batch["loss_mask"]))) == 0.0


def test_masked_cross_entropy_gradient_is_zero_off_the_mask():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)).astype(np.int32))
    mask = jnp.asarray([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], jnp.float32)
    grad = jax.jit(jax.grad(masked_cross_entropy))(logits, targets, mask)
    assert not np.asarray(grad)[np.asarray(mask) == 0].any()
    assert np.abs(np.asarray(grad)[np.asarray(mask) == 1]).sum() > 0


def test_packed_and_padded_batches_give_each_example_its_own_loss_through_the_model():
    """End to end with a tiny LLaMA: a packed example's loss equals its loss when alone in a padded row."""
    from hyjax import model as M

    config = M.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2
    )
    params = M.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    examples = [
        Example(tuple(rng.integers(3, 64, size=p).tolist()), tuple(rng.integers(3, 64, size=a).tolist()))
        for p, a in ((5, 3), (9, 2), (4, 6), (7, 1))
    ]

    @jax.jit
    def loss_fn(params, batch):
        logits = M.apply(config, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])

    alone = [float(loss_fn(params, pad_batch([e], 32, PAD))) for e in examples]
    packed = packed_batch([examples[:2], examples[2:]], 32, PAD)
    per_token = sum(a * len(e.answer_ids) for a, e in zip(alone, examples)) / sum(len(e.answer_ids) for e in examples)
    np.testing.assert_allclose(float(loss_fn(params, packed)), per_token, rtol=1e-5)
    padded = pad_batch(examples + [None], 32, PAD)  # includes an all-padding row
    np.testing.assert_allclose(float(loss_fn(params, padded)), per_token, rtol=1e-5)
    grads = jax.grad(loss_fn)(params, padded)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
