"""`BatchIterator`: deterministic per-epoch shuffling, resumable (epoch, step) position, per-process rows.

The global batch for (epoch, step) depends only on (examples, seed, epoch, step) and the batching
settings, so a resumed run sees exactly the data an uninterrupted run would, and process p of n takes
rows [p::n] of that same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np

from hyjax.data.batching import loss_slots, pack_rows, packed_batch, pad_batch, round_up, truncate
from hyjax.data.examples import Example
from hyjax.data.report import DataReport


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Order of the examples in `epoch`: a permutation drawn from (seed, epoch), the same on every host."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"{process_index=} must be in [0, {process_count=}).")
    return process_index, process_count


class BatchIterator:
    """Batches of `examples` by (epoch, step), resumable, sharded across processes.

    Args:
      examples: from `build_examples`.
      global_batch_size: rows per step over all processes; must divide by the process count.
      max_length: positions per row at most; longer examples are truncated (prompt from the left).
      pad_id: token id written in padding (masked out of the loss).
      seed: shuffling seed; epoch e uses the permutation drawn from (seed, e).
      pack: pack several examples per row (rows of exactly `max_length`) instead of one padded example.
      bucket: without packing, T is the longest example of the global batch rounded up to a multiple
        of `bucket`, capped at `max_length` (few distinct shapes, so few compilations).
      shuffle: False keeps file order (evaluation).
      drop_remainder: drop the last incomplete batch of an epoch; False fills it with padding rows.
      process_index, process_count: this process and how many there are (default: from jax).
      report: a `DataReport` to count truncations in.
      position: where to start, as returned by `position` (default: epoch 0, step 0).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        global_batch_size: int,
        max_length: int,
        pad_id: int,
        seed: int = 0,
        pack: bool = False,
        bucket: int = 64,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        report: DataReport | None = None,
        position: Mapping[str, int] | None = None,
    ):
        self.process_index, self.process_count = _process_layout(process_index, process_count)
        if global_batch_size < 1 or global_batch_size % self.process_count:
            raise ValueError(
                f"{global_batch_size=} must be a positive multiple of the process count {self.process_count} "
                "(each process takes an equal share of every global batch)."
            )
        if not examples:
            raise ValueError("no examples to batch.")
        round_up(1, bucket, max_length)  # validates bucket
        self.global_batch_size = global_batch_size
        self.max_length = max_length
        self.pad_id = pad_id
        self.seed = seed
        self.pack = pack
        self.bucket = bucket
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.examples = []
        for example in examples:
            example, cut = truncate(example, max_length)
            if report is not None and cut is not None:
                setattr(report, f"truncated_{cut}", getattr(report, f"truncated_{cut}") + 1)
            self.examples.append(example)
        self._lengths = np.asarray([len(e) for e in self.examples])
        self._plan_epoch: int | None = None
        self._plan: list[list[int]] = []
        self.epoch, self.step = 0, 0
        if position is not None:
            self.restore(position)

    # ---- the plan of one epoch -------------------------------------------------------------------

    def _rows(self, epoch: int) -> list[list[int]]:
        """Example indices of each row of `epoch`, in order (one per row without packing)."""
        if self._plan_epoch != epoch:
            order = epoch_order(len(self.examples), self.seed, epoch, self.shuffle)
            if self.pack:
                self._plan = [[int(order[k]) for k in row] for row in pack_rows(self._lengths[order], self.max_length)]
            else:
                self._plan = [[int(i)] for i in order]
            self._plan_epoch = epoch
        return self._plan

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Steps in `epoch` (with packing it can differ a little between epochs)."""
        rows = len(self._rows(epoch))
        return rows // self.global_batch_size if self.drop_remainder else -(-rows // self.global_batch_size)

    def _global_rows(self, epoch: int, step: int) -> list[list[int]]:
        steps = self.steps_per_epoch(epoch)
        if not 0 <= step < steps:
            raise IndexError(f"{step=} is outside epoch {epoch}, which has {steps} steps.")
        rows = self._rows(epoch)[step * self.global_batch_size : (step + 1) * self.global_batch_size]
        return rows + [[]] * (self.global_batch_size - len(rows))

    def global_batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """The whole batch of (epoch, step), as a single-process run sees it."""
        return self._build(self._global_rows(epoch, step), slice(None))

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This process's rows [process_index::process_count] of the global batch of (epoch, step)."""
        return self._build(self._global_rows(epoch, step), slice(self.process_index, None, self.process_count))

    def _build(self, rows: list[list[int]], mine: slice) -> dict[str, np.ndarray]:
        # T and K (loss slots) from the global batch, so every process and micro-batch gets the same shapes.
        most_answers = max(sum(len(self.examples[i].answer_ids) for i in row) for row in rows)
        if self.pack:
            slots = loss_slots(most_answers, self.max_length)
            return packed_batch([[self.examples[i] for i in row] for row in rows[mine]], self.max_length, self.pad_id,
                                slots)
        longest = max((int(self._lengths[row[0]]) for row in rows if row), default=1)
        length = round_up(longest, self.bucket, self.max_length)
        return pad_batch([self.examples[row[0]] if row else None for row in rows[mine]], length, self.pad_id,
                         loss_slots(most_answers, length))

    # ---- iteration and resumption -------------------------------------------------------------

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch comes from, to checkpoint: epoch, step, and what must match on resume."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "global_batch_size": self.global_batch_size,
        }

    def restore(self, position: Mapping[str, int]) -> None:
        """Continue from a checkpointed `position` (seed, example count and batch size must match)."""
        for key in ("seed", "num_examples", "global_batch_size"):
            mine = self.position[key]
            if key in position and int(position[key]) != mine:
                raise ValueError(f"checkpointed data position has {key}={position[key]}, this run has {mine}.")
        epoch, step = int(position["epoch"]), int(position["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch(epoch):
            steps = self.steps_per_epoch(max(epoch, 0))
            raise ValueError(f"cannot resume at {epoch=}, {step=}: epoch {epoch} has {steps} steps.")
        self.epoch, self.step = epoch, step

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """This process's next batch; epochs follow one another without end."""
        while self.step >= self.steps_per_epoch(self.epoch):
            if self.steps_per_epoch(self.epoch) == 0 and self.step == 0:
                raise ValueError(
                    f"{len(self.examples)} examples make no full batch of {self.global_batch_size}; "
                    "lower global_batch_size or set drop_remainder=False."
                )
            self.epoch, self.step = self.epoch + 1, 0
        batch = self.batch(self.epoch, self.step)
        self.step += 1
        return batch
