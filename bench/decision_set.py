"""The SST-2 decision set: whole sentences held out of the training file, so that settings are chosen on
rows that look like dev (never on dev itself), and a training pool that holds nothing of them.

    python bench/decision_set.py [--rows 1000] [--seed 0] [--out runs/sst2-decision]

SST-2's training file is mostly phrases cut from the treebank's parse trees (54% of rows under 8 words),
while dev is whole sentences (90%, median 19 words) whose phrases appear nowhere in train. Rows held out
at random from train are therefore phrases, and most are phrases of a sentence left in the pool: settings
chosen on them did not carry to dev. Here:

- held out: `--rows` whole sentences (8 or more words, ending in `.`, `!` or `?`), drawn with `--seed`;
- the pool: every other training row, less each row whose words are a contiguous run of a held-out
  sentence's words (a phrase of it, which carries its label) and each row that contains a held-out
  sentence. Matching is on whole words, as SST-2's tokenised text is written: the one-word row `good` is a
  phrase of `a good film .`, the row `goo` is not.

Writes `decision.tsv` and `pool.tsv` (the training file's `label<TAB>sentence` header) and `decision_set.json`
(counts, word lengths, labels) into `--out`; the same seed gives the same files. `ensure` returns the folder,
building it when missing or built from other settings.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import statistics

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
SST2_TRAIN = PROJECT_ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
MIN_WORDS, ENDINGS = 8, (".", "!", "?")


def is_whole_sentence(text: str) -> bool:
    """8 or more words ending in `.`, `!` or `?`: what 90% of SST-2 dev looks like."""
    words = text.split()
    return len(words) >= MIN_WORDS and words[-1][-1] in ENDINGS


def phrases(text: str) -> set[str]:
    """Every contiguous run of whole words of `text`, single-spaced."""
    words = text.split()
    return {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}


def read_rows(path: pathlib.Path) -> tuple[str, list[tuple[str, str]]]:
    """`(header, [(label, text)])` of a `label<TAB>sentence` file."""
    lines = path.read_text().splitlines()
    rows = [tuple(line.split("\t", 1)) for line in lines[1:] if line.strip()]
    return lines[0], [(label, " ".join(text.split())) for label, text in rows]


def split(rows: list[tuple[str, str]], count: int, seed: int) -> tuple[list, list, dict]:
    """`(held_out, pool, counts)`: `count` whole sentences drawn with `seed`, and the rows that may train."""
    candidates = sorted({row for row in rows if is_whole_sentence(row[1])})
    if count > len(candidates):
        raise ValueError(f"--rows {count} is more than the {len(candidates)} whole sentences in the file")
    held_out = random.Random(seed).sample(candidates, count)
    held_texts = {text for _, text in held_out}
    inside = set().union(*(phrases(text) for text in held_texts))
    padded = [f" {text} " for text in held_texts]
    pool, removed = [], collections.Counter()
    for label, text in rows:
        if text in held_texts:
            removed["held_out"] += 1
        elif text in inside:
            removed["phrase_of_held_out"] += 1
        elif len(text.split()) > MIN_WORDS and any(held in f" {text} " for held in padded):
            removed["contains_held_out"] += 1
        else:
            pool.append((label, text))
    counts = {"training_rows": len(rows), "whole_sentences": len(candidates), "held_out": count,
              "pool": len(pool), "removed": dict(removed)}
    return held_out, pool, counts


def describe(rows: list[tuple[str, str]]) -> dict:
    lengths = [len(text.split()) for _, text in rows]
    return {"rows": len(rows), "median_words": statistics.median(lengths),
            "whole_sentences": round(sum(map(is_whole_sentence, (t for _, t in rows))) / len(rows), 3),
            "positive": round(sum(label == "1" for label, _ in rows) / len(rows), 3)}


def build(out: pathlib.Path, count: int = 1000, seed: int = 0, train: pathlib.Path = SST2_TRAIN) -> dict:
    """Writes the decision set and pool into `out`; returns what `decision_set.json` records."""
    if not train.is_file():
        raise SystemExit(f"{train} is missing (see ../shared/data/README.md)")
    header, rows = read_rows(train)
    held_out, pool, counts = split(rows, count, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("decision.tsv", held_out), ("pool.tsv", pool)):
        (out / name).write_text("\n".join([header, *(f"{label}\t{text}" for label, text in part)]) + "\n")
    record = {"settings": {"rows": count, "seed": seed, "train": train.name}, **counts,
              "decision": describe(held_out), "pool_rows": describe(pool), "train_rows": describe(rows)}
    (out / "decision_set.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def ensure(out: pathlib.Path, count: int = 1000, seed: int = 0) -> pathlib.Path:
    """`out`, holding the decision set of these settings (built now when missing or built otherwise)."""
    record = out / "decision_set.json"
    settings = {"rows": count, "seed": seed, "train": SST2_TRAIN.name}
    if not (record.is_file() and json.loads(record.read_text())["settings"] == settings
            and (out / "pool.tsv").is_file() and (out / "decision.tsv").is_file()):
        build(out, count, seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="whole sentences held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/sst2-decision")
    args = parser.parse_args()
    print(json.dumps(build(pathlib.Path(args.out), args.rows, args.seed), indent=1))


if __name__ == "__main__":
    main()
