"""`prepare`: a `DataConfig` (file + task) and a tokenizer to a resumable, sharded `BatchIterator` (for `hyjax.train`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hyjax.data.config import TASKS, DataConfig
from hyjax.data.examples import PromptStyle, build_examples
from hyjax.data.iterator import BatchIterator
from hyjax.data.reading import Rows, load_rows
from hyjax.data.report import BadRowLimit, DataReport
from hyjax.data.split import train_eval_split


def make_task(config: DataConfig):
    """The task format named by `config.task`, with `config.task_options()` and the prompt style."""
    return TASKS[config.task](**config.task_options(), prompt=PromptStyle(chat=config.chat, system=config.system))


@dataclasses.dataclass
class PreparedData:
    train: BatchIterator  # this process's training batches
    eval_rows: Rows | None  # held-out rows (for `classification_accuracy` / `math_exact_match`)
    task: Any  # the task format, for evaluation
    report: DataReport


def prepare(
    config: DataConfig,
    tokenizer,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    position: Mapping[str, int] | None = None,
    cache_dir: str | None = None,
) -> PreparedData:
    """Read, hold out, tokenize and batch the data of `config` into batches of `global_batch_size` rows
    over all processes (every process does the same, cheaply)."""
    if config.path is None:
        raise ValueError("data.path is not set: give the training file (e.g. data.path=train.tsv)")
    task = make_task(config)
    rows = load_rows(config.path, format=config.format, split=config.split, cache_dir=cache_dir)
    if config.max_rows is not None and len(rows) > config.max_rows:
        rows = rows.select(range(config.max_rows))
    eval_rows = None
    if config.eval_fraction is not None or config.eval_count is not None:
        rows, eval_rows = train_eval_split(
            rows, fraction=config.eval_fraction, count=config.eval_count, seed=config.shuffle_seed
        )
    limit = BadRowLimit(max_fraction=config.max_bad_fraction, max_rows=config.max_bad_rows)
    examples, report = build_examples(rows, task, tokenizer, limit=limit)
    train = BatchIterator(
        examples,
        global_batch_size=global_batch_size,
        max_length=config.max_length,
        pad_id=tokenizer.pad_id,
        seed=config.shuffle_seed,
        pack=config.packing,
        bucket=config.bucket,
        process_index=process_index,
        process_count=process_count,
        report=report,
        position=position,
    )
    task = task.resolve(rows.column_names, rows.path)
    return PreparedData(train=train, eval_rows=eval_rows, task=task, report=report)
