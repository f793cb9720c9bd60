"""Unlabeled, timestamped image pools: converter to Parquet shards with one time per image.

Raw layout: any folder of images, nested folders allowed, e.g. a crawl of photos to be
sorted into a CLEAR-style stream by upload time (``raylab curate clear``)::

    <src>/<image>            e.g. pool/2014/03/1234.jpg
    <src>/<folder>/<image>

Files are found recursively in sorted path order; hidden files and folders are ignored.
Each image gets one timestamp (POSIX seconds, UTC) from one of three sources:

- ``mtime``: the file's modification time;
- ``exif``: EXIF DateTimeOriginal (Exif IFD tag 0x9003), else DateTime (tag 0x0132), as
  ``YYYY:MM:DD HH:MM:SS`` in UTC unless OffsetTimeOriginal (0x9011; OffsetTime 0x9010 for
  DateTime) gives the offset;
- a CSV file with a header row holding the columns ``path`` (relative to ``<src>``, with
  ``/``) and ``timestamp`` (POSIX seconds, or ISO 8601 with ``Z`` or an offset; UTC when
  naive); other columns are ignored.

Rows keep the scan (path) order; each holds the image's encoded bytes unchanged.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image

from raylab.config import atomic_write_text
from raylab.data.imagefolder import (
    _EXT_TEXT,
    _bad_files_error,
    _is_image_name,
    _load,
    _visible_files,
)
from raylab.data.shards import read_manifest, refuse_store, write_shards
from raylab.errors import DataError

FORMAT = "pool"
ROWS_PER_SHARD = 1000
SCHEMA = pa.schema([
    ("image", pa.binary()), ("path", pa.string()), ("timestamp", pa.float64()),
    ("height", pa.int32()), ("width", pa.int32()),
])
CSV_COLUMNS = ("path", "timestamp")
_LAYOUT = "expected a folder of images (nested folders allowed), e.g. pool/2014/0001.jpg"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EXIF_IFD = 0x8769
_EXIF_TAGS = (  # (name, tag, IFD or None for IFD0, offset tag in the Exif IFD)
    ("DateTimeOriginal", 0x9003, _EXIF_IFD, 0x9011),
    ("DateTime", 0x0132, None, 0x9010),
)
_EXIF_FORMAT = "%Y:%m:%d %H:%M:%S"
_MAX_TAGS = 8
_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)")


@dataclass
class _Plan:
    """What a conversion reads: image files (path, relative path), timestamps from a CSV."""

    src: Path
    items: list[tuple[Path, str]]
    csv_times: dict[str, float] | None = None
    bad: list[dict[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------- timestamps

def to_iso(seconds: float) -> str:
    """``2014-03-02T10:20:30+00:00`` for POSIX seconds (UTC), any year 1..9999.

    Raises:
        OverflowError: The time lies outside years 1..9999.
    """
    return (_EPOCH + timedelta(seconds=seconds)).isoformat()


def _checked(seconds: float) -> float | str:
    """``seconds``, or why it is not a usable timestamp."""
    if not math.isfinite(seconds):
        return f"timestamp {seconds} is not a finite number"
    try:
        to_iso(seconds)
    except OverflowError:
        return f"timestamp {seconds} lies outside years 1-9999"
    return seconds


def parse_timestamp(text: str) -> float | str:
    """POSIX seconds of ``text`` (a number, or ISO 8601; naive is UTC), or why not.

    Examples: ``1393755630``, ``1393755630.5``, ``2014-03-02T10:20:30Z``,
    ``2014-03-02 11:20:30+01:00``, ``2014-03-02``.
    """
    text = text.strip()
    try:
        return _checked(float(text))
    except ValueError:
        pass
    iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return (f"timestamp {text!r} is neither POSIX seconds nor ISO 8601 (e.g. "
                "1393755630 or 2014-03-02T10:20:30Z)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return _checked((when - _EPOCH).total_seconds())


def _exif_text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    return str(value).strip("\x00 ")


def exif_timestamp(data: bytes) -> float | str:
    """POSIX seconds of an image's EXIF DateTimeOriginal (else DateTime), or why not.

    The time is UTC unless the matching offset tag (OffsetTimeOriginal, OffsetTime) holds
    ``+HH:MM`` / ``-HH:MM``.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            exif = image.getexif()
            ifds = {None: exif, _EXIF_IFD: exif.get_ifd(_EXIF_IFD)}
    except Exception as exc:  # malformed EXIF raises many exception types
        return f"cannot read EXIF ({exc})"
    for name, tag, ifd, offset_tag in _EXIF_TAGS:
        if tag not in ifds[ifd]:
            continue
        text = _exif_text(ifds[ifd][tag])
        try:
            when = datetime.strptime(text, _EXIF_FORMAT)
        except ValueError:
            return f'EXIF {name} is {text!r}, expected "YYYY:MM:DD HH:MM:SS"'
        offset = _exif_text(ifds[_EXIF_IFD].get(offset_tag, ""))
        zone = timezone.utc
        if offset:
            found = _OFFSET.fullmatch(offset)
            if found is None or int(found[2]) > 23 or int(found[3]) > 59:
                return f'EXIF {name} offset is {offset!r}, expected "+HH:MM" or "-HH:MM"'
            sign = -1 if found[1] == "-" else 1
            zone = timezone(sign * timedelta(hours=int(found[2]), minutes=int(found[3])))
        return _checked((when.replace(tzinfo=zone) - _EPOCH).total_seconds())
    tags = sorted((exif.keys() | ifds[_EXIF_IFD].keys()) - {_EXIF_IFD})
    found = ", ".join(ExifTags.TAGS.get(t, f"0x{t:04x}") for t in tags[:_MAX_TAGS])
    more = f" and {len(tags) - _MAX_TAGS} more" if len(tags) > _MAX_TAGS else ""
    return ("no EXIF DateTimeOriginal or DateTime (found "
            + (f"EXIF tags {found}{more})" if tags else "no EXIF data)"))


def _read_csv(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """``{relative path: timestamp}`` of a timestamps CSV, and ``{relative path: line}``.

    Raises:
        DataError: Naming the CSV file and line: unreadable file, missing columns, an
            unparseable timestamp, a duplicate path.
    """
    hint = f"expected a CSV file with a header row holding {' and '.join(CSV_COLUMNS)}"
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise DataError(f"missing column(s) {', '.join(missing)} in the header row "
                                f"{','.join(header) or '(empty)'}; {hint}", path=path, line=1)
            col = {c: header.index(c) for c in CSV_COLUMNS}
            times: dict[str, float] = {}
            lines: dict[str, int] = {}
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(row) <= max(col.values()):
                    raise DataError(f"row has {len(row)} field(s), the header "
                                    f"{len(header)}; {hint}", path=path, line=line)
                rel = _csv_path(row[col["path"]])
                if not rel:
                    raise DataError(f"empty path; {hint}", path=path, line=line)
                when = parse_timestamp(row[col["timestamp"]])
                if isinstance(when, str):
                    raise DataError(when, path=path, line=line)
                if rel in times:
                    raise DataError(f"duplicate path {rel} (first on line {lines[rel]}); "
                                    "expected one row per image", path=path, line=line)
                times[rel], lines[rel] = when, line
    except FileNotFoundError:
        raise DataError(f"timestamps CSV not found; {hint} (or --timestamps mtime|exif)",
                        path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the timestamps CSV ({exc}); {hint} in UTF-8",
                        path=path) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc}); {hint}", path=path,
                        line=reader.line_num) from None
    return times, lines


def _csv_path(text: str) -> str:
    """A CSV path cell as a relative posix path (``./a//b.jpg`` is ``a/b.jpg``)."""
    text = text.strip().replace("\\", "/")
    return PurePosixPath(text).as_posix() if text else ""


# ----------------------------------------------------------------------------- scanning

def _scan(src: Path, timestamps: str) -> _Plan:
    """The image files of ``src`` and, for a CSV source, the timestamps it gives."""
    if not src.exists():
        raise DataError(f"image folder not found; {_LAYOUT}", path=src)
    if not src.is_dir():
        raise DataError(f"not a directory; {_LAYOUT}", path=src)
    table = None if timestamps in ("mtime", "exif") else Path(timestamps)
    plan = _Plan(src, [])
    for path in _visible_files(src):
        if table is not None and path.resolve() == table.resolve():
            continue  # the timestamps CSV kept beside the images
        rel = path.relative_to(src).as_posix()
        if _is_image_name(path):
            plan.items.append((path, rel))
        else:
            plan.bad.append({"path": rel, "reason": "not an image file (extension "
                             f"{path.suffix or 'none'}; expected {_EXT_TEXT})"})
    if not plan.items:
        raise DataError(f"no image files (extensions {_EXT_TEXT}); {_LAYOUT}", path=src)
    if table is not None:
        plan.csv_times, lines = _read_csv(table)
        found = {rel for _, rel in plan.items} | {b["path"] for b in plan.bad}
        for rel, line in lines.items():
            if rel not in found:
                raise DataError(f"no image file {rel} below {src}; expected every path to "
                                "name an image file relative to the image folder, e.g. "
                                f"{plan.items[0][1]}", path=table, line=line)
    return plan


# ---------------------------------------------------------------------------- converting

def _timestamp(path: Path, rel: str, data: bytes, source: str,
               csv_times: dict[str, float] | None) -> float | str:
    """The image's timestamp from ``source``, or why it has none."""
    if csv_times is not None:
        return csv_times.get(rel, f"no timestamp in CSV {Path(source).name}")
    if source == "exif":
        return exif_timestamp(data)
    try:
        return _checked(path.stat().st_mtime)
    except OSError as exc:
        return f"cannot read the modification time ({exc.strerror or exc})"


def _tables(plan: _Plan, source: str, rows_per_shard: int, skip_bad: bool,
            kept: list[float]) -> Iterator[pa.Table]:
    """Tables of the usable images, in path order; ``kept`` collects their timestamps."""
    for start in range(0, len(plan.items), rows_per_shard):
        rows: list[tuple[bytes, str, float, int, int]] = []
        for path, rel in plan.items[start:start + rows_per_shard]:
            loaded = _load(path)
            when = (_timestamp(path, rel, loaded[0], source, plan.csv_times)
                    if not isinstance(loaded, str) else loaded)
            if isinstance(when, str):
                plan.bad.append({"path": rel, "reason": when})
                continue
            rows.append((loaded[0], rel, when, loaded[1], loaded[2]))
            kept.append(when)
        if rows and (skip_bad or not plan.bad):  # once a file is bad, only validate the rest
            columns = list(zip(*rows))
            yield pa.table({name: pa.array(values, SCHEMA.field(name).type)
                            for name, values in zip(SCHEMA.names, columns)}, schema=SCHEMA)
    if plan.bad and not skip_bad:
        raise _pool_error(plan.bad, plan.src)
    if not kept:
        raise DataError(f"none of the {len(plan.items)} image file(s) is usable; expected "
                        "at least one image that decodes and has a timestamp", path=plan.src)


def _pool_error(bad: list[dict[str, str]], src: Path) -> DataError:
    """:func:`_bad_files_error`, worded for images that may also lack a timestamp."""
    error = _bad_files_error(bad, src)
    reason = error.reason.replace("expected images that decode fully",
                                  "expected images that decode fully and have a timestamp")
    return DataError(reason, path=src)


def _source_name(timestamps: str) -> str:
    return timestamps if timestamps in ("mtime", "exif") else f"csv:{Path(timestamps).name}"


def convert_pool(src: str | os.PathLike, dst: str | os.PathLike, *,
                 timestamps: str = "mtime", skip_bad: bool = False, overwrite: bool = False,
                 rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, Any]:
    """Convert a folder of timestamped images into a ``format="pool"`` shard folder.

    Every image is decoded fully to validate it. A bad file (no image extension, does not
    decode, no usable timestamp) fails the conversion, listing the bad files, unless
    ``skip_bad``; then it is skipped and recorded in the manifest. Errors in the CSV itself
    (missing columns, an unparseable timestamp, a duplicate path, a path naming no file)
    always fail, naming the CSV file and line. The shards are written into a temporary
    sibling of ``dst`` and renamed at the end, so a failure leaves nothing behind.

    Args:
        src: Folder of images (nested folders allowed).
        dst: Output shard folder (a local path).
        timestamps: ``"mtime"``, ``"exif"`` or the path of a CSV file (see the module).
        skip_bad: Skip bad files instead of failing.
        overwrite: Replace an existing ``dst``.
        rows_per_shard: Rows per Parquet file.

    Returns:
        Summary: ``rows``, ``shards``, ``dst``, ``skipped`` ([{"path", "reason"}]),
        ``first`` and ``last`` (ISO 8601 UTC of the earliest and latest timestamp) and
        ``timestamps`` (``mtime``, ``exif`` or ``csv:<file name>``).

    Raises:
        DataError: Missing or empty ``src``, a bad CSV, bad files (without ``skip_bad``),
            no usable image at all, or an existing ``dst`` (without ``overwrite``).
    """
    refuse_store(Path(dst))
    src, dst = Path(src), Path(dst)
    plan = _scan(src, timestamps)
    source = _source_name(timestamps)
    kept: list[float] = []
    extra = _manifest_extra(plan, source, kept)
    manifest = write_shards(_tables(plan, timestamps, rows_per_shard, skip_bad, kept), dst,
                            format=FORMAT, extra=extra, rows_per_shard=rows_per_shard,
                            overwrite=overwrite)
    meta = manifest["extra"]
    return {"rows": manifest["rows"], "shards": len(manifest["shards"]), "dst": str(dst),
            "skipped": meta["skipped"], "first": meta["first"], "last": meta["last"],
            "timestamps": source}


def _manifest_extra(plan: _Plan, source: str,
                    kept: list[float]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The manifest's ``extra``, built once all images have been read."""
    def build(_: list[dict[str, Any]]) -> dict[str, Any]:
        return {"timestamps": source, "first": to_iso(min(kept)), "last": to_iso(max(kept)),
                "skipped": sorted(plan.bad, key=lambda b: b["path"]),
                "source": str(plan.src.resolve())}
    return build


# ------------------------------------------------------------------------------ reading

def read_pool_manifest(dst: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a pool shard folder.

    Raises:
        DataError: ``dst`` is not a valid shard folder, or holds another format (the
            message names it; convert a pool with ``raylab data convert pool``).
    """
    try:
        return read_manifest(dst, expected_format=FORMAT)
    except DataError as exc:
        if exc.reason.startswith("format is "):
            raise DataError(f"{exc.reason} (an image pool converted with `raylab data "
                            "convert pool IMAGES DST`)", path=exc.path) from None
        raise


def write_timestamps_csv(src: str | os.PathLike, csv_path: str | os.PathLike, *,
                         start: str = "2004-01-01", end: str = "2014-12-31",
                         seed: int = 0) -> int:
    """Give every image of ``src`` a SYNTHETIC timestamp, uniform in [start, end), in a CSV
    that ``convert_pool(..., timestamps=csv_path)`` reads (for tests, benchmarks and a
    first try of ``raylab curate clear`` on a folder without upload times).

    Returns:
        The number of images given a time.
    """
    src = Path(src)
    images = [p.relative_to(src).as_posix() for p in _visible_files(src) if _is_image_name(p)]
    low, high = (datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp()
                 for t in (start, end))
    times = np.random.default_rng(seed).uniform(low, high, size=len(images))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows((rel, f"{t:.0f}") for rel, t in zip(images, times))
    atomic_write_text(Path(csv_path), out.getvalue())
    return len(images)
