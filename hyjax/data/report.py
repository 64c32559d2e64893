"""`DataReport`: what was read, what was dropped and why, and the limit on malformed rows."""

from __future__ import annotations

import dataclasses


class MalformedRow(ValueError):
    """Raised by a task format for a row it cannot use; the message says why."""


class MalformedDataError(ValueError):
    """Too many malformed rows: the message lists the first few lines and why."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line in the file (see `Rows.line`)
    reason: str


@dataclasses.dataclass(frozen=True)
class BadRowLimit:
    """When malformed rows stop the run: more than `max_fraction` of the rows OR more than `max_rows`.

    Either limit may be None (no limit of that kind); both None accepts any number of bad rows.
    """

    max_fraction: float | None = 0.01
    max_rows: int | None = 100

    def exceeded(self, bad: int, total: int) -> bool:
        if self.max_fraction is not None and bad > self.max_fraction * total:
            return True
        return self.max_rows is not None and bad > self.max_rows


@dataclasses.dataclass
class DataReport:
    """Counts for one file: rows read, examples kept, malformed rows with their lines, truncations."""

    source: str
    rows: int = 0
    examples: int = 0
    bad: list[BadRow] = dataclasses.field(default_factory=list)
    truncated_prompt: int = 0  # prompt shortened from the left to fit max_length
    truncated_answer: int = 0  # answer itself longer than max_length, cut on the right

    @property
    def bad_lines(self) -> list[int]:
        return [b.line for b in self.bad]

    def check(self, limit: BadRowLimit) -> None:
        """Raise `MalformedDataError` if the malformed rows pass `limit`."""
        if not limit.exceeded(len(self.bad), self.rows):
            return
        first = "; ".join(f"line {b.line}: {b.reason}" for b in self.bad[:5])
        raise MalformedDataError(
            f"{self.source}: {len(self.bad)} of {self.rows} rows are malformed, over the limit "
            f"(max_fraction={limit.max_fraction}, max_rows={limit.max_rows}); first: {first}"
        )

    def summary(self) -> str:
        text = f"{self.source}: {self.examples} examples from {self.rows} rows"
        if self.bad:
            text += f", {len(self.bad)} malformed (lines {self.bad_lines[:10]}{'...' if len(self.bad) > 10 else ''})"
        if self.truncated_prompt or self.truncated_answer:
            text += f", {self.truncated_prompt} prompts and {self.truncated_answer} answers truncated"
        return text
