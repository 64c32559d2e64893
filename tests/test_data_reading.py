"""Reading data files: every format gives the same rows, the shared SST-2/GSM8K files, column choice, splits."""

from __future__ import annotations

import csv
import json
import re

import datasets
import pytest

from hyjax.data import (
    build_examples,
    extract_final_answer,
    gsm8k,
    load_rows,
    normalize_number,
    sst2,
    train_eval_split,
)
from hyjax.data.classification import Classification
from hyjax.data.reading import pick_column

ROWS = [
    {"label": 1, "sentence": "a gorgeous, witty film"},
    {"label": 0, "sentence": 'he said "dull" twice'},
    {"label": 1, "sentence": "ünïcode and émojis 🎬"},
    {"label": 0, "sentence": "plain words"},
]


def write_all_formats(folder, rows):
    """The same rows as tsv, csv, jsonl, parquet and a save_to_disk folder."""
    paths = {}
    paths["tsv"] = folder / "rows.tsv"  # a tsv has no quoting: cells are written as they are
    lines = ["\t".join(rows[0])] + ["\t".join(str(v) for v in r.values()) for r in rows]
    paths["tsv"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["csv"] = folder / "rows.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(list(rows[0]))
        writer.writerows([list(r.values()) for r in rows])
    paths["jsonl"] = folder / "rows.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    dataset = datasets.Dataset.from_list(rows)
    paths["parquet"] = folder / "rows.parquet"
    dataset.to_parquet(str(paths["parquet"]))
    paths["disk"] = folder / "saved"
    dataset.save_to_disk(str(paths["disk"]))
    return paths


def test_every_format_gives_the_same_rows(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    as_text = [{k: str(v) for k, v in r.items()} for r in ROWS]
    for fmt, path in paths.items():
        rows = load_rows(path, cache_dir=tmp_path / "cache")
        assert rows.format == fmt
        assert rows.column_names == ["label", "sentence"]
        # tsv/csv cells are text; the typed formats keep ints. Same values either way.
        assert [{k: str(v) for k, v in r.items()} for r in rows] == as_text, fmt
        assert [rows.line(i) for i in range(len(rows))] == ([2, 3, 4, 5] if fmt in ("tsv", "csv") else [1, 2, 3, 4])


def test_every_format_gives_the_same_examples(tmp_path):
    from test_data_tasks import tiny_tokenizer

    tok = tiny_tokenizer()
    paths = write_all_formats(tmp_path, ROWS)
    results = {fmt: build_examples(load_rows(p, cache_dir=tmp_path / "c"), sst2(), tok)[0] for fmt, p in paths.items()}
    pairs = {fmt: [(e.prompt_ids, e.answer_ids) for e in exs] for fmt, exs in results.items()}
    assert len({tuple(v) for v in pairs.values()}) == 1
    assert len(pairs["tsv"]) == len(ROWS)


def test_format_can_be_given_and_split_picked(tmp_path):
    (tmp_path / "data.txt").write_text("label\tsentence\n1\tgood\n")
    rows = load_rows(tmp_path / "data.txt", format="tsv", cache_dir=tmp_path / "c")
    assert rows[0] == {"label": "1", "sentence": "good"}
    with pytest.raises(ValueError, match="format"):
        load_rows(tmp_path / "data.txt")
    folder = tmp_path / "dict"
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    assert len(load_rows(folder, split="test")) == 1
    with pytest.raises(ValueError, match="split"):
        load_rows(folder)


def test_missing_path_names_it_and_the_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tsv.*tsv, csv, jsonl.*parquet.*save_to_disk"):
        load_rows(tmp_path / "nowhere.tsv")


def test_text_column_is_detected_or_the_error_names_the_columns():
    assert pick_column(["label", "content"], None, ("sentence", "content"), "text") == "content"
    with pytest.raises(ValueError, match=r"ambiguous.*\['sentence', 'content'\]"):
        Classification().resolve(["label", "sentence", "content"])
    with pytest.raises(ValueError, match=r"columns: \['label', 'body'\]"):
        Classification().resolve(["label", "body"])
    with pytest.raises(ValueError, match=r"no text column 'x'.*\['label', 'body'\]"):
        Classification(text_column="x").resolve(["label", "body"])
    assert Classification(text_column="body").resolve(["label", "body"]).text_column == "body"


def test_sst2_train_and_dev_load_with_their_counts(shared_data, tmp_path):
    train = load_rows(shared_data / "sst2" / "train.tsv", cache_dir=tmp_path)
    dev = load_rows(shared_data / "sst2" / "dev.tsv", cache_dir=tmp_path)
    assert (len(train), len(dev)) == (67_349, 872)
    assert Classification().resolve(train.column_names).text_column == "sentence"
    assert Classification().resolve(dev.column_names).text_column == "content"
    assert {r["label"] for r in dev} == {"0", "1"}
    assert dev[0]["content"] == "one long string of cliches ."
    assert dev.line(871) == 873


def test_gsm8k_loads_and_every_answer_has_a_final_number(shared_data, tmp_path):
    rows = load_rows(shared_data / "gsm8k" / "train.jsonl", cache_dir=tmp_path)
    assert len(rows) == 7_473
    for row in rows:
        final_line = row["answer"].strip().splitlines()[-1]
        raw = re.fullmatch(r"#### (.+)", final_line).group(1)
        got = extract_final_answer(row["answer"])
        assert got is not None and re.fullmatch(r"-?\d+(\.\d+)?", got), row["answer"]
        assert float(got) == float(raw.replace(",", "").replace("$", ""))
    assert extract_final_answer(rows[0]["answer"]) == "72"
    assert gsm8k().target(rows[0]) == (rows[0]["answer"], "72")


@pytest.mark.parametrize(
    "text, want",
    [
        ("#### 72", "72"),
        ("so...\n#### 1,234", "1234"),
        ("#### $1,234.50", "1234.5"),
        ("#### -7", "-7"),
        ("#### -$3.00", "-3"),
        ("#### 0.25", "0.25"),
        ("####.5", "0.5"),
        ("#### 007", "7"),
        ("#### -0", "0"),
        ("first #### 3\nthen #### 4.", "4"),
        ("The answer is 5", None),
        ("#### none", None),
    ],
)
def test_final_answer_extractor(text, want):
    assert extract_final_answer(text) == want


def test_normalize_number_compares_equal_forms():
    assert normalize_number("$1,000.00") == normalize_number("1000") == "1000"


def test_train_eval_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"i": i} for i in range(100)]
    train, held = train_eval_split(rows, fraction=0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(r["i"] for r in train + held) == list(range(100))
    assert train_eval_split(rows, fraction=0.1, seed=3) == (train, held)
    assert train_eval_split(rows, fraction=0.1, seed=4)[1] != held
    assert len(train_eval_split(rows, count=7)[1]) == 7
    for bad in ({"fraction": 1.0}, {"count": 100}, {"count": 0}, {}, {"fraction": 0.1, "count": 2}):
        with pytest.raises(ValueError):
            train_eval_split(rows, **bad)


def test_train_eval_split_of_rows_keeps_line_numbers(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("label\tsentence\n" + "".join(f"{i % 2}\tline {i}\n" for i in range(20)))
    rows = load_rows(path, cache_dir=tmp_path / "c")
    train, held = train_eval_split(rows, count=5, seed=0)
    for part in (train, held):
        for i in range(len(part)):
            assert part[i]["sentence"] == f"line {part.line(i) - 2}"
