"""Examples to batches: truncation, loss mask on answer tokens, padding to length buckets, packing.

A batch is a dict of numpy arrays, [B, T] but for the last:
  tokens int32          model input
  targets int32         the next token at each position
  loss_mask float32     1 where the target is an answer token
  segment_ids int32     0 = padding; 1, 2, ... for the sequences packed in a row
  positions int32       position within its own sequence (restarts at 0 for each packed sequence)
  loss_positions int32  [B, K]: the columns where loss_mask is set, in order, then -1 (K: `loss_slots`)

The model computes logits only at `loss_positions` when K < T (the head is a large share of a small
model's work, and classification supervises one token in tens). K comes from a few buckets (powers of
two), so a run compiles few shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from hyjax.data.examples import Example

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "loss_positions")


def truncate(example: Example, max_length: int) -> tuple[Example, str | None]:
    """Fit `example` into `max_length` positions: drop prompt tokens from the left, keep the answer.

    When the answer alone does not fit after one prompt token, the answer is cut on the right. Returns
    the example and "prompt", "answer" or None for what was cut.
    """
    if max_length < 1:
        raise ValueError(f"{max_length=} must be at least 1.")
    if len(example) <= max_length:
        return example, None
    room = max_length + 1  # tokens that fit: positions + the last target
    answer = example.answer_ids
    if len(answer) + 1 <= room:
        prompt = example.prompt_ids[len(example.prompt_ids) - (room - len(answer)) :]
        return dataclasses.replace(example, prompt_ids=prompt), "prompt"
    return dataclasses.replace(example, prompt_ids=example.prompt_ids[-1:], answer_ids=answer[: room - 1]), "answer"


def round_up(length: int, bucket: int, max_length: int) -> int:
    """`length` rounded up to a multiple of `bucket`, capped at `max_length`."""
    if bucket < 1:
        raise ValueError(f"{bucket=} must be at least 1.")
    return min(-(-length // bucket) * bucket, max_length)


def loss_slots(count: int, length: int) -> int:
    """K for rows of `length` columns holding at most `count` loss tokens each: the smallest power of
    two >= count, or `length` itself when that is not smaller (then every position gets logits)."""
    slots = 1 << max(int(count) - 1, 0).bit_length()
    return length if slots >= length else slots


def loss_positions(loss_mask: np.ndarray, slots: int) -> np.ndarray:
    """`[B, slots]`: each row's loss columns in order, padded with -1 (error if a row has more)."""
    out = np.full((loss_mask.shape[0], slots), -1, np.int32)
    for row, mask in enumerate(loss_mask):
        where = np.flatnonzero(mask)
        if len(where) > slots:
            raise ValueError(f"row {row} has {len(where)} loss tokens, over {slots=}.")
        out[row, : len(where)] = where
    return out


def _with_loss_positions(batch: dict[str, np.ndarray], slots: int | None) -> dict[str, np.ndarray]:
    if slots is None:
        slots = loss_slots(int(np.max(np.sum(batch["loss_mask"] > 0, axis=1), initial=0)), batch["tokens"].shape[1])
    batch["loss_positions"] = loss_positions(batch["loss_mask"], slots)
    return batch


def _empty(rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full((rows, length), pad_id, np.int32),
        "targets": np.full((rows, length), pad_id, np.int32),
        "loss_mask": np.zeros((rows, length), np.float32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "positions": np.zeros((rows, length), np.int32),
    }


def _place(batch: dict[str, np.ndarray], row: int, start: int, example: Example, segment: int) -> int:
    """Write `example` into `batch[row]` from column `start`; returns the next free column."""
    seq = np.asarray(example.prompt_ids + example.answer_ids, np.int32)
    n = len(seq) - 1
    end = start + n
    batch["tokens"][row, start:end] = seq[:-1]
    batch["targets"][row, start:end] = seq[1:]
    # position j predicts seq[j + 1]; answer tokens are seq[P:], so the mask starts at j = P - 1.
    batch["loss_mask"][row, start + len(example.prompt_ids) - 1 : end] = 1.0
    batch["segment_ids"][row, start:end] = segment
    batch["positions"][row, start:end] = np.arange(n, dtype=np.int32)
    return end


def pad_batch(examples: Sequence[Example | None], length: int, pad_id: int,
              slots: int | None = None) -> dict[str, np.ndarray]:
    """One example per row, padded to `length` columns; None gives an all-padding row. `slots`: K of
    `loss_positions` (default: `loss_slots` of these rows)."""
    batch = _empty(len(examples), length, pad_id)
    for row, example in enumerate(examples):
        if example is not None:
            if len(example) > length:
                raise ValueError(f"example of {len(example)} positions does not fit {length=}; truncate first.")
            _place(batch, row, 0, example, 1)
    return _with_loss_positions(batch, slots)


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy next-fit packing in order: indices of the examples in each row (each of length <= max_length)."""
    rows: list[list[int]] = []
    used = max_length + 1
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} positions, over {max_length=}; truncate first.")
        if used + n > max_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], length: int, pad_id: int,
                 slots: int | None = None) -> dict[str, np.ndarray]:
    """Several examples per row, segments 1, 2, ... with positions restarting at 0; an empty row is padding.
    `slots`: K of `loss_positions` (default: `loss_slots` of these rows)."""
    batch = _empty(len(rows), length, pad_id)
    for r, examples in enumerate(rows):
        start = 0
        for segment, example in enumerate(examples, start=1):
            start = _place(batch, r, start, example, segment)
            if start > length:
                raise ValueError(f"row {r} holds {start} positions, over {length=}.")
    return _with_loss_positions(batch, slots)
