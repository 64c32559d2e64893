"""`prepare`: a `DataConfig` (file + task) and a tokenizer to a resumable, sharded `BatchIterator` (for
`hyjax.train`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from hyjax.data.config import TASKS, DataConfig
from hyjax.data.examples import PromptStyle, build_examples
from hyjax.data.iterator import BatchIterator
from hyjax.data.reading import Rows, load_rows
from hyjax.data.report import BadRowLimit, DataReport, MalformedDataError
from hyjax.data.split import train_eval_split


def make_task(config: DataConfig):
    """The task format named by `config.task`, with `config.task_options()` and the prompt style."""
    return TASKS[config.task](**config.task_options(), prompt=PromptStyle(chat=config.chat, system=config.system))


@dataclasses.dataclass
class PreparedData:
    train: BatchIterator  # this process's training batches
    eval_rows: Rows | None  # held-out rows: eval_path's, or those held out of the training file
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
    rows, eval_rows = _split_training_file(config, cache_dir)
    if config.eval_path is not None:
        eval_rows = load_rows(config.eval_path, format=config.format)
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


def training_rows(config: DataConfig) -> Rows:
    """The rows a run trains on: the training file's first `max_rows`, less those held out of it."""
    return _split_training_file(config)[0]


def _split_training_file(config: DataConfig, cache_dir: str | None = None) -> tuple[Rows, Rows | None]:
    """The training file's rows (its first `max_rows`), less the rows `eval_fraction`/`eval_count` hold
    out, and those held-out rows (None when nothing is held out)."""
    rows = load_rows(config.path, format=config.format, split=config.split, cache_dir=cache_dir)
    if config.max_rows is not None and len(rows) > config.max_rows:
        rows = rows.select(range(config.max_rows))
    if config.eval_fraction is None and config.eval_count is None:
        return rows, None
    return train_eval_split(rows, fraction=config.eval_fraction, count=config.eval_count, seed=config.shuffle_seed)


def evaluation_set(config: DataConfig, rows: Rows | None, num_examples: int | None) -> tuple[Rows, Any] | None:
    """`(rows, task)`: the first `num_examples` of held-out `rows` (all when None), with the task resolved
    against their columns (a separate eval file may name them differently: SST-2's dev.tsv does); None
    when there are no rows."""
    if rows is None:
        return None
    if num_examples is not None and len(rows) > num_examples:
        rows = rows.select(range(num_examples))
    return rows, make_task(config).resolve(rows.column_names, rows.path)


def check_held_out(rows: Rows, task, tokenizer, config: DataConfig) -> None:
    """Refuses held-out rows a run could not evaluate: more of them malformed than `config` allows for
    training rows (`MalformedDataError` naming their lines), or none usable. Tokenizes the rows (a run's
    are at most `eval.num_examples`), before anything is compiled."""
    limit = BadRowLimit(max_fraction=config.max_bad_fraction, max_rows=config.max_bad_rows)
    examples, _ = build_examples(rows, task, tokenizer, limit=limit)
    if not examples:
        raise MalformedDataError(f"{rows.path}: none of its {len(rows)} held-out rows makes an example")


def held_out_rows(config: DataConfig, num_examples: int | None) -> tuple[Rows, Any] | None:
    """`(rows, task)` a run evaluates on: `eval_path`'s rows, or those held out of the training file,
    at most `num_examples` of them (`evaluation_set`); None when the config holds nothing out. Reads no
    more than the files; tokenizes nothing."""
    if config.eval_path is not None:
        rows = load_rows(config.eval_path, format=config.format)
    elif config.path is not None:
        rows = _split_training_file(config)[1]
    else:
        rows = None
    return evaluation_set(config, rows, num_examples)
