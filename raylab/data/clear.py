"""CLEAR continual-learning streams: converter to one shard folder per bucket, readers, sample.

Raw layout (the CLEAR release, Lin et al. 2021, e.g. ``clear10/labeled_images``)::

    <src>/<bucket>/<class>/<image>     e.g. clear10/3/bus/1234.jpg; buckets in time order
    <src>/0/<image>                    bucket 0: unlabeled pre-training images, directly or
    <src>/0/<folder>/<image>           in a single folder (with class folders: labelled)

Bucket folders are named by integers; their numeric order is the time order. Class names
are the sorted union of the class folders of every labelled bucket, so a label means the
same class in every bucket. The converted stream is::

    <dst>/manifest.json    format "clear": buckets, class names, counts, source
    <dst>/bucket_00/       a shard folder (format "clear_bucket"); label -1 when unlabeled
    <dst>/bucket_01/ ...

:func:`write_stream` writes the same format from in-memory Arrow tables (e.g. a stream
curated from an image pool).

:func:`write_clear_sample` builds a SYNTHETIC stream in the raw layout from any ImageFolder,
with a gradual, documented appearance and class-prior drift (its README states the formulas).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from raylab.config import atomic_write_text
from raylab.data import imagefolder
from raylab.data.imagefolder import (
    _EXT_TEXT,
    _bad_files_error,
    _is_image_name,
    _Item,
    _load,
    _visible_dirs,
    _visible_files,
)
from raylab.data.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    output_folder,
    read_manifest,
    refuse_store,
    sample_folder,
    shard_paths,
    write_shards,
)
from raylab.errors import ConfigError, DataError

FORMAT = "clear"
BUCKET_FORMAT = "clear_bucket"
UNLABELED = -1
ROWS_PER_SHARD = 1000
SCHEMA = pa.schema([
    ("image", pa.binary()), ("label", pa.int32()), ("bucket", pa.int32()),
    ("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
])
REQUIRED_KEYS = ("format", "schema_version", "rows", "buckets", "bucket_dirs", "bucket_rows",
                 "class_names", "unlabeled_buckets", "counts")
_LAYOUT = ("expected <src>/<bucket>/<class>/<image> with integer bucket folders, e.g. "
           "1/bus/0001.jpg (bucket 0 may hold unlabeled images directly)")
_STREAM_HINT = "expected a CLEAR stream folder (manifest.json and bucket_NN/ shard folders)"


@dataclass
class _Bucket:
    """One bucket to convert: its folder, whether it is labelled, its image files."""

    bucket: int
    folder: Path
    labeled: bool
    items: list[_Item]


# ----------------------------------------------------------------------------- scanning

def parse_buckets(spec: str | Sequence[int]) -> list[int]:
    """Sorted unique bucket ids of ``"1-5"``, ``"1,2,3"``, ``"0,2-4"`` or a list of ints.

    Raises:
        ConfigError: The text is not integers and ranges, or names no bucket.
    """
    hint = f"buckets: expected integers and ranges such as 1-5 or 1,2,3, got {spec!r}"
    if not isinstance(spec, str):
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in spec):
            raise ConfigError(hint)
        found = set(spec)
    else:
        found = set()
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            low, dash, high = part.partition("-")
            if not (low.strip().isdigit() and (not dash or high.strip().isdigit())):
                raise ConfigError(hint)
            found.update(range(int(low), int(high or low) + 1))
    if not found:
        raise ConfigError(hint)
    return sorted(found)


def _ranges(values: Sequence[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs) or "none"


def _bucket_folders(src: Path) -> dict[int, Path]:
    """The bucket folders of ``src`` by bucket id, in time order."""
    if not src.exists():
        raise DataError(f"source folder not found; {_LAYOUT}", path=src)
    if not src.is_dir():
        raise DataError(f"not a directory; {_LAYOUT}", path=src)
    folders = _visible_dirs(src)
    if not folders:
        raise DataError(f"no bucket folders; {_LAYOUT}", path=src)
    odd = [p.name for p in folders if not (p.name.isascii() and p.name.isdigit())]
    if odd:
        raise DataError(f"non-integer bucket folder name(s) {', '.join(odd[:10])}; {_LAYOUT} "
                        "(SRC is the folder holding the bucket folders, e.g. "
                        "clear10/labeled_images)", path=src)
    found: dict[int, Path] = {}
    for folder in folders:
        if int(folder.name) in found:
            raise DataError(f"folders {found[int(folder.name)].name} and {folder.name} are "
                            "the same bucket; expected one folder per bucket", path=src)
        found[int(folder.name)] = folder
    return dict(sorted(found.items()))


def _is_unlabeled(bucket: int, folder: Path) -> bool:
    """Bucket 0 holding images directly or in at most one folder is the unlabeled bucket."""
    if bucket != 0:
        return False
    n_dirs = len(_visible_dirs(folder))
    loose = any(p.is_file() and _is_image_name(p) and not p.name.startswith(".")
                for p in folder.iterdir())
    if loose and n_dirs > 1:
        raise DataError("bucket 0 mixes image files and class folders; expected class "
                        "folders (labelled) or images directly or in one folder (unlabeled)",
                        path=folder)
    return n_dirs <= 1


def _select_classes(present: list[str], classes: str | Sequence[str] | None,
                    src: Path) -> list[str]:
    """The class names to convert, sorted."""
    if classes is None:
        return present
    wanted = classes.split(",") if isinstance(classes, str) else list(classes)
    wanted = sorted(set(c.strip() for c in wanted if c.strip()))
    if not wanted:
        raise ConfigError("classes: expected at least one class name, e.g. "
                          f"{present[0] if present else 'bus'}")
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise DataError(f"class(es) {', '.join(unknown)} not found in any labelled bucket; "
                        f"present: {', '.join(present) or 'none'}", path=src)
    return wanted


def _scan(src: Path, classes: str | Sequence[str] | None,
          buckets: str | Sequence[int] | None, bad: list[dict[str, str]],
          ) -> tuple[list[str], list[_Bucket]]:
    """Class names and the buckets to convert with their image files."""
    folders = _bucket_folders(src)
    wanted = list(folders) if buckets is None else parse_buckets(buckets)
    missing = [b for b in wanted if b not in folders]
    if missing:
        raise DataError(f"bucket(s) {_ranges(missing)} not found; present: "
                        f"{_ranges(list(folders))}", path=src)
    unlabeled = {b for b in folders if _is_unlabeled(b, folders[b])}
    class_dirs = {b: [p.name for p in _visible_dirs(f)] for b, f in folders.items()
                  if b not in unlabeled}
    for b in wanted:
        if b in class_dirs and not class_dirs[b]:
            loose = sum(1 for p in folders[b].iterdir()
                        if p.is_file() and _is_image_name(p) and not p.name.startswith("."))
            hint = (f" but {loose} image file(s) directly inside (only bucket 0 may be "
                    "unlabeled)") if loose else ""
            raise DataError(f"labelled bucket has no class folders{hint}; {_LAYOUT}",
                            path=folders[b])
    names = _select_classes(sorted(set().union(*class_dirs.values())), classes, src)
    plan: list[_Bucket] = []
    for b in wanted:
        folder, items = folders[b], []
        if b in unlabeled:
            files = [(p, UNLABELED) for p in _visible_files(folder)]
        else:
            files = [(p, names.index(c)) for c in class_dirs[b] if c in names
                     for p in _visible_files(folder / c)]
        for path, label in files:
            rel = path.relative_to(src).as_posix()
            if _is_image_name(path):
                items.append(_Item(path, rel, label))
            else:
                bad.append({"path": rel, "reason": "not an image file (extension "
                            f"{path.suffix or 'none'}; expected {_EXT_TEXT})"})
        if not items:
            which = "" if b in unlabeled or classes is None else " of the selected classes"
            raise DataError(f"bucket {b} is empty: no image files{which}; {_LAYOUT}",
                            path=folder)
        plan.append(_Bucket(b, folder, b not in unlabeled, items))
    return names, plan


# ---------------------------------------------------------------------------- converting

def _bucket_dir(bucket: int) -> str:
    return f"bucket_{bucket:02d}"


def _bucket_tables(bucket: _Bucket, rows_per_shard: int, seed: int, bad: list[dict[str, str]],
                   counts: dict[int, int], skip_bad: bool) -> Iterator[pa.Table]:
    """Tables of the decodable images of one bucket, shuffled with ``seed``."""
    items = list(bucket.items)
    random.Random(f"{seed}/{bucket.bucket}").shuffle(items)
    for start in range(0, len(items), rows_per_shard):
        rows: list[tuple[_Item, bytes, int, int]] = []
        for item in items[start:start + rows_per_shard]:
            loaded = _load(item.path)
            if isinstance(loaded, str):
                bad.append({"path": item.rel, "reason": loaded})
            else:
                rows.append((item, *loaded))
                counts[item.label] = counts.get(item.label, 0) + 1
        if rows and (skip_bad or not bad):  # once a file is bad, only validate the rest
            yield pa.table({
                "image": pa.array([r[1] for r in rows], pa.binary()),
                "label": pa.array([r[0].label for r in rows], pa.int32()),
                "bucket": pa.array([bucket.bucket] * len(rows), pa.int32()),
                "path": pa.array([r[0].rel for r in rows], pa.string()),
                "height": pa.array([r[2] for r in rows], pa.int32()),
                "width": pa.array([r[3] for r in rows], pa.int32()),
            }, schema=SCHEMA)


def _write_bucket(bucket: _Bucket, names: list[str], folder: Path, bad: list[dict[str, str]],
                  rows_per_shard: int, seed: int, skip_bad: bool) -> dict[str, Any]:
    """Write one bucket's shard folder; return its manifest."""
    counts: dict[int, int] = {}
    prefix = bucket.folder.name + "/"

    def extra(_: list[dict[str, Any]]) -> dict[str, Any]:
        return _bucket_extra(bucket.bucket, bucket.labeled, names, counts,
                             [b for b in bad if b["path"].startswith(prefix)],
                             str(bucket.folder.resolve()), seed=seed)

    tables = _bucket_tables(bucket, rows_per_shard, seed, bad, counts, skip_bad)
    manifest = write_shards(tables, folder / _bucket_dir(bucket.bucket), format=BUCKET_FORMAT,
                            extra=extra, rows_per_shard=rows_per_shard)
    if skip_bad and not counts:
        raise DataError(f"bucket {bucket.bucket} is empty: none of its {len(bucket.items)} "
                        "image file(s) decodes; expected at least one valid image",
                        path=bucket.folder)
    return manifest


def _bucket_extra(bucket: int, labeled: bool, names: list[str], counts: Mapping[int, int],
                  skipped: list[dict[str, str]], source: str, **more: Any) -> dict[str, Any]:
    """The ``extra`` of one bucket's shard manifest; ``counts`` are rows per label index
    (``{class: n}`` in class order is stored; ``{}`` for an unlabeled bucket)."""
    return {"bucket": bucket, "labeled": labeled, "class_names": names,
            "counts": {n: counts.get(k, 0) for k, n in enumerate(names)} if labeled else {},
            "skipped": sorted(skipped, key=lambda b: b["path"]), "source": source, **more}


def convert_clear(src: str | os.PathLike, dst: str | os.PathLike, *,
                  classes: str | Sequence[str] | None = None,
                  buckets: str | Sequence[int] | None = None, skip_bad: bool = False,
                  overwrite: bool = False, seed: int = 0,
                  rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, Any]:
    """Convert a CLEAR-layout stream into one ``clear_bucket`` shard folder per bucket.

    Every image is decoded fully to validate it. A bad file fails the conversion, listing
    the bad files, unless ``skip_bad``; then it is skipped and recorded in the manifests.
    Everything is written into a temporary sibling of ``dst`` and renamed at the end, so a
    failure leaves nothing behind.

    Args:
        src: Folder holding the integer-named bucket folders.
        dst: Output stream folder.
        classes: Class names to keep (a list or ``"a,b"``); None keeps all. Labels index
            the sorted selected names in every bucket. An unlabeled bucket is kept whole.
        buckets: Buckets to convert (a list of ints, ``"1-5"`` or ``"1,2,3"``); None: all.
        skip_bad: Skip bad files instead of failing.
        overwrite: Replace an existing ``dst``.
        seed: Seed of the per-bucket shuffle of rows.
        rows_per_shard: Rows per Parquet file.

    Returns:
        Summary: ``rows``, ``buckets``, ``bucket_rows`` ({bucket: rows}), ``counts``
        ({bucket: {class: n}}, ``{}`` for an unlabeled bucket), ``class_names``,
        ``unlabeled_buckets``, ``skipped``, ``shards`` and ``dst``; bucket keys are strings.

    Raises:
        DataError: Missing or malformed ``src`` (no or non-integer bucket folders, a
            labelled bucket without class folders, an empty bucket), unknown classes or
            buckets, bad files (without ``skip_bad``), or an existing ``dst``.
        ConfigError: ``classes`` or ``buckets`` is empty or malformed.
    """
    refuse_store(Path(dst))  # before scanning a large source
    src, dst = Path(src), Path(dst)
    bad: list[dict[str, str]] = []
    names, plan = _scan(src, classes, buckets, bad)
    with output_folder(dst, overwrite) as tmp:
        written = {b.bucket: _write_bucket(b, names, tmp, bad, rows_per_shard, seed, skip_bad)
                   for b in plan}
        if bad and not skip_bad:
            raise _bad_files_error(bad, src)
        selection = {"classes": None if classes is None else names,
                     "buckets": None if buckets is None else [b.bucket for b in plan]}
        manifest = _stream_manifest(names, written, {b.bucket for b in plan if not b.labeled},
                                    bad, str(src.resolve()),
                                    {"seed": seed, "selection": selection})
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    keys = ("rows", "buckets", "bucket_rows", "counts", "class_names", "unlabeled_buckets",
            "skipped")
    return {**{k: manifest[k] for k in keys},
            "shards": sum(len(m["shards"]) for m in written.values()), "dst": str(dst)}


def write_stream(dst: str | os.PathLike, class_names: Sequence[str],
                 bucket_tables: Mapping[int, pa.Table], *, unlabeled: Collection[int] = (),
                 source: str, overwrite: bool = False, extra: dict[str, Any] | None = None,
                 rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, Any]:
    """Write a stream of :func:`convert_clear`'s format from in-memory Arrow tables.

    Each bucket's table is read once (``bucket_tables[b]``), in bucket order, and not kept,
    so a lazy mapping holds one bucket in memory at a time. Rows keep their order. The
    stream is written into a temporary sibling of ``dst`` and renamed at the end.

    Args:
        dst: Output stream folder.
        class_names: The classes ``label`` indexes, in every bucket.
        bucket_tables: ``{bucket: table}`` with exactly the columns of :data:`SCHEMA`
            (castable types); at least one row per bucket, paths unique in a bucket,
            ``bucket`` equal to the key, labels in ``0..len(class_names)-1``, or
            :data:`UNLABELED` in an unlabeled bucket.
        unlabeled: Buckets without labels (e.g. ``[0]``).
        source: Where the rows came from, stored as the manifests' ``source``.
        overwrite: Replace an existing ``dst``.
        extra: Keys merged into the top-level manifest (after ``source``).
        rows_per_shard: Rows per Parquet file.

    Returns:
        The top-level manifest as written (what :func:`read_stream_manifest` returns).

    Raises:
        ValueError: Malformed arguments or tables (the message names the bucket).
        DataError: ``dst`` exists and ``overwrite`` is false, or is not writable.
    """
    names = list(class_names)
    order = sorted(bucket_tables)
    _check_stream_args(names, order, unlabeled)
    with output_folder(Path(dst), overwrite) as tmp:
        written: dict[int, dict[str, Any]] = {}
        for bucket in order:
            labeled = bucket not in unlabeled
            table = _stream_table(bucket_tables[bucket], bucket, labeled, len(names))
            labels = table.column("label").to_numpy()
            counts = dict(enumerate(np.bincount(labels, minlength=len(names)).tolist())
                          if labeled else ())
            written[bucket] = write_shards(
                [table], tmp / _bucket_dir(bucket), format=BUCKET_FORMAT,
                extra=_bucket_extra(bucket, labeled, names, counts, [], source),
                rows_per_shard=rows_per_shard)
            del table, labels
        manifest = _stream_manifest(names, written, set(unlabeled), [], source, extra or {})
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_stream_args(names: list[str], order: list[Any], unlabeled: Collection[int]) -> None:
    """Class names unique non-empty strings; bucket ids ints >= 0; ``unlabeled`` among them."""
    if not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        raise ValueError(f"class_names: expected unique non-empty strings, got {names!r}")
    if not order:
        raise ValueError("bucket_tables: expected at least one bucket")
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in order):
        raise ValueError(f"bucket_tables: expected integer bucket ids >= 0, got {order!r}")
    stray = sorted(set(unlabeled) - set(order))
    if stray:
        raise ValueError(f"unlabeled: bucket(s) {stray} not in bucket_tables {order}")


def _stream_table(table: pa.Table, bucket: int, labeled: bool, n_classes: int) -> pa.Table:
    """``table`` cast to :data:`SCHEMA`, after checking it can be bucket ``bucket``."""
    where = f"bucket {bucket}"
    if not isinstance(table, pa.Table):
        raise ValueError(f"{where}: expected a pyarrow Table, got {type(table).__name__}")
    if sorted(table.column_names) != sorted(SCHEMA.names):
        raise ValueError(f"{where}: expected the columns {', '.join(SCHEMA.names)}, got "
                         f"{', '.join(table.column_names)}")
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"{where}: cannot cast to the stream schema ({exc})") from None
    if table.num_rows == 0:
        raise ValueError(f"{where}: no rows; expected at least one row per bucket")
    nulls = [c for c in SCHEMA.names if table.column(c).null_count]
    if nulls:
        raise ValueError(f"{where}: null values in column(s) {', '.join(nulls)}")
    if set(table.column("bucket").to_pylist()) != {bucket}:
        raise ValueError(f"{where}: the bucket column holds other ids than {bucket}")
    labels = set(table.column("label").to_pylist())
    allowed = set(range(n_classes)) if labeled else {UNLABELED}
    if not labels <= allowed:
        expected = f"0..{n_classes - 1}" if labeled else f"{UNLABELED} (unlabeled)"
        raise ValueError(f"{where}: label(s) {sorted(labels - allowed)[:5]}; expected "
                         f"{expected}")
    if len(set(table.column("path").to_pylist())) != table.num_rows:
        raise ValueError(f"{where}: repeated paths; expected one row per path")
    return table


def _stream_manifest(names: list[str], written: dict[int, dict[str, Any]],
                     unlabeled: Collection[int], skipped: list[dict[str, str]], source: str,
                     fields: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level manifest of a stream whose bucket shard folders are ``written``
    (``{bucket: shard manifest}`` in time order); ``fields`` follow ``source``.

    Raises:
        ValueError: A key of ``fields`` is one this function writes.
    """
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "rows": sum(m["rows"] for m in written.values()),
        "buckets": list(written),
        "bucket_dirs": {str(b): _bucket_dir(b) for b in written},
        "bucket_rows": {str(b): m["rows"] for b, m in written.items()},
        "class_names": names,
        "unlabeled_buckets": [b for b in written if b in unlabeled],
        "counts": {str(b): m["extra"]["counts"] for b, m in written.items()},
        "schema": {f.name: str(f.type) for f in SCHEMA},
        "skipped": sorted(skipped, key=lambda b: b["path"]),
        "source": source,
    }
    clash = sorted(set(fields) & {*manifest, "created"})
    if clash:
        raise ValueError(f"extra manifest key(s) {', '.join(clash)} are written by the stream "
                         "writer itself; choose other names")
    return {**manifest, **fields,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------ reading

def is_stream(dst: str | os.PathLike) -> bool:
    """Whether ``dst`` has a manifest.json of format ``"clear"`` (not checked further)."""
    try:
        return json.loads((Path(dst) / MANIFEST).read_text(encoding="utf-8")).get(
            "format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_stream_manifest(dst: str | os.PathLike) -> dict[str, Any]:
    """Read a stream's ``manifest.json`` and check it against every bucket's shard folder.

    Returns:
        The manifest as stored: bucket keys of ``bucket_dirs``, ``bucket_rows`` and
        ``counts`` are strings, ``buckets`` is a list of ints in time order.

    Raises:
        DataError: The folder, manifest or a bucket shard folder is missing or malformed.
    """
    dst = Path(dst)
    path = dst / MANIFEST
    if not dst.is_dir():
        raise DataError(f"stream folder not found; {_STREAM_HINT}", path=dst)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest ({exc}); {_STREAM_HINT}", path=path) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg}); {_STREAM_HINT}", path=path,
                        line=exc.lineno) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"format is {found!r}, expected {FORMAT!r}", path=path)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataError(f"missing key(s) {', '.join(missing)}; expected keys "
                        f"{', '.join(REQUIRED_KEYS)}", path=path)
    if not (isinstance(manifest["buckets"], list) and all(
            isinstance(manifest[k], dict) for k in ("bucket_dirs", "bucket_rows", "counts"))):
        raise DataError('expected "buckets" to be a list of ints and "bucket_dirs", '
                        '"bucket_rows", "counts" to be objects keyed by bucket', path=path)
    for b in manifest["buckets"]:
        name = manifest["bucket_dirs"].get(str(b)) if isinstance(b, int) else None
        if not isinstance(name, str) or name != Path(name).name or name.startswith("."):
            raise DataError(f'bucket {b!r}: expected "bucket_dirs" to name its shard folder',
                            path=path)
        rows = read_manifest(dst / name, expected_format=BUCKET_FORMAT)["rows"]
        if rows != manifest["bucket_rows"].get(str(b)):
            raise DataError(f"bucket {b} holds {rows} rows, manifest.json lists "
                            f"{manifest['bucket_rows'].get(str(b))}", path=dst / name)
    return manifest


def buckets(dst: str | os.PathLike) -> list[int]:
    """The bucket ids of a converted stream, in time order."""
    return list(read_stream_manifest(dst)["buckets"])


def clear_class_names(dst: str | os.PathLike) -> list[str]:
    """Class names of a converted stream; ``label`` indexes this list in every bucket."""
    return list(read_stream_manifest(dst)["class_names"])


def bucket_paths(dst: str | os.PathLike, bucket: int,
                 manifest: dict[str, Any] | None = None) -> list[str]:
    """Absolute paths of the shard files of one bucket of a converted stream.

    ``manifest``: what :func:`read_stream_manifest` returned for ``dst``, when the caller
    has it (reading it checks every bucket's shards, so callers looping over buckets
    read it once).

    Raises:
        DataError: The stream is invalid or has no bucket ``bucket``.
    """
    manifest = read_stream_manifest(dst) if manifest is None else manifest
    if bucket not in manifest["buckets"]:
        raise DataError(f"bucket {bucket!r} not in this stream; present: "
                        f"{_ranges(manifest['buckets'])}", path=dst)
    return shard_paths(Path(dst) / manifest["bucket_dirs"][str(bucket)])


# --------------------------------------------------------------------- synthetic sample

# Checked on CIFAR-10 (5,000 train / 1,000 test images, uniform classes, a 3-layer CNN, 10
# epochs): trained at bucket 1's appearance it scores 57% there and 41% at bucket 10's; trained
# at bucket 10's it scores 57% there. So the drift costs accuracy but leaves the task learnable.
PRIOR_STRENGTH = 0.8     # gamma: class weights exp(gamma * d_c * tau_t)
MIN_SHARE = 0.25         # every class keeps at least ceil(MIN_SHARE * per_class) images
WARMTH = 0.25            # red gain 1 + WARMTH*s, blue gain 1 - WARMTH*s
CONTRAST_DROP = 0.2      # contrast factor 1 - CONTRAST_DROP*s
BLUR_SIGMA = 0.3         # Gaussian blur sigma at s = 1, in pixels per 32 pixels of side
_SAMPLE_README = """SYNTHETIC CLEAR-style stream (NOT the CLEAR benchmark)
Written by raylab (raylab.data.clear.write_clear_sample) from the ImageFolder
{source}
Each source image is used at most once (no image appears in two buckets); the images are
transformed as below, so the drift is synthetic, deterministic (seed {seed}) and documented.

Layout: 0/<index>.png is bucket 0, unlabeled; <t>/<class>/<index>.png for t = 1..{last}.
Notation: t = bucket index, T = {n_buckets} buckets, s_t = t / (T - 1) in [0, 1],
tau_t = 2 s_t - 1 in [-1, 1], C = {n_classes} classes, P = {per_class} images per class and
bucket on average.

Appearance drift (applied in this order to every image of bucket t):
  1. Gaussian blur, sigma_t = {blur} * s_t * min(H, W) / 32 pixels (Pillow GaussianBlur);
  2. contrast towards the image's mean luminance Y (0.299 R + 0.587 G + 0.114 B):
     x <- Y + c_t (x - Y), c_t = 1 - {contrast} * s_t;
  3. colour temperature (warmer with time): R <- R (1 + {warmth} s_t), B <- B (1 - {warmth} s_t);
  then clipped to [0, 255] and saved as PNG.
Class-prior drift: class k of the C sorted classes has the trend d_k = -1 + 2 k / (C - 1)
(the first classes become rarer, the last ones more common). With N = C * P images per bucket
and a floor m = ceil({min_share} * P):
  pi_t(k) = exp({gamma} d_k tau_t) / sum_j exp({gamma} d_j tau_t)
  n_t(k)  = m + largest-remainder rounding of (N - C m) pi_t(k)   (ties: lower k first)
Bucket 0 draws its N unlabeled images with the same formula at t = 0.
Per-bucket parameters, class counts and each image's source file: drift.json.
"""


def drift_parameters(t: int, n_buckets: int) -> dict[str, float]:
    """The appearance parameters of bucket ``t`` (see the module's sample README)."""
    s = t / (n_buckets - 1)
    return {"s": s, "blur_sigma_per_32px": BLUR_SIGMA * s, "contrast": 1 - CONTRAST_DROP * s,
            "warmth": WARMTH * s, "red_gain": 1 + WARMTH * s, "blue_gain": 1 - WARMTH * s}


def class_counts(n_classes: int, per_class: int, t: int, n_buckets: int) -> list[int]:
    """Images per class (in sorted class order) in bucket ``t`` under the prior drift."""
    tau = 2 * t / (n_buckets - 1) - 1
    trend = np.linspace(-1, 1, n_classes)
    weights = np.exp(PRIOR_STRENGTH * trend * tau)
    floor = math.ceil(MIN_SHARE * per_class)
    share = (n_classes * per_class - n_classes * floor) * weights / weights.sum()
    counts = np.floor(share).astype(int)
    order = sorted(range(n_classes), key=lambda k: (-(share[k] - counts[k]), k))
    for k in order[:n_classes * per_class - n_classes * floor - counts.sum()]:
        counts[k] += 1
    return [floor + int(n) for n in counts]


def _drift(image: Image.Image, params: dict[str, float]) -> np.ndarray:
    """Apply blur, contrast and colour temperature to one RGB image; uint8 result."""
    sigma = params["blur_sigma_per_32px"] * min(image.size) / 32
    if sigma > 0:
        image = image.filter(ImageFilter.GaussianBlur(sigma))
    x = np.asarray(image, dtype=np.float32)
    luma = float((x @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
    x = luma + params["contrast"] * (x - luma)
    x *= np.array([params["red_gain"], 1.0, params["blue_gain"]], np.float32)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _source_pools(src: Path, classes: Sequence[str] | None) -> dict[str, list[_Item]]:
    """Every image of the source ImageFolder (all splits) per selected class, sorted."""
    plan = imagefolder._scan(src, None)
    names = plan.class_names if classes is None else sorted(set(classes))
    unknown = [c for c in names if c not in plan.class_names]
    if unknown:
        raise DataError(f"class(es) {', '.join(unknown)} not found in the source; present: "
                        f"{', '.join(plan.class_names)}", path=src)
    if len(names) < 2:
        raise ConfigError(f"classes: expected at least two class names, got {names}")
    pools: dict[str, list[_Item]] = {n: [] for n in names}
    for items in plan.items.values():
        for item in items:
            if plan.class_names[item.label] in pools:
                pools[plan.class_names[item.label]].append(item)
    return {n: sorted(p, key=lambda i: i.rel) for n, p in pools.items()}


def _needed(n_classes: int, per_class: int, n_buckets: int) -> list[int]:
    """Images needed per class over all buckets."""
    per_bucket = [class_counts(n_classes, per_class, t, n_buckets) for t in range(n_buckets)]
    return [sum(c[k] for c in per_bucket) for k in range(n_classes)]


def _check_enough(pools: dict[str, list[_Item]], per_class: int, n_buckets: int,
                  src: Path) -> None:
    """A clear error when a class has fewer source images than the sample draws."""
    have = [len(p) for p in pools.values()]
    need = _needed(len(pools), per_class, n_buckets)
    short = [f"{n} needs {k}, has {h}" for n, k, h in zip(pools, need, have) if k > h]
    if short:
        fits = next((p for p in range(per_class - 1, 0, -1) if all(
            k <= h for k, h in zip(_needed(len(pools), p, n_buckets), have))), 0)
        advice = (f"per_class_per_bucket <= {fits} fits" if fits else
                  "even per_class_per_bucket=1 does not fit; use fewer buckets")
        raise DataError(f"source too small for {n_buckets} buckets of {per_class} images per "
                        f"class (each image used once): {'; '.join(short)}; {advice}",
                        path=src)


def write_clear_sample(src_imagefolder: str | os.PathLike, dst: str | os.PathLike, *,
                       n_buckets: int = 11, per_class_per_bucket: int = 40,
                       classes: Sequence[str] | None = None, seed: int = 0) -> Path:
    """Write a SYNTHETIC CLEAR-layout stream with gradual drift, drawn from an ImageFolder.

    Bucket 0 is unlabeled, buckets 1..n_buckets-1 labelled. Images of every split of the
    source are drawn without replacement (seeded), then transformed with a per-bucket blur,
    contrast drop and warming colour temperature, while the class frequencies drift (the
    first sorted classes become rarer, the last more common; every class keeps at least
    ``ceil(per_class_per_bucket / 4)`` images per bucket). README.txt states the formulas;
    drift.json holds each bucket's parameters, class counts and every image's source.

    Args:
        src_imagefolder: ImageFolder root (``<split>/<class>/<image>``), e.g. CIFAR-10.
        dst: Output folder (new, empty, or an earlier CLEAR sample, which is replaced).
        n_buckets: Number of buckets including the unlabeled bucket 0, at least 3.
        per_class_per_bucket: Average images per class and bucket (N = C * this per bucket).
        classes: Source classes to use (at least two); None uses all.
        seed: Seed of the image draw; equal seeds give identical streams.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: ``n_buckets`` or ``per_class_per_bucket`` is out of range.
        DataError: The source is malformed, lacks a class, is too small (the message says
            how many images each short class needs), or ``dst`` is not usable.
    """
    if not 3 <= n_buckets <= 100:
        raise ConfigError(f"n_buckets: expected 3..100, got {n_buckets}")
    if per_class_per_bucket < 1:
        raise ConfigError(f"per_class_per_bucket: expected >= 1, got {per_class_per_bucket}")
    src, dst = Path(src_imagefolder), Path(dst)
    pools = _source_pools(src, classes)
    _check_enough(pools, per_class_per_bucket, n_buckets, src)
    with sample_folder(dst, "SYNTHETIC CLEAR", "synthetic CLEAR sample") as tmp:
        drift = _write_sample_buckets(pools, tmp, n_buckets, per_class_per_bucket, seed)
        _write_sample_docs(tmp, src, drift, n_buckets, per_class_per_bucket, seed)
    return dst


def _write_sample_buckets(pools: dict[str, list[_Item]], tmp: Path, n_buckets: int,
                          per_class: int, seed: int) -> list[dict[str, Any]]:
    """Draw, transform and write every bucket's images; return per-bucket records."""
    rng = np.random.default_rng(seed)
    order = {n: [pool[i] for i in rng.permutation(len(pool))] for n, pool in pools.items()}
    used = dict.fromkeys(pools, 0)
    records = []
    for t in range(n_buckets):
        params = drift_parameters(t, n_buckets)
        counts = dict(zip(pools, class_counts(len(pools), per_class, t, n_buckets)))
        drawn = [(n, item) for n, k in counts.items() for item in order[n][used[n]:used[n] + k]]
        for n, k in counts.items():
            used[n] += k
        if t == 0:
            drawn = [drawn[i] for i in rng.permutation(len(drawn))]
        sources: dict[str, str] = {}
        index = dict.fromkeys(pools, 0)
        for position, (name, item) in enumerate(drawn):
            rel = f"0/{position:05d}.png" if t == 0 else f"{t}/{name}/{index[name]:04d}.png"
            index[name] += 1
            sources[rel] = item.rel
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with Image.open(item.path) as image:
                    pixels = _drift(image.convert("RGB"), params)
            except Exception as exc:  # decoders raise many exception types on corrupt data
                raise DataError(f"cannot decode source image ({exc}); expected images that "
                                "decode fully", path=item.path) from None
            Image.fromarray(pixels).save(out)
        records.append({"bucket": t, "labeled": t > 0, **params, "counts": counts,
                        "sources": sources})
    return records


def _write_sample_docs(tmp: Path, src: Path, drift: list[dict[str, Any]], n_buckets: int,
                       per_class: int, seed: int) -> None:
    """README.txt (formulas and parameters) and drift.json (per-bucket values)."""
    names = list(drift[0]["counts"])
    (tmp / "README.txt").write_text(_SAMPLE_README.format(
        source=src.resolve(), seed=seed, last=n_buckets - 1, n_buckets=n_buckets,
        n_classes=len(names), per_class=per_class, blur=BLUR_SIGMA, contrast=CONTRAST_DROP,
        warmth=WARMTH, min_share=MIN_SHARE, gamma=PRIOR_STRENGTH))
    doc = {"synthetic": True, "source": str(src.resolve()), "seed": seed,
           "n_buckets": n_buckets, "per_class_per_bucket": per_class, "class_names": names,
           "constants": {"prior_strength": PRIOR_STRENGTH, "min_share": MIN_SHARE,
                         "warmth": WARMTH, "contrast_drop": CONTRAST_DROP,
                         "blur_sigma_per_32px": BLUR_SIGMA},
           "buckets": drift}
    (tmp / "drift.json").write_text(json.dumps(doc, indent=1) + "\n")
