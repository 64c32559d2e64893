"""Generated arithmetic word problems with exact answers, laid out as GSM8K's rows (`question`, and an
`answer` whose worked solution ends in `#### <number>`), so the math task, its exact match and the RL
rewards read them as they read GSM8K. A 135M model solves almost no GSM8K problem; these, at a chosen
difficulty, give groups of sampled answers that differ in reward.

Difficulty d: a starting count below 10 * d, then d steps, each adding or taking away a number below
10 * d or (from d = 2) doubling or tripling; counts never go below zero. The same `(count, seed,
difficulty)` give the same problems on every machine.
"""

from __future__ import annotations

import json
import pathlib
import random

_PEOPLE = ["Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Grace", "Hugo", "Iris", "Jonas", "Kemal", "Lena"]
_THINGS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards", "stamps", "eggs"]
MAX_DIFFICULTY = 5


def arithmetic_problem(rng: random.Random, difficulty: int) -> dict[str, str]:
    """One problem: `{"question": ..., "answer": "<worked steps>\\n#### <number>"}`."""
    person, things = rng.choice(_PEOPLE), rng.choice(_THINGS)
    limit = 10 * difficulty
    value = rng.randrange(1, limit)
    sentences = [f"{person} has {value} {things}."]
    steps = []
    for _ in range(difficulty):
        kinds = ["add", "take"] + (["multiply"] if difficulty >= 2 else [])
        kind = rng.choice(kinds if value > 0 else ["add"])
        if kind == "add":
            amount = rng.randrange(1, limit)
            sentences.append(f"{person} gets {amount} more.")
            steps.append(f"{value} + {amount} = {value + amount}")
            value += amount
        elif kind == "take":
            amount = rng.randrange(1, value + 1)
            sentences.append(f"{person} gives away {amount}.")
            steps.append(f"{value} - {amount} = {value - amount}")
            value -= amount
        else:
            factor = rng.choice([2, 3])
            sentences.append(f"Then the number of {things} {person} has {'doubles' if factor == 2 else 'triples'}.")
            steps.append(f"{value} * {factor} = {value * factor}")
            value *= factor
    question = " ".join(sentences) + f" How many {things} does {person} have now?"
    return {"question": question, "answer": ". ".join(steps) + f".\n#### {value}"}


def arithmetic_problems(count: int, *, seed: int = 0, difficulty: int = 1) -> list[dict[str, str]]:
    """`count` problems of `difficulty` (1 to `MAX_DIFFICULTY`), drawn from `seed`."""
    if count < 1:
        raise ValueError(f"count={count} must be at least 1")
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty={difficulty} must be in [1, {MAX_DIFFICULTY}]")
    rng = random.Random(f"hyjax-arithmetic-{seed}-{difficulty}")
    return [arithmetic_problem(rng, difficulty) for _ in range(count)]


def arithmetic_splits(train: int, test: int, *, seed: int = 0, difficulty: int = 1
                      ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """`train` and `test` problems of `difficulty`, no question in both (and none twice)."""
    rng = random.Random(f"hyjax-arithmetic-splits-{seed}-{difficulty}")
    problems, seen = [], set()
    for _ in range(100 * (train + test)):
        problem = arithmetic_problem(rng, difficulty)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
            if len(problems) == train + test:
                return problems[:train], problems[train:]
    raise ValueError(f"difficulty {difficulty} has too few distinct problems for {train} + {test}")


def write_jsonl(path: str | pathlib.Path, rows: list[dict[str, str]]) -> pathlib.Path:
    """`rows` as a JSON-lines file (`data.path` of a math task reads it)."""
    path = pathlib.Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_arithmetic_jsonl(path: str | pathlib.Path, count: int, *, seed: int = 0, difficulty: int = 1
                           ) -> pathlib.Path:
    """`count` problems as a JSON-lines file."""
    return write_jsonl(path, arithmetic_problems(count, seed=seed, difficulty=difficulty))
