"""Row readers: JSONL / JSON, Parquet and Hugging Face `datasets` sources, read offline.

Every row comes back with `where`, the place it was read from ("pairs.jsonl:12", "pairs.parquet row 3",
"data/hh [train] row 7"), so that validation errors further down can name the file and the line.

`iter_rows(source, split)` picks the reader:
    *.jsonl, *.ndjson, *.jsonl.gz   one JSON object per line (blank lines skipped)
    *.json                          a JSON array of objects, or JSONL
    *.parquet, *.pq                 pyarrow, read batch by batch
    a directory saved by `datasets` (save_to_disk)            datasets.load_from_disk
    another directory, or a data set name in the local cache  datasets.load_dataset(..., split=split)
Nothing here touches the network: HF_HUB_OFFLINE is set (unless the caller set it) before `datasets` loads.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from prs_jax.errors import DataError

__all__ = ["Row", "iter_rows", "iter_jsonl", "read_rows", "write_jsonl", "write_text_atomic", "done_ids", "append_rows",
           "JSONL_SUFFIXES", "PARQUET_SUFFIXES"]

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


@dataclass(frozen=True)
class Row:
    """One row of a source and where it was read from (file:line, or source plus row index)."""

    data: dict[str, Any]
    where: str


def _check_single_split(split: str | None, where: str) -> None:
    # A single file is one split; HF's json/parquet builders call it "train", so accept that name too.
    if split not in (None, "train"):
        raise DataError(f"{where}: split {split!r} asked for, but a single file holds one split. Pass split=None "
                        "(or 'train'), or point at a data set directory that has the split.")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _iter_jsonl(path: Path) -> Iterator[Row]:
    # lines are read as bytes and decoded one by one: a text stream decodes ahead in chunks, so a bad byte on
    # line 30 would surface while line 1 is read
    try:
        with _open_bytes(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line); "
                                    "re-encode the file as UTF-8.") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno}). Each line of a JSONL "
                                    "file must be one complete JSON object.") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object (one row per line), got "
                                    f"{type(obj).__name__}.")
                yield Row(obj, where)
    except (OSError, EOFError) as e:  # gzip errors are OSError/EOFError
        raise DataError(f"{path}: cannot read: {e}") from None


def iter_jsonl(path: str | Path) -> Iterator[Row]:
    """Rows of a JSONL file whatever its name (errors name the file and line)."""
    return _iter_jsonl(Path(path))


def _iter_json(path: Path) -> Iterator[Row]:
    try:
        with _open_bytes(path) as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not raw.lstrip()[:1] == b"[":
        yield from _iter_jsonl(path)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}); re-encode the "
                        "file as UTF-8.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
    for i, obj in enumerate(data):
        where = f"{path} [{i}]"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object per array element, got {type(obj).__name__}.")
        yield Row(obj, where)


def _iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            yield Row(obj, f"{path} row {i}")
            i += 1


def _import_datasets() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading a data set directory or name needs the `datasets` package: "
                        "pip install datasets") from e
    return datasets


def _iter_dataset(ds: Any, label: str) -> Iterator[Row]:
    for i, obj in enumerate(ds):
        yield Row(dict(obj), f"{label} row {i}")


def _pick_split(dd: Any, split: str | None, where: str) -> tuple[Any, str]:
    names = list(dd.keys())
    if split is None:
        if len(names) == 1:
            return dd[names[0]], names[0]
        raise DataError(f"{where}: holds splits {names}; say which one with split=...")
    if split not in dd:
        raise DataError(f"{where}: has no split {split!r}; it holds {names}.")
    return dd[split], split


def _iter_saved_dataset(path: Path, split: str | None) -> Iterator[Row]:
    datasets = _import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
        raise DataError(f"{path}: cannot load the saved data set: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds, split = _pick_split(ds, split, str(path))
    elif split is not None and split != "train" and split != str(getattr(ds, "split", None)):
        raise DataError(f"{path}: is a single data set (split {getattr(ds, 'split', None)}), not a DatasetDict; "
                        f"split {split!r} does not exist. Pass split=None.")
    yield from _iter_dataset(ds, f"{path} [{split}]" if split else str(path))


def _iter_load_dataset(name: str, split: str | None, local: bool) -> Iterator[Row]:
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline misses, unknown names and bad files all surface as various types
        hint = ("" if local else " prs_jax reads data offline: download the data set first (or save_to_disk) and "
                "pass its local path.")
        raise DataError(f"{name}: cannot load with datasets.load_dataset(split={split!r}): "
                        f"{type(e).__name__}: {e}.{hint}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds, split = _pick_split(ds, None, name)
    yield from _iter_dataset(ds, f"{name} [{split}]" if split else name)


def iter_rows(source: str | Path, split: str | None = None) -> Iterator[Row]:
    """Rows of a JSONL/JSON/Parquet file, a saved `datasets` directory, or an (offline) `load_dataset` source."""
    path = Path(source)
    name = path.name.lower()
    if path.is_file():
        _check_single_split(split, str(path))
        if name.endswith(JSONL_SUFFIXES):
            return _iter_jsonl(path)
        if name.endswith((".json", ".json.gz")):
            return _iter_json(path)
        if name.endswith(PARQUET_SUFFIXES):
            return _iter_parquet(path)
        raise DataError(f"{path}: unknown data file type; use .jsonl, .json, .parquet, a directory saved with "
                        "datasets' save_to_disk, or a data set name.")
    if path.is_dir():
        if any((path / m).is_file() for m in _DATASET_MARKERS):
            return _iter_saved_dataset(path, split)
        return _iter_load_dataset(str(path), split, local=True)
    if names_a_file(source):
        raise DataError(f"{path}: no such file or directory.")
    return _iter_load_dataset(str(source), split, local=False)


def names_a_file(source: str | Path) -> bool:
    """Whether a data source that does not exist was meant as a local file (a data-file suffix or an explicit
    path start) rather than a data set name for `datasets`."""
    suffixes = JSONL_SUFFIXES + PARQUET_SUFFIXES + (".json",)
    return Path(source).name.lower().endswith(suffixes) or str(source).startswith((".", "/", "~"))


def read_rows(source: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """All rows of `source` as plain dicts (see iter_rows for the sources understood)."""
    return [r.data for r in iter_rows(source, split)]


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSONL (UTF-8, one object per line); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


def done_ids(path: Path) -> set[str]:
    """Ids already written to a restartable JSONL output; cuts a torn last line left by a kill mid-write.
    A broken line before the last one is an error naming the file and line (the file was edited or mixed)."""
    path = Path(path)
    if not path.exists():
        return set()
    if path.is_dir():
        raise DataError(f"{path}: is a directory; the output must be a file path.")
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    done = set()
    for lineno, line in enumerate(raw[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text ({e.reason}); this output cannot be resumed: repair or delete "
                            "the line, or write to another output.") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno}); a broken line inside a "
                            "restartable output (not a torn last line) means it was edited or written by two "
                            "runs: repair or delete the line, or write to another output.") from None
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{where}: a row of a restartable output needs an 'id'; this file was not written by "
                            "prs-jax: write to another output.")
        done.add(str(row["id"]))
    return done


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a small text file via a temporary file and a rename: a kill leaves the old or the new file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows as JSON lines in one write, flushed and fsynced (a kill leaves at most one torn line)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
