"""Classification with a verbalizer: a label becomes an answer word (SST-2: 0 -> " negative", 1 -> " positive")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from hyjax.data.examples import Example, PromptStyle, encode_prompt, text_field
from hyjax.data.reading import pick_column
from hyjax.data.report import MalformedRow

# Column names tried, in this order of preference, when the text column is not named.
TEXT_COLUMNS = ("sentence", "content", "text", "review")


@dataclasses.dataclass(frozen=True)
class Classification:
    """Text + label rows to (prompt, answer word) examples.

    Attributes:
      answers: (label, answer text) pairs. Labels match the cell as text ("0" and 0 both match 0).
        In chat mode the answer's leading spaces are dropped (the assistant turn starts fresh).
      template: plain-mode prompt; `{text}` is the row's text. In chat mode it is the user turn.
      text_column: column holding the text; None picks the one of `TEXT_COLUMNS` present.
      label_column: column holding the label.
      prompt: chat template use and system message.
    """

    answers: tuple[tuple[Any, str], ...] = ((0, " negative"), (1, " positive"))
    template: str = "Review: {text}\nSentiment (positive or negative):"
    text_column: str | None = None
    label_column: str = "label"
    prompt: PromptStyle = PromptStyle()

    def __post_init__(self):
        keys = [str(label) for label, _ in self.answers]
        if len(set(keys)) != len(keys) or not keys:
            raise ValueError(f"answers must name distinct labels, got {self.answers}.")
        if "{text}" not in self.template:
            raise ValueError(f"template must contain '{{text}}', got {self.template!r}.")

    def resolve(self, columns: Sequence[str], source: Any = None) -> Classification:
        """This task with the text column fixed for `columns` (error naming the columns otherwise)."""
        text = pick_column(columns, self.text_column, TEXT_COLUMNS, "text", source)
        pick_column(columns, self.label_column, (), "label", source)
        return dataclasses.replace(self, text_column=text)

    def label_index(self, row: Mapping[str, Any]) -> int:
        """Position in `answers` of the row's label, or `MalformedRow`."""
        value = row.get(self.label_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise MalformedRow(f"missing {self.label_column!r}")
        if isinstance(value, (bool, float)):
            raise MalformedRow(f"bad label {value!r}")
        key = str(value).strip()
        for i, (label, _) in enumerate(self.answers):
            if str(label) == key:
                return i
        raise MalformedRow(f"bad label {value!r} (expected one of {[label for label, _ in self.answers]})")

    def _text(self, row: Mapping[str, Any]) -> str:
        if self.text_column is None:
            raise ValueError("call resolve(columns) first to pick the text column.")
        return text_field(row, self.text_column)

    def encode(self, text: str, answer_index: int, tokenizer) -> Example:
        prompt = self.template.format(text=text.strip())
        return encode_prompt(tokenizer, self.prompt, prompt, prompt, self.answers[answer_index][1])

    def example(self, row: Mapping[str, Any], tokenizer) -> Example:
        text = self._text(row)
        return self.encode(text, self.label_index(row), tokenizer)

    def candidates(self, row: Mapping[str, Any], tokenizer) -> tuple[list[Example], int]:
        """One example per answer (same prompt), and the index of the right one: for scoring."""
        text = self._text(row)
        gold = self.label_index(row)
        return [self.encode(text, i, tokenizer) for i in range(len(self.answers))], gold


def sst2(**overrides) -> Classification:
    """The SST-2 task: `label` 0/1, text in `sentence` (train) or `content` (dev)."""
    return Classification(**overrides)
