"""`DataConfig` and `prepare`: file + task + tokenizer to a resumable, sharded `BatchIterator` (for `hyjax.train`)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from hyjax.data.classification import Classification
from hyjax.data.examples import PromptStyle, build_examples
from hyjax.data.instructions import Instructions
from hyjax.data.iterator import BatchIterator
from hyjax.data.math_problems import MathWordProblems
from hyjax.data.reading import Rows, load_rows
from hyjax.data.report import BadRowLimit, DataReport
from hyjax.data.split import train_eval_split

# Task name -> task format class.
TASKS = {
    "sst2": Classification,
    "classification": Classification,
    "gsm8k": MathWordProblems,
    "math": MathWordProblems,
    "instructions": Instructions,
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str  # tsv/csv/jsonl/parquet file or save_to_disk folder
    task: str = "sst2"  # one of TASKS
    # fields of the task class (template, text_column, answers, final_only, ...)
    task_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format: str | None = None  # None: from the suffix
    split: str | None = None  # split of a saved DatasetDict
    chat: bool | str = "auto"  # use the tokenizer's chat template: "auto" (if it has one), True, False
    system: str | None = None  # system message in chat mode
    max_bad_fraction: float | None = 0.01  # stop when more than this share of rows is malformed...
    max_bad_rows: int | None = 100  # ...or more than this many
    max_length: int = 512  # positions per batch row; longer examples lose prompt tokens from the left
    bucket: int = 64  # padding rounds T up to a multiple of this (no packing)
    pack: bool = False  # pack several examples per row instead of padding each
    global_batch_size: int = 8  # rows per step over all processes
    seed: int = 0  # shuffling (per epoch) and held-out split
    eval_fraction: float | None = None  # hold out this share of the file for evaluation...
    eval_count: int | None = None  # ...or this many rows
    max_rows: int | None = None  # use only the first N rows of the file (before holding out)


def make_task(config: DataConfig):
    """The task format named by `config.task`, with `config.task_options` and the prompt style."""
    if config.task not in TASKS:
        close = difflib.get_close_matches(config.task, list(TASKS), n=3)
        raise ValueError(f"unknown task {config.task!r}; expected one of {sorted(TASKS)} (closest: {close}).")
    cls = TASKS[config.task]
    fields = {f.name for f in dataclasses.fields(cls)} - {"prompt"}
    for key in config.task_options:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            raise ValueError(
                f"unknown option {key!r} for task {config.task!r}; valid: {sorted(fields)} (closest: {close})."
            )
    return cls(**config.task_options, prompt=PromptStyle(chat=config.chat, system=config.system))


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
    process_index: int | None = None,
    process_count: int | None = None,
    position: Mapping[str, int] | None = None,
    cache_dir: str | None = None,
) -> PreparedData:
    """Read, hold out, tokenize and batch the data of `config` (every process does the same, cheaply)."""
    task = make_task(config)
    rows = load_rows(config.path, format=config.format, split=config.split, cache_dir=cache_dir)
    if config.max_rows is not None and len(rows) > config.max_rows:
        rows = rows.select(range(config.max_rows))
    eval_rows = None
    if config.eval_fraction is not None or config.eval_count is not None:
        rows, eval_rows = train_eval_split(
            rows, fraction=config.eval_fraction, count=config.eval_count, seed=config.seed
        )
    limit = BadRowLimit(max_fraction=config.max_bad_fraction, max_rows=config.max_bad_rows)
    examples, report = build_examples(rows, task, tokenizer, limit=limit)
    train = BatchIterator(
        examples,
        global_batch_size=config.global_batch_size,
        max_length=config.max_length,
        pad_id=tokenizer.pad_id,
        seed=config.seed,
        pack=config.pack,
        bucket=config.bucket,
        process_index=process_index,
        process_count=process_count,
        report=report,
        position=position,
    )
    task = task.resolve(rows.column_names, rows.path)
    return PreparedData(train=train, eval_rows=eval_rows, task=task, report=report)
