"""`DataConfig`: the training data of a run, the `data:` section of a run configuration (configs/base.yaml).

`hyjax.config` builds it from YAML (`RunConfig.data`); `prepare` and `make_task` take it as it is.
`__post_init__` checks ranges and choices with messages that start with `field=value` (the config
loader prefixes the section, giving e.g. `data.task='gsm8' must be one of [...]`).
"""

from __future__ import annotations

import dataclasses

from hyjax.data.classification import Classification
from hyjax.data.instructions import Instructions
from hyjax.data.math_problems import MathWordProblems
from hyjax.data.reading import FORMATS
from hyjax.validation import at_least, in_range, one_of

# Task name -> task format class.
TASKS = {
    "classification": Classification,
    "sst2": Classification,
    "math": MathWordProblems,
    "gsm8k": MathWordProblems,
    "instructions": Instructions,
}

# Task format class -> its fields that `text_column` and `label_column` set.
_COLUMN_FIELDS = {
    Classification: ("text_column", "label_column"),
    MathWordProblems: ("question_column", "answer_column"),
    Instructions: ("prompt_column", "completion_column"),
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The training data: a file, a task that turns its rows into (prompt, answer) pairs, batching."""

    path: str | None = None  # tsv/csv/jsonl/parquet file, save_to_disk folder or hf:org/name[/config][:split]
    format: str | None = None  # one of tsv, csv, jsonl, parquet, disk; null: from the file suffix
    split: str | None = None  # split of a saved DatasetDict folder or Hub data set
    task: str = "classification"  # classification (sst2) | math (gsm8k) | instructions
    text_column: str | None = None  # text / question / prompt column; null: the task's default
    label_column: str | None = None  # label / answer / completion column; null: the task's default
    # classification: [label, answer text] pairs, e.g. [[0, " negative"], [1, " positive"]]; null: SST-2's
    verbalizer: tuple[tuple[int | str, str], ...] | None = None
    template: str | None = None  # prompt template ({text} or {question} or {prompt}); null: the task's
    chat: bool | str = "auto"  # wrap prompts in the tokenizer's chat template: auto | true | false
    system: str | None = None  # system message in chat mode
    max_length: int = 512  # tokens per row; longer examples lose prompt tokens from the left
    bucket: int = 64  # without packing, pad the row length up to a multiple of this
    packing: bool = False  # pack several examples per row instead of padding each
    max_rows: int | None = None  # use only the first N rows of the file (a slice); null: all
    eval_path: str | None = None  # held-out file for evaluation; null: split the training file
    eval_fraction: float | None = None  # without eval_path: hold out this share of the rows...
    eval_count: int | None = None  # ...or this many rows (null and null: no held-out set)
    max_bad_fraction: float | None = 0.01  # stop when more than this share of rows is malformed...
    max_bad_rows: int | None = 100  # ...or more than this many (null: no limit)
    shuffle_seed: int = 0  # shuffling per epoch and the held-out split

    def __post_init__(self):
        one_of("task", self.task, TASKS)
        if self.format is not None:
            one_of("format", self.format, FORMATS)
        if isinstance(self.chat, str):
            one_of("chat", self.chat, ("auto",))
        if self.verbalizer is not None:
            if TASKS[self.task] is not Classification:
                raise ValueError(f"verbalizer={list(self.verbalizer)!r} only applies to task=classification, "
                                 f"not task={self.task!r}")
            labels = [str(label) for label, _ in self.verbalizer]
            if not labels or len(set(labels)) != len(labels):
                raise ValueError(f"verbalizer={list(self.verbalizer)!r} needs distinct labels, at least one")
        at_least("max_length", self.max_length, 2)
        at_least("bucket", self.bucket, 1)
        at_least("max_rows", self.max_rows, 1, allow_none=True)
        in_range("eval_fraction", self.eval_fraction, 0, 1, low_open=True, high_open=True, allow_none=True)
        at_least("eval_count", self.eval_count, 1, allow_none=True)
        if self.eval_fraction is not None and self.eval_count is not None:
            raise ValueError(f"eval_fraction={self.eval_fraction} and eval_count={self.eval_count}: give one")
        if self.eval_path is not None and (self.eval_fraction is not None or self.eval_count is not None):
            raise ValueError(f"eval_path={self.eval_path!r} is given, so eval_fraction and eval_count must "
                             "be null (nothing is held out of the training file)")
        in_range("max_bad_fraction", self.max_bad_fraction, 0, 1, allow_none=True)
        at_least("max_bad_rows", self.max_bad_rows, 0, allow_none=True)
        at_least("shuffle_seed", self.shuffle_seed, 0)

    def task_options(self) -> dict:
        """Fields of the task class in `TASKS` (Classification, MathWordProblems, Instructions) this
        config sets; the others keep the class's defaults."""
        text, label = _COLUMN_FIELDS[TASKS[self.task]]
        options = {}
        if self.text_column is not None:
            options[text] = self.text_column
        if self.label_column is not None:
            options[label] = self.label_column
        if self.template is not None:
            options["template"] = self.template
        if self.verbalizer is not None:
            options["answers"] = tuple(tuple(pair) for pair in self.verbalizer)
        return options
