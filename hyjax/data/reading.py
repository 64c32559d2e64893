"""`load_rows`: local tsv/csv/jsonl/parquet files, `save_to_disk` folders and Hugging Face Hub data sets
(`hf:org/name[/config][:split][@revision]`, see `hyjax.hub`) as rows with line numbers."""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import sys
from collections.abc import Iterator, Sequence

import datasets
import numpy as np

from hyjax import bundled
from hyjax.hub import HubDataset, dataset_folder, parse_dataset

# Format name -> file suffixes it is inferred from. A folder is always "disk" (`Dataset.save_to_disk`).
FORMATS = {
    "tsv": (".tsv",),
    "csv": (".csv",),
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet", ".pq"),
    "disk": (),
}
_DELIMITERS = {"tsv": "\t", "csv": ","}


def _accepted() -> str:
    return ("tsv, csv, jsonl (json lines), parquet, a folder written by Dataset.save_to_disk, or a Hub data set "
            "hf:org/name[/config][:split]")


@dataclasses.dataclass
class Rows:
    """Rows of one file, each a dict, with the line each came from.

    `line(i)` is the 1-based line of row `i` in the file, counting the header for tsv/csv and skipping
    blank lines for jsonl; for parquet and `save_to_disk` folders it is the 1-based row number.

    Attributes:
      dataset: the `datasets.Dataset` holding the rows (tsv/csv cells are read as text).
      path: the file or folder read.
      format: one of `FORMATS`.
      index: original row number (0-based) of each row; differs from `range(len)` after `select`.
    """

    dataset: datasets.Dataset
    path: pathlib.Path
    format: str
    index: np.ndarray
    _lines: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.index[i])]

    def __iter__(self) -> Iterator[dict]:
        if len(self.index) == len(self.dataset) and np.array_equal(self.index, np.arange(len(self.dataset))):
            yield from self.dataset
        else:
            for i in self.index:
                yield self.dataset[int(i)]

    @property
    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def select(self, indices: Sequence[int]) -> Rows:
        """The rows at `indices` (positions in this `Rows`), keeping their original line numbers."""
        return dataclasses.replace(self, index=self.index[np.asarray(indices, dtype=np.int64)])

    def line(self, i: int) -> int:
        """1-based line in the file of row `i` (see the class docstring)."""
        if self._lines is None:
            self._lines = _line_numbers(self.path, self.format, len(self.dataset))
        return int(self._lines[self.index[i]])


def _line_numbers(path: pathlib.Path, fmt: str, n: int) -> np.ndarray:
    """Line where each of the `n` rows starts (records spanning lines start at their first line)."""
    if fmt in _DELIMITERS:
        lines = _scan_delimited(path, fmt)[1]
    elif fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            lines = np.asarray([k for k, text in enumerate(f, start=1) if text.strip()], dtype=np.int64)
    else:
        lines = np.arange(1, n + 1, dtype=np.int64)
    if len(lines) != n:  # should not happen; never report a wrong line
        return np.arange(1, n + 1, dtype=np.int64)
    return lines


def _scan_delimited(path: pathlib.Path, fmt: str) -> tuple[list[str], np.ndarray]:
    """The header of a tsv/csv file and the line where each record after it starts. Refuses a file that is
    not UTF-8 or has no header, and records with more fields than the header (pandas would shift their
    columns, or fail)."""
    starts, too_many = [], []
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # a long text is the task's to refuse, with its line
    try:
        with open(path, newline="", encoding="utf-8") as f:
            quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
            reader = csv.reader(f, delimiter=_DELIMITERS[fmt], quoting=quoting)
            header = next(reader, None)
            start = reader.line_num + 1
            for record in reader:
                if header and len(record) > len(header):
                    too_many.append(f"line {start} has {len(record)}")
                starts.append(start)
                start = reader.line_num + 1
    except UnicodeDecodeError as err:
        raise ValueError(_not_utf8(path, err)) from err
    except csv.Error as err:
        raise ValueError(f"cannot read {path} as {fmt}: {err} (line {reader.line_num})") from err
    finally:
        csv.field_size_limit(limit)
    if not header:
        raise ValueError(f"{path} is empty; a {fmt} file needs a header line naming its columns.")
    if too_many:
        raise ValueError(f"{path}: {'; '.join(too_many[:5])}{' ...' if len(too_many) > 5 else ''} fields, more "
                         f"than the {len(header)} columns of its header {header}"
                         + ("; a tab inside a text must be removed" if fmt == "tsv" else ""))
    if not starts:
        raise ValueError(f"{path} has a header but no rows.")
    return header, np.asarray(starts, dtype=np.int64)


def _not_utf8(path: pathlib.Path, err: UnicodeDecodeError) -> str:
    return (f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): save it as "
            "UTF-8, or give a file of one of the formats read: " + _accepted())


def infer_format(path: str | pathlib.Path) -> str:
    """The format of `path` from its suffix ("disk" for a folder)."""
    path = pathlib.Path(path)
    if path.is_dir():
        return "disk"
    suffix = path.suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    raise ValueError(
        f"cannot tell the format of {path} from its suffix {suffix!r}; pass format= one of {sorted(FORMATS)}."
    )


def load_rows(
    path: str | pathlib.Path,
    *,
    format: str | None = None,
    split: str | None = None,
    cache_dir: str | pathlib.Path | None = None,
) -> Rows:
    """Read a local data file or a `save_to_disk` folder with `datasets`.

    Args:
      path: a `.tsv`, `.csv`, `.jsonl`/`.json` (one JSON object a line), `.parquet` file, a folder
        written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a Hub data set
        `hf:org/name[/config][:split][@revision]` (or `hf:./folder` laid out like a dataset repository),
        or a file shipped with hyjax, `bundled:sst2/train.tsv` (`hyjax.bundled`).
      format: one of `FORMATS`; None infers it from the suffix.
      split: for a saved `DatasetDict` or a Hub data set, the split to read (required when it has several;
        a split in the Hub name wins).
      cache_dir: where `datasets` keeps its Arrow cache (default: its own).

    tsv/csv cells are read as text (a tsv has no quoting; blank lines become empty rows so line numbers
    stay right); the task formats parse labels and numbers from them.
    """
    if (hub_data := parse_dataset(str(path))) is not None:
        return _load_hub_rows(hub_data, split, cache_dir)
    path = bundled.resolve(str(path)) or pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist; accepted: {_accepted()}.")
    fmt = format or infer_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {sorted(FORMATS)}.")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path} is empty.")
    datasets.disable_progress_bars()
    cache = None if cache_dir is None else str(cache_dir)
    lines = None
    if fmt == "disk":
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data path {path} is a folder, but not one written by Dataset.save_to_disk "
                                    f"({err}); accepted: {_accepted()}.") from err
        if isinstance(ds, datasets.DatasetDict):
            ds = _one_split(ds, split, str(path), "pass split= one of them.")
    elif fmt in _DELIMITERS:
        header, lines = _scan_delimited(path, fmt)
        features = datasets.Features({name: datasets.Value("string") for name in header})
        ds = _read_with_datasets(path, fmt, ("csv",), dict(
            data_files=str(path), split="train", delimiter=_DELIMITERS[fmt],
            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL, keep_default_na=False,
            skip_blank_lines=False, features=features, cache_dir=cache))
    else:
        ds = _read_with_datasets(path, fmt, ("json" if fmt == "jsonl" else "parquet",),
                                 dict(data_files=str(path), split="train", cache_dir=cache))
    if split is not None and fmt != "disk" and split != "train":
        raise ValueError(f"{path} is a single {fmt} file; split={split!r} applies only to save_to_disk folders.")
    if lines is not None and len(lines) != len(ds):  # should not happen; never report a wrong line
        lines = None
    return Rows(dataset=ds, path=path, format=fmt, index=np.arange(len(ds), dtype=np.int64), _lines=lines)


def _read_with_datasets(path: pathlib.Path, fmt: str, args: tuple, kwargs: dict) -> datasets.Dataset:
    """`datasets.load_dataset(*args, **kwargs)`, its failures on a bad file as one-line `ValueError`s."""
    try:
        return datasets.load_dataset(*args, **kwargs)
    # ArrowInvalid and pandas' ParserError are ValueErrors; datasets' json reader meets an empty file with
    # StopIteration
    except (datasets.exceptions.DatasetGenerationError, ValueError, StopIteration) as err:
        cause = err.__cause__ or err
        if isinstance(cause, UnicodeDecodeError):
            raise ValueError(_not_utf8(path, cause)) from err
        hint = (" (datasets reads a column whose type changes between rows only when the file has no blank "
                "lines: remove them)" if fmt == "jsonl" else "")
        reason = " ".join(str(cause).split())
        raise ValueError(f"cannot read {path} as {fmt}: {type(cause).__name__}: {reason}{hint}") from err


def _load_hub_rows(data: HubDataset, split: str | None, cache_dir) -> Rows:
    """A Hub data set's split, read with `datasets` from the repository's local snapshot."""
    folder = dataset_folder(data)
    datasets.disable_progress_bars()
    name = f"hf:{data.repo_id}" + (f"/{data.config}" if data.config else "")
    try:
        splits = datasets.load_dataset(str(folder), name=data.config,
                                       cache_dir=None if cache_dir is None else str(cache_dir))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as err:
        raise ValueError(f"cannot read {name} (snapshot {folder}) with datasets: {err}") from err
    ds = _one_split(splits, data.split or split, name, f"name one, e.g. {name}:{sorted(splits)[0]}")
    return Rows(dataset=ds, path=folder, format="hub", index=np.arange(len(ds), dtype=np.int64))


def _one_split(splits: datasets.DatasetDict, wanted: str | None, name: str, how: str) -> datasets.Dataset:
    """The split `wanted` of `splits`, or the only one when `wanted` is None; errors name `name`'s splits
    and `how` to choose."""
    if wanted is None:
        if len(splits) != 1:
            raise ValueError(f"{name} holds splits {sorted(splits)}; {how}")
        wanted = next(iter(splits))
    if wanted not in splits:
        raise ValueError(f"{name} has no split {wanted!r}; it holds {sorted(splits)}.")
    return splits[wanted]


def pick_column(columns: Sequence[str], wanted: str | None, known: Sequence[str], what: str, path=None) -> str:
    """The column to read `what` from: `wanted` if given, else the one name of `known` present.

    Raises ValueError naming the columns present when `wanted` is absent, or when none or several of
    `known` are present.
    """
    where = f" in {path}" if path is not None else ""
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"no {what} column {wanted!r}{where}; columns present: {list(columns)}.")
        return wanted
    found = [name for name in known if name in columns]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"cannot find the {what} column{where}: none of {list(known)} is present (columns: {list(columns)}); "
            f"name it in the config."
        )
    raise ValueError(
        f"ambiguous {what} column{where}: {found} are all present (columns: {list(columns)}); name one in the config."
    )
