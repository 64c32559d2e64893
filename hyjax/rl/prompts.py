"""GRPO's prompts: the rows of the training file a step samples completions of, in an order drawn per
epoch (the same on every process), with the position a checkpoint keeps to resume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hyjax.data import make_task, training_rows
from hyjax.data.iterator import epoch_order
from hyjax.data.report import MalformedRow


class PromptBatches:
    """The prompts of each step: `count` rows of the training file a step, in an order drawn per epoch
    from `seed` (the same on every process), as `(row indices, prompt token ids, rows)`. `position`
    (epoch, step) is what a checkpoint keeps to resume."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], task, tokenizer, *, count: int, seed: int,
                 max_prompt_tokens: int, position: Mapping[str, int] | None = None):
        self.rows, self.prompts = [], []
        for row in rows:
            try:
                prompt = task.example(row, tokenizer).prompt_ids
            except MalformedRow:
                continue  # counted and limited when the data was prepared
            if len(prompt) <= max_prompt_tokens:
                self.rows.append(row)
                self.prompts.append(list(prompt))
        if len(self.rows) < count:
            raise ValueError(f"{len(self.rows)} questions of the training file fit data.max_length with "
                             f"grpo.max_new_tokens to spare, fewer than the {count} a step needs; raise "
                             "data.max_length, lower grpo.max_new_tokens or add data")
        self.count, self.seed = count, seed
        self.epoch, self.step = (position["epoch"], position["step"]) if position else (0, 0)

    @classmethod
    def of_run(cls, config, tokenizer, *, count: int, seed: int,
               position: Mapping[str, int] | None = None) -> "PromptBatches":
        """The prompts of `config`'s training file, those that fit `data.max_length` with
        `grpo.max_new_tokens` to spare."""
        rows = training_rows(config.data)
        task = make_task(config.data).resolve(rows.column_names, rows.path)
        return cls(rows, task, tokenizer, count=count, seed=seed, position=position,
                   max_prompt_tokens=config.data.max_length - config.grpo.max_new_tokens)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.count

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "prompts": len(self.rows)}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[list[int], list[list[int]], list[Mapping[str, Any]]]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        order = epoch_order(len(self.rows), self.seed, self.epoch)
        chosen = [int(i) for i in order[self.step * self.count:(self.step + 1) * self.count]]
        self.step += 1
        return chosen, [self.prompts[i] for i in chosen], [self.rows[i] for i in chosen]
