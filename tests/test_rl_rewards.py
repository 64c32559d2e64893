"""Verifiable rewards on hand-written completions, and the generated arithmetic problems they score."""

from __future__ import annotations

import json
import re
import sys
import types

import pytest

from hyjax.data import extract_final_answer, gsm8k, load_rows
from hyjax.data.arithmetic import arithmetic_problems, write_arithmetic_jsonl
from hyjax.rl.rewards import answer_format, final_number, resolve_reward

ROW = {"question": "Ana has 3 apples and gets 4 more. How many?", "answer": "3 + 4 = 7.\n#### 7"}


@pytest.mark.parametrize("completion, number, formatted", [
    ("3 + 4 = 7.\n#### 7", 1.0, 1.0),
    ("She has 3 + 4 = 7 apples.\n#### 7.00", 1.0, 1.0),
    ("#### 1,000 is wrong\n#### 7", 1.0, 1.0),  # the last #### counts
    ("3 + 4 = 8.\n#### 8", 0.0, 1.0),
    ("The answer is 7.", 0.0, 0.0),  # right number, not in the format
    ("#### 7\nand then some words", 1.0, 0.0),  # the number is read; the format wants it last
    ("", 0.0, 0.0),
    ("#### seven", 0.0, 0.0),
])
def test_rewards_of_hand_written_completions(completion, number, formatted):
    assert final_number(completion, ROW) == number
    assert answer_format(completion, ROW) == formatted


def test_a_reward_of_ones_own_is_named_by_module_and_function(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.shorter = lambda completion, row: -len(completion) / 100
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    assert resolve_reward("my_rewards:shorter")("abcd", ROW) == -0.04
    assert resolve_reward("final_number") is final_number
    with pytest.raises(ValueError, match="neither one of"):
        resolve_reward("final_numbr")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        resolve_reward("no_such_module:reward")
    with pytest.raises(ValueError, match="no callable 'longer'"):
        resolve_reward("my_rewards:longer")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_every_generated_problem_has_its_exact_answer(difficulty):
    problems = arithmetic_problems(200, seed=3, difficulty=difficulty)
    assert arithmetic_problems(200, seed=3, difficulty=difficulty) == problems
    assert arithmetic_problems(200, seed=4, difficulty=difficulty) != problems
    for row in problems:
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", row["answer"])
        assert len(steps) == difficulty, row
        value = int(re.search(r"has (\d+) ", row["question"]).group(1))
        for a, op, b, result in steps:
            assert int(a) == value and eval(f"{a} {op} {b}") == int(result) >= 0, row
            value = int(result)
        assert extract_final_answer(row["answer"]) == str(value)
        assert final_number(row["answer"], row) == 1.0 == answer_format(row["answer"], row)
    assert len({row["question"] for row in problems}) > 150


def test_generated_problems_are_a_math_task_file(tmp_path):
    path = write_arithmetic_jsonl(tmp_path / "arith.jsonl", 20, seed=0, difficulty=2)
    rows = load_rows(path)
    assert len(rows) == 20
    task = gsm8k().resolve(rows.column_names, path)
    assert task.target(rows[0])[1] == extract_final_answer(rows[0]["answer"])
    with pytest.raises(ValueError, match="difficulty=9"):
        arithmetic_problems(5, difficulty=9)


def test_the_bundled_problems_are_what_their_origin_says():
    from hyjax import bundled
    from hyjax.data.arithmetic import arithmetic_splits

    train, test = arithmetic_splits(2000, 200, seed=0, difficulty=1)
    for name, rows in (("train", train), ("test", test)):
        lines = bundled.resolve(f"bundled:arithmetic/{name}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == rows
    assert not {row["question"] for row in train} & {row["question"] for row in test}
