"""Rows to `Example`s (prompt ids, answer ids): prompt rendering, answer + EOS, malformed-row accounting."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from hyjax.data.report import BadRow, BadRowLimit, DataReport, MalformedRow


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: the model reads `prompt_ids + answer_ids`; the loss covers `answer_ids` only."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    line: int = 0  # line of the row it came from (0: unknown)

    def __post_init__(self):
        if not self.prompt_ids or not self.answer_ids:
            raise ValueError(
                f"an example needs at least one prompt and one answer token, got {len(self.prompt_ids)} and "
                f"{len(self.answer_ids)}."
            )

    def __len__(self) -> int:
        """Positions it occupies in a batch row: one per predicted token, len(prompt) + len(answer) - 1."""
        return len(self.prompt_ids) + len(self.answer_ids) - 1


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """How prompt text becomes ids.

    Attributes:
      chat: "auto" uses the tokenizer's chat template when it has one, True requires one, False
        never uses it (plain text prompt, BOS per the tokenizer's default).
      system: system message put before the user turn in chat mode (None: none).
    """

    chat: bool | str = "auto"
    system: str | None = None

    def uses_chat(self, tokenizer) -> bool:
        if self.chat == "auto":
            return tokenizer.chat_template is not None
        if self.chat and tokenizer.chat_template is None:
            raise ValueError(
                "PromptStyle(chat=True) but the tokenizer has no chat template; load one or set chat='auto'."
            )
        return bool(self.chat)


class TaskFormat(Protocol):
    """A task: checks the columns once, then turns each row into an `Example` or raises `MalformedRow`."""

    def resolve(self, columns: Sequence[str], source: Any = None) -> "TaskFormat": ...

    def example(self, row: Mapping[str, Any], tokenizer) -> Example: ...


def _encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a full prompt text, with BOS once when the tokenizer adds it (a template may already have it)."""
    ids = tokenizer.encode(text, add_bos=False)
    bos = tokenizer.bos_id
    if tokenizer.add_bos_default and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def encode_messages(tokenizer, messages: Sequence[Mapping[str, str]], answer: str) -> Example:
    """Chat-templated prompt (ending with the assistant header) and `answer` + EOS."""
    prompt = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    return Example(tuple(_encode_text(tokenizer, prompt)), tuple(encode_answer(tokenizer, answer)))


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Ids of `answer` (no BOS) followed by EOS."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS id; answers must end with one.")
    return [*tokenizer.encode(answer, add_bos=False), tokenizer.eos_id]


def encode_prompt(tokenizer, style: PromptStyle, user_text: str, plain_prompt: str, answer: str) -> Example:
    """Chat mode: `user_text` as the user turn, answer without leading spaces; plain mode: `plain_prompt` + `answer`."""
    if style.uses_chat(tokenizer):
        messages = [] if style.system is None else [{"role": "system", "content": style.system}]
        messages.append({"role": "user", "content": user_text})
        return encode_messages(tokenizer, messages, answer.lstrip())
    return Example(tuple(_encode_text(tokenizer, plain_prompt)), tuple(encode_answer(tokenizer, answer)))


# Longest text a row may hold: about a million tokens, past every model's context (longer is not text).
MAX_TEXT_CHARACTERS = 4_000_000


def text_field(row: Mapping[str, Any], column: str) -> str:
    """The non-empty string in `row[column]`, or `MalformedRow` saying what is wrong."""
    value = row.get(column)
    if value is None:
        raise MalformedRow(f"missing {column!r}")
    if not isinstance(value, str):
        raise MalformedRow(f"{column!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise MalformedRow(f"empty {column!r}")
    if len(value) > MAX_TEXT_CHARACTERS:
        raise MalformedRow(f"{column!r} holds {len(value):,} characters, over the {MAX_TEXT_CHARACTERS:,} a "
                           "text may have")
    return value


def build_examples(
    rows: Sequence[Mapping[str, Any]],
    task: TaskFormat,
    tokenizer,
    *,
    limit: BadRowLimit = BadRowLimit(),
    source: str | None = None,
) -> tuple[list[Example], DataReport]:
    """Turn every row into an `Example` with `task`; count malformed rows with their lines.

    Args:
      rows: a `Rows` from `load_rows` (line numbers from the file), or any sequence of dicts (line =
        1-based position).
      task: a task format (`Classification`, `MathWordProblems`, `Instructions`).
      tokenizer: a `hyjax.tokenization.Tokenizer`.
      limit: when malformed rows stop the run with `MalformedDataError` (default: over 1% or over 100).
      source: name used in messages (default: the file path).

    Returns:
      The examples and a `DataReport`.
    """
    columns = getattr(rows, "column_names", None)
    if columns is None:
        first = next(iter(rows), None)
        columns = list(first) if first is not None else []
    path = getattr(rows, "path", None)
    task = task.resolve(columns, path)
    report = DataReport(source=str(source or path or "rows"))
    line_of = getattr(rows, "line", lambda i: i + 1)
    examples = []
    for i, row in enumerate(rows):
        report.rows += 1
        try:
            if all(v is None or (isinstance(v, str) and not v.strip()) for v in row.values()):
                raise MalformedRow("blank row")
            ex = task.example(row, tokenizer)
        except MalformedRow as err:
            report.bad.append(BadRow(line_of(i), str(err)))
            continue
        examples.append(dataclasses.replace(ex, line=line_of(i)))
    report.examples = len(examples)
    report.check(limit)
    return examples, report
