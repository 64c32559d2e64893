"""Math word problems (GSM8K): question -> worked solution ending in `#### <number>`, and its extractor."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hyjax.data.examples import Example, PromptStyle, encode_prompt, text_field
from hyjax.data.reading import pick_column
from hyjax.data.report import MalformedRow

_NUMBER = re.compile(r"-?\s*\d+(?:\.\d+)?|-?\s*\.\d+")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def normalize_number(text: str) -> str | None:
    """Canonical text of the first number in `text`: no `$`, commas or spaces, no trailing zeros.

    "$1,234.50" -> "1234.5", "-7" -> "-7", "10.00" -> "10", "-0" -> "0"; None when there is no number.
    """
    cleaned = text.replace(",", "").replace("$", "").replace("\u2212", "-")
    match = _NUMBER.search(cleaned)
    if match is None:
        return None
    number = match.group(0).replace(" ", "")
    negative = number.startswith("-")
    number = number.lstrip("-")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    number = number.lstrip("0") or "0"
    if number.startswith("."):
        number = "0" + number
    return "-" + number if negative and number != "0" else number


def extract_final_answer(text: str) -> str | None:
    """The normalized number after the last `####` in `text`, or None (no `####`, or no number after it).

    Used both for GSM8K targets and for scoring generated text, so the two compare as strings.
    """
    if not isinstance(text, str) or "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().splitlines()
    return normalize_number(tail[0]) if tail else None


@dataclasses.dataclass(frozen=True)
class MathWordProblems:
    """Question/answer rows to examples whose answer is the worked solution (or only `#### <number>`).

    Attributes:
      template: plain-mode prompt with `{question}`; the user turn in chat mode.
      question_column, answer_column: where the two texts are.
      final_only: train on "#### <number>" alone instead of the worked solution.
      keep_calculator: keep GSM8K's `<<48/2=24>>` calculator annotations in the solution.
      prompt: chat template use and system message.
    """

    template: str = "Question: {question}\nAnswer:"
    question_column: str = "question"
    answer_column: str = "answer"
    final_only: bool = False
    keep_calculator: bool = True
    prompt: PromptStyle = PromptStyle()

    def resolve(self, columns: Sequence[str], source: Any = None) -> MathWordProblems:
        pick_column(columns, self.question_column, (), "question", source)
        pick_column(columns, self.answer_column, (), "answer", source)
        return self

    def target(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """(answer text to train on, normalized final number), or `MalformedRow`."""
        answer = text_field(row, self.answer_column)
        final = extract_final_answer(answer)
        if final is None:
            raise MalformedRow(f"no '#### <number>' in {self.answer_column!r}")
        if self.final_only:
            return f"#### {final}", final
        if not self.keep_calculator:
            answer = _CALCULATOR.sub("", answer)
        return answer.strip(), final

    def example(self, row: Mapping[str, Any], tokenizer) -> Example:
        question = text_field(row, self.question_column).strip()
        answer, _ = self.target(row)
        return encode_prompt(tokenizer, self.prompt, question, self.template.format(question=question), " " + answer)


def gsm8k(**overrides) -> MathWordProblems:
    """The GSM8K task: `question` -> `answer` (worked solution, last line `#### <number>`)."""
    return MathWordProblems(**overrides)
