"""A shard folder: ``part-00000.parquet``, ``part-00001.parquet``, ... plus ``manifest.json``.

The folder is written into a temporary sibling and renamed into place at the end, so a
reader never sees a half-written dataset and a failed write leaves nothing behind.
:func:`read_manifest` checks the manifest against the shards' Parquet footers only, which is
cheap enough to do before every run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylab.config import atomic_write_text
from raylab.data import fs
from raylab.errors import DataError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("format", "schema_version", "rows", "shards", "schema")
_FOLDER_HINT = "expected a shard folder with manifest.json and *.parquet files"


def write_shards(tables: Iterable[pa.Table], dst: str | os.PathLike, *, format: str,
                 extra: dict[str, Any] | Callable[[list[dict[str, Any]]], dict[str, Any]]
                 | None = None, rows_per_shard: int = 256, overwrite: bool = False,
                 group_by: str | None = None) -> dict[str, Any]:
    """Write tables as Parquet shards plus ``manifest.json`` into the folder ``dst``.

    Args:
        tables: Tables with one common schema; they are re-cut into shards of
            ``rows_per_shard`` rows (the last shard may be shorter).
        dst: Destination folder; it must not exist unless ``overwrite``.
        format: Dataset format name stored in the manifest (e.g. ``"jigsaws"``).
        extra: JSON-serialisable metadata stored under the manifest's ``"extra"`` key, or
            a function of the shard entries returning it, called once every table has been
            consumed (so that it can report what the tables' producer counted).
        rows_per_shard: Rows per Parquet file.
        overwrite: Replace an existing ``dst``.
        group_by: A column holding one value per table (e.g. ``"split"``). Tables of
            different values never share a shard (the last shard of each run of equal
            values may be shorter), and each shard entry records the value as ``"group"``.

    Returns:
        The manifest that was written.

    Raises:
        DataError: ``dst`` exists and ``overwrite`` is false.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    folder = (publishing(os.fspath(dst), overwrite) if fs.is_uri(dst)
              else output_folder(Path(dst), overwrite))
    with folder as tmp:
        shards, schema = _write_parts(tables, tmp, rows_per_shard, group_by)
        meta = extra(shards) if callable(extra) else extra
        manifest = _make_manifest(format, shards, schema, meta)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextmanager
def publishing(dst: str, overwrite: bool) -> Iterator[Path]:
    """Write a shard set into a local temporary folder, then publish it to the store at
    the URI ``dst``, its ``manifest.json`` last.

    A reader never sees half a set: every reader starts from the manifest, which is
    absent while shards are uploaded (an old set's manifest is deleted first, with
    ``overwrite``) and arrives in one PUT once every shard it lists is there. Shards of an
    old set that the new one does not list are deleted before the manifest arrives. A
    failure before the upload leaves the store as it was.

    Raises:
        DataError: ``dst`` holds files and ``overwrite`` is false; the store refused a
            request (credentials, bucket).
    """
    try:
        existing = fs.list_files(dst)
    except OSError as exc:
        raise DataError(f"cannot list the output location ({fs.describe(exc)})",
                        path=dst) from None
    if existing and not overwrite:
        raise DataError("output location already holds files (expected a new path, or pass "
                        "overwrite)", path=dst)
    with tempfile.TemporaryDirectory(prefix="raylab-publish-") as tmp:
        yield Path(tmp)
        manifest = Path(tmp) / MANIFEST
        text = manifest.read_bytes()
        manifest.unlink()  # uploaded last, on its own
        names = set(os.listdir(tmp))
        try:
            if MANIFEST in existing:
                fs.delete(fs.join(dst, MANIFEST))
            fs.upload_tree(tmp, dst)
            for name in set(existing) - names:
                if name.endswith(".parquet"):
                    fs.delete(fs.join(dst, name))
            fs.write_bytes(fs.join(dst, MANIFEST), text)
        except OSError as exc:
            raise DataError(f"cannot write to the store ({fs.describe(exc)}); no manifest "
                            "was published, so readers see no shard set here", path=dst
                            ) from None


@contextmanager
def output_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Write a dataset into a temporary sibling of ``dst``; rename it into place at the end.

    A failure (or Ctrl-C) removes the temporary folder and leaves ``dst`` as it was.

    Raises:
        DataError: ``dst`` exists and ``overwrite`` is false.
    """
    refuse_store(dst)
    if dst.exists() and not overwrite:
        raise DataError("output folder already exists (expected a new path, or pass "
                        "overwrite)", path=dst)
    tmp = _make_temporary_sibling(dst)
    try:
        yield tmp
        _move_into_place(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_store(dst: Path) -> None:
    """Writers of local folder trees (a CLEAR stream, a sample, cached features) do not
    write to object storage: say so instead of creating a local folder named ``s3:``."""
    if fs.was_uri(dst):
        raise DataError("this output is written to a local folder only (shard sets of data "
                        "convert jigsaws, imagefolder, coco and segmentation can go to "
                        "s3:// / gs://); expected a local path, then copy it to the store",
                        path=str(dst).replace(":/", "://", 1))  # Path made s3:// s3:/


def _make_temporary_sibling(dst: Path) -> Path:
    """Create and return an empty hidden folder next to ``dst`` (its parents as needed).

    Raises:
        DataError: The parent cannot be created or written, e.g. it is a file.
    """
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise DataError(f"cannot create the output folder here ({exc.strerror or exc}); "
                        "expected a path whose parent is a writable folder",
                        path=dst) from None
    return tmp


def _write_parts(tables: Iterable[pa.Table], folder: Path, rows_per_shard: int,
                 group_by: str | None = None,
                 ) -> tuple[list[dict[str, Any]], pa.Schema | None]:
    """Re-cut ``tables`` into shards of ``rows_per_shard`` rows written into ``folder``."""
    shards: list[dict[str, Any]] = []
    pending: list[pa.Table] = []
    n_pending = 0
    schema: pa.Schema | None = None
    group: Any = None

    def flush(table: pa.Table) -> None:
        entry = _write_part(table, folder, len(shards))
        if group_by is not None:
            entry["group"] = group
        shards.append(entry)

    for table in tables:
        if schema is None:
            schema = table.schema
        elif not table.schema.equals(schema):
            raise ValueError(f"table schema changed from {schema} to {table.schema}")
        if group_by is not None and table.num_rows:
            value = _group_value(table, group_by)
            if value != group and n_pending:
                flush(pa.concat_tables(pending))
                pending, n_pending = [], 0
            group = value
        pending.append(table)
        n_pending += table.num_rows
        while n_pending >= rows_per_shard:
            merged = pa.concat_tables(pending)
            flush(merged.slice(0, rows_per_shard))
            rest = merged.slice(rows_per_shard)
            pending, n_pending = [rest], rest.num_rows
    if n_pending:
        flush(pa.concat_tables(pending))
    return shards, schema


def _group_value(table: pa.Table, column: str) -> Any:
    """The single value of ``column`` in ``table``."""
    if column not in table.column_names:
        raise ValueError(f"group_by column {column!r} not in {table.column_names}")
    values = pc.unique(table.column(column)).to_pylist()
    if len(values) != 1:
        raise ValueError(f"expected one {column!r} value per table, got {values[:5]}")
    return values[0]


def _write_part(table: pa.Table, folder: Path, index: int) -> dict[str, Any]:
    """Write one shard and return its manifest entry."""
    name = f"part-{index:05d}.parquet"
    pq.write_table(table, folder / name)
    return {"file": name, "rows": table.num_rows}


def _make_manifest(format: str, shards: list[dict[str, Any]], schema: pa.Schema | None,
                   extra: dict[str, Any] | None) -> dict[str, Any]:
    """Build the manifest dictionary."""
    return {
        "format": format,
        "schema_version": SCHEMA_VERSION,
        "rows": sum(s["rows"] for s in shards),
        "shards": shards,
        "schema": {} if schema is None else {f.name: str(f.type) for f in schema},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }


def _move_into_place(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``dst``; with ``overwrite``, move an old ``dst`` away first."""
    if not (overwrite and dst.exists()):
        os.rename(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{secrets.token_hex(4)}"
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextmanager
def sample_folder(dst: Path, marker: str, what: str) -> Iterator[Path]:
    """Write a synthetic sample into a temporary sibling of ``dst``, then swap it in.

    ``dst`` must be new, empty, or an earlier sample (its README.txt starts with
    ``marker``), so that a user's real data is never replaced. On an error the temporary
    folder is removed and ``dst`` is left as it was.
    """
    refuse_store(dst)
    if dst.exists():
        readme = dst / "README.txt"
        is_sample = readme.is_file() and readme.read_text(errors="replace").startswith(marker)
        if not dst.is_dir():
            raise DataError("exists and is not a folder; expected a new or empty folder",
                            path=dst)
        if any(dst.iterdir()) and not is_sample:
            raise DataError(f"folder is not empty; expected a new or empty folder (or an "
                            f"earlier {what})", path=dst)
    tmp = _make_temporary_sibling(dst)
    try:
        yield tmp
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(dst: str | os.PathLike, expected_format: str | None = None) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard folder and check it against the shard footers.

    Args:
        dst: The shard folder.
        expected_format: If given, the manifest's ``format`` must equal it.

    Returns:
        The manifest dictionary.

    Raises:
        DataError: The folder or manifest is missing or malformed, the format differs, or
            a shard is missing, unreadable, or holds another number of rows or other
            columns than listed.
    """
    dst = os.fspath(dst)
    where = fs.kind(dst)
    if where == "missing":
        bucket = fs.missing_bucket(dst)
        if bucket is not None:
            raise DataError(f"no such bucket {bucket!r} (or these credentials cannot see "
                            "it); expected an existing bucket", path=dst)
        raise DataError(f"shard folder not found ({_FOLDER_HINT})", path=dst)
    if where == "file":
        raise DataError(f"not a directory ({_FOLDER_HINT})", path=dst)
    manifest = _load_manifest(fs.join(dst, MANIFEST))
    if expected_format is not None and manifest["format"] != expected_format:
        raise DataError(f"format is {manifest['format']!r}, expected {expected_format!r}",
                        path=fs.join(dst, MANIFEST))
    for shard in manifest["shards"]:
        _check_shard(dst, shard, manifest["schema"])
    return manifest


def _load_manifest(path: str) -> dict[str, Any]:
    """Load and structurally validate a manifest file (local or in a store)."""
    if fs.kind(path) != "file":
        raise DataError(f"manifest.json not found ({_FOLDER_HINT})", path=path)
    try:
        manifest = json.loads(fs.read_bytes(path).decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg}); expected a raylab shard manifest",
                        path=path, line=exc.lineno) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest ({exc}); expected UTF-8 JSON",
                        path=path) from None
    except RecursionError:
        raise DataError("JSON nested too deeply; expected a raylab shard manifest",
                        path=path) from None
    if not isinstance(manifest, dict):
        raise DataError("expected a JSON object at the top level", path=path)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"missing key(s) {', '.join(missing)}; expected keys "
                        f"{', '.join(REQUIRED_KEYS)}", path=path)
    _check_manifest_fields(manifest, path)
    return manifest


@contextmanager
def _parquet_file(path: str) -> Iterator[pq.ParquetFile]:
    """A shard's ParquetFile, read through its file system (ranged reads in a store);
    the file is closed on leaving (ParquetFile leaves a file it was given open)."""
    with fs.open_input(path) as source, pq.ParquetFile(source) as pf:
        yield pf


def _check_manifest_fields(manifest: dict[str, Any], path: str) -> None:
    """Check the types and consistency of the manifest's required fields."""
    if not isinstance(manifest["format"], str) or not manifest["format"]:
        raise DataError(f'"format" is {manifest["format"]!r}; expected a format name such as '
                        '"jigsaws"', path=path)
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"schema_version is {manifest['schema_version']!r}, expected "
                        f"{SCHEMA_VERSION}", path=path)
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(_valid_entry(s) for s in shards):
        raise DataError('expected "shards" to be a list of {"file": "<name>.parquet", '
                        '"rows": <int>}', path=path)
    if not (isinstance(manifest["schema"], dict)
            and all(isinstance(t, str) for t in manifest["schema"].values())):
        raise DataError('expected "schema" to be an object {column: type}', path=path)
    if not isinstance(manifest.get("extra", {}), dict):
        raise DataError(f'"extra" is {manifest["extra"]!r}; expected an object', path=path)
    total = sum(s["rows"] for s in shards)
    if manifest["rows"] != total:
        raise DataError(f'"rows" is {manifest["rows"]!r}, expected {total} (the sum over '
                        "shards)", path=path)


def _valid_entry(shard: Any) -> bool:
    """Whether a manifest shard entry is well formed and names a file inside the folder."""
    if not isinstance(shard, dict):
        return False
    name, rows = shard.get("file"), shard.get("rows")
    return (isinstance(name, str) and name.endswith(".parquet") and "/" not in name
            and "\\" not in name and not name.startswith(".")
            and isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0)


def _check_shard(dst: str | Path, shard: dict[str, Any], schema: dict[str, str]) -> None:
    """Check that a listed shard exists and its footer matches the manifest.

    The footer's row count must equal the shard's ``rows`` and its columns and types the
    manifest's ``schema``, so that readers never meet a column that is not there.
    """
    path = fs.join(dst, shard["file"])
    try:  # one request per shard; what went wrong is asked only when it failed
        with _parquet_file(path) as pf:
            rows = pf.metadata.num_rows
            found = {f.name: str(f.type) for f in pf.schema_arrow}
    except (pa.ArrowException, OSError) as exc:
        if fs.kind(path) != "file":
            raise DataError("shard listed in manifest.json is missing (expected a Parquet "
                            "file)", path=path) from None
        message = " ".join(str(exc).split())
        raise DataError(f"unreadable Parquet footer ({message}); expected a complete Parquet "
                        "file", path=path) from None
    if rows != shard["rows"]:
        raise DataError(f"shard holds {rows} rows, manifest.json lists {shard['rows']}",
                        path=path)
    _check_columns(path, found, schema)


def _type_text(text: str) -> str:
    """A column type's text without child field names (``list<item: x>`` is ``list<x>``)."""
    return re.sub(r"<[\w.]+: ", "<", text)


def _check_columns(path: str, found: dict[str, str], schema: dict[str, str]) -> None:
    """Raise a DataError naming the first difference between a shard's and the manifest's
    columns."""
    missing = [c for c in schema if c not in found]
    if missing:
        raise DataError(f"shard lacks column(s) {', '.join(missing)} that manifest.json "
                        f"lists; expected columns {', '.join(schema)}", path=path)
    extra = [c for c in found if c not in schema]
    if extra:
        raise DataError(f"shard holds column(s) {', '.join(extra)} that manifest.json does "
                        f"not list; expected columns {', '.join(schema)}", path=path)
    for column, text in schema.items():
        if _type_text(found[column]) != _type_text(text):
            raise DataError(f"column {column!r} has type {found[column]}, manifest.json "
                            f"lists {text}", path=path)


def shard_paths(dst: str | os.PathLike) -> list[str]:
    """Absolute paths of the shards of ``dst`` in manifest order, after checking them.

    Args:
        dst: The shard folder.

    Returns:
        Absolute shard file paths.
    """
    manifest = read_manifest(dst)
    return [fs.join(fs.absolute(dst), s["file"]) for s in manifest["shards"]]


def iter_rows(dst: str | os.PathLike, columns: list[str] | None = None,
              batch_size: int = 64) -> Iterator[dict[str, Any]]:
    """Yield the rows of a shard folder as dictionaries (for small, driver-side reads).

    Args:
        dst: The shard folder.
        columns: Columns to read; all if None.
        batch_size: Rows per Parquet read batch.

    Yields:
        One ``{column: value}`` dictionary per row, in manifest order.

    Raises:
        DataError: The folder is invalid, a requested column does not exist, or a shard's
            data cannot be decoded (the shard is named).
    """
    manifest = read_manifest(dst)
    if columns is not None:
        unknown = [c for c in columns if c not in manifest["schema"]]
        if unknown:
            raise DataError(f"unknown column(s) {', '.join(unknown)}; expected some of "
                            f"{', '.join(manifest['schema'])}", path=fs.join(dst, MANIFEST))
    for shard in manifest["shards"]:
        path = fs.join(dst, shard["file"])
        with _parquet_file(path) as pf:
            batches = pf.iter_batches(batch_size=batch_size, columns=columns)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as exc:
                    raise unreadable_shard(path, exc) from None
                yield from batch.to_pylist()


def unreadable_shard(path: str | os.PathLike, exc: BaseException) -> DataError:
    """The DataError for a shard whose footer is fine but whose data cannot be decoded."""
    message = " ".join(str(exc).split())
    return DataError(f"unreadable Parquet data ({message}); expected a complete, uncorrupted "
                     "Parquet file (convert the dataset again)", path=path)
