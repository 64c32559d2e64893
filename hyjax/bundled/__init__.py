"""Data files shipped inside the package, named `bundled:<path>` in configs (`bundled:sst2/train.tsv`).

They are found next to this module, so a run reads them from any working directory after a plain
`pip install`. Today: a 2,000-row training and 500-row dev sample of SST-2 (sst2/ORIGIN.md), and 2,000 +
200 generated arithmetic word problems for GRPO (arithmetic/ORIGIN.md).
"""

from __future__ import annotations

import pathlib

PREFIX = "bundled:"
FOLDER = pathlib.Path(__file__).resolve().parent


def available() -> list[str]:
    """Every bundled data file, as configs name it."""
    return sorted(f"{PREFIX}{p.relative_to(FOLDER).as_posix()}" for p in FOLDER.glob("*/*")
                  if p.suffix in (".tsv", ".csv", ".jsonl", ".parquet"))


def resolve(spec: str) -> pathlib.Path | None:
    """The file `bundled:<path>` names, or None when `spec` is not a bundled name.

    Raises FileNotFoundError listing the bundled files when the name matches none of them.
    """
    if not spec.startswith(PREFIX):
        return None
    path = FOLDER / spec.removeprefix(PREFIX)
    if not path.is_file() or FOLDER not in path.resolve().parents:
        raise FileNotFoundError(f"{spec!r} is not a data file shipped with hyjax; bundled: {available()}")
    return path
