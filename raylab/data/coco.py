"""COCO instances (detection and instance segmentation): converter to shards, readers.

Raw layout: an image folder and a COCO ``instances`` JSON (``images``, ``annotations``,
``categories``), e.g. ``coco/images/val2017`` with ``coco/annotations/instances_val2017.json``.
An image's file is ``<images_dir>/<file_name>`` (or ``<images_dir>/<basename>``).

Each shard row is one image (images without annotations are kept, as COCO keeps them):
``image_id`` int64, ``file_name`` string (as in the JSON), ``image`` binary (the file's bytes
as on disk), ``width``/``height`` int32, and per instance, in JSON order: ``ann_ids``
list<int64>, ``category_ids`` list<int32> (COCO ids, not contiguous labels), ``boxes``
list<float32> (n*4 flattened COCO ``[x, y, w, h]``, absolute pixels), ``areas``
list<float32> (the JSON's ``area``; the mask's when absent), ``iscrowd`` list<int8> and
``masks`` list<binary> (compressed-RLE ``counts`` for size (height, width)).
Polygons, compressed and uncompressed RLE all become compressed RLE exactly as pycocotools'
``COCO.annToRLE`` builds them, so :func:`decode_masks` equals ``COCO.annToMask``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from raylab.config import atomic_write_text
from raylab.data import fs
from raylab.data.shards import MANIFEST, iter_rows, read_manifest, write_shards
from raylab.errors import DataError

FORMAT = "coco"
ROWS_PER_SHARD = 500
MAX_LISTED = 10
#: How far (pixels) a box may reach beyond the image before it is an error.
BOX_TOLERANCE = 1.0
MASK_KINDS = ("polygon", "rle", "uncompressed_rle")
SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("file_name", pa.string()), ("image", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("ann_ids", pa.list_(pa.int64())), ("category_ids", pa.list_(pa.int32())),
    ("boxes", pa.list_(pa.float32())), ("areas", pa.list_(pa.float32())),
    ("iscrowd", pa.list_(pa.int8())), ("masks", pa.list_(pa.binary())),
])
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")
_LOADERS = min(8, os.cpu_count() or 1)


@dataclass
class _Source:
    """The checked JSON: categories, usable images, their annotations, problems so far."""

    json_path: Path
    images_dir: Path
    categories: list[dict[str, Any]]
    images: list[dict[str, Any]]
    anns: dict[int, list[tuple[dict[str, Any], str]]]  # image id -> (annotation, mask kind)
    bad: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Tally:
    """What was written, for the manifest."""

    images: int = 0
    without: int = 0
    per_category: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    crowd: int = 0


# ------------------------------------------------------------------------------ checks

def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problem(kind: str, id: Any, file: str, reason: str) -> dict[str, Any]:
    return {"kind": kind, "id": id, "file": file, "reason": reason}


def _load_json(path: Path) -> dict[str, Any]:
    """The annotation JSON's top level; a DataError if it is not a COCO instances file."""
    hint = "expected a COCO instances JSON with images, annotations and categories"
    if not path.is_file():
        raise DataError(f"annotation file not found; {hint}", path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg}); {hint}", path=path,
                        line=exc.lineno) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read ({exc}); {hint}", path=path) from None
    if not isinstance(data, dict):
        raise DataError(f"top level is not an object; {hint}", path=path)
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DataError(f"missing key(s) {', '.join(missing)}; {hint}", path=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DataError(f'"{key}" is not a list; {hint}', path=path)
    return data


def _check_categories(entries: list[Any], path: Path) -> list[dict[str, Any]]:
    """The category table as ``{id, name, supercategory}``; any fault is fatal."""
    table: list[dict[str, Any]] = []
    for k, entry in enumerate(entries):
        if not (isinstance(entry, dict) and _is_int(entry.get("id"))
                and isinstance(entry.get("name"), str) and entry["name"]):
            raise DataError(f"category {k} is {str(entry)[:80]}; expected "
                            '{"id": <int>, "name": <non-empty string>, ...}', path=path)
        table.append({"id": entry["id"], "name": entry["name"],
                      "supercategory": entry.get("supercategory")})
    for key in ("id", "name"):
        seen = Counter(c[key] for c in table)
        twice = [str(v) for v, n in seen.items() if n > 1]
        if twice:
            raise DataError(f"category {key}(s) {', '.join(twice)} used more than once; "
                            f"expected unique category {key}s", path=path)
    if not table:
        raise DataError('"categories" is empty; expected at least one category', path=path)
    return table


def _image_problem(entry: Any) -> str | None:
    """Why an ``images`` entry is unusable, or None."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    missing = [k for k in _IMAGE_KEYS if k not in entry]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    if not _is_int(entry["id"]):
        return f"id {entry['id']!r} is not an integer"
    name = entry["file_name"]
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return f"file_name {name!r} is not a relative path"
    if not all(_is_int(entry[k]) and entry[k] > 0 for k in ("width", "height")):
        return f"width/height {entry['width']!r}x{entry['height']!r} are not positive integers"
    return None


def _box_problem(box: Any, width: int, height: int) -> str | None:
    """Why a ``bbox`` is unusable for a ``width`` x ``height`` image, or None."""
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return f"bbox {str(box)[:60]} is not 4 numbers [x, y, width, height]"
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return f"empty box {box} (width and height must be > 0)"
    t = BOX_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return (f"box {box} lies outside the {width}x{height} image (x+w={x + w:g}, "
                f"y+h={y + h:g}; tolerance {t:g} px)")
    return None


def _polygon_problem(polygons: list[Any]) -> str | None:
    """Why a polygon list is unusable, or None."""
    if not polygons:
        return "empty polygon list"
    for k, poly in enumerate(polygons, 1):
        if not (isinstance(poly, list) and all(_is_number(v) for v in poly)):
            return f"polygon {k} is not a list of numbers"
        if len(poly) % 2:
            return f"polygon {k} has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"degenerate polygon {k}: {len(poly) // 2} point(s), expected >= 3"
        xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
        if np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)) == 0:
            return f"degenerate polygon {k}: zero area"
    return None


def compressed_counts(counts: bytes) -> list[int]:
    """The run lengths of a COCO compressed-RLE ``counts`` string.

    Raises:
        ValueError: The string is not a valid compressed RLE.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("truncated run length at the end")
            c = counts[pos] - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {chr(counts[pos])!r} outside the RLE alphabet")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _rle_problem(seg: dict[str, Any], height: int, width: int) -> str | None:
    """Why an RLE segmentation is unusable for a ``height`` x ``width`` image, or None."""
    if seg.get("size") != [height, width]:
        return f"RLE size {seg.get('size')!r} differs from the image's [{height}, {width}]"
    counts = seg["counts"]
    if isinstance(counts, str):
        try:
            counts = compressed_counts(counts.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            return f"invalid compressed RLE ({exc})"
    if any(c < 0 for c in counts):
        return "RLE holds a negative run length"
    if sum(counts) != height * width:
        return f"RLE run lengths sum to {sum(counts)}, expected {height * width} (height x width)"
    return None


def _mask_kind(seg: Any) -> str | None:
    """``polygon``, ``rle``, ``uncompressed_rle``, or None for anything else."""
    if isinstance(seg, list):
        return "polygon"
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        counts = seg["counts"]
        if isinstance(counts, str):
            return "rle"
        if isinstance(counts, list) and all(_is_int(c) for c in counts):
            return "uncompressed_rle"
    return None


def _annotation_problem(ann: dict[str, Any], image: dict[str, Any], kind: str | None,
                        category_ids: set[int]) -> str | None:
    """Why an annotation of a known image is unusable (before rasterising), or None."""
    if not _is_int(ann["category_id"]) or ann["category_id"] not in category_ids:
        return f"unknown category id {ann['category_id']!r}"
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd is {ann['iscrowd']!r}, expected 0 or 1"
    if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
        return f"area {ann['area']!r} is not a number >= 0"
    problem = _box_problem(ann["bbox"], image["width"], image["height"])
    if problem:
        return problem
    seg = ann["segmentation"]
    if kind is None:
        return ("segmentation is neither polygons nor RLE {size, counts} "
                f"({str(seg)[:60]})")
    if kind == "polygon":
        return _polygon_problem(seg)
    return _rle_problem(seg, image["height"], image["width"])


def _read_source(json_path: Path, images_dir: Path) -> _Source:
    """Check everything the JSON alone can tell; the image files are checked later."""
    data = _load_json(json_path)
    categories = _check_categories(data["categories"], json_path)
    category_ids = {c["id"] for c in categories}
    source = _Source(json_path, images_dir, categories, [], {})
    images: dict[int, dict[str, Any]] = {}
    for entry in data["images"]:
        problem = _image_problem(entry)
        if problem is None and entry["id"] in images:
            problem = "duplicate image id"
        if problem:
            info = entry if isinstance(entry, dict) else {}
            source.bad.append(_problem("image", info.get("id"), str(info.get("file_name", "")),
                                       problem))
            continue
        images[entry["id"]] = entry
        source.images.append(entry)
        source.anns[entry["id"]] = []
    if not data["images"]:
        raise DataError('"images" is empty; expected at least one image', path=json_path)
    bad_images = {b["id"]: b for b in source.bad if _is_int(b["id"])}
    dropped: Counter = Counter()
    seen: set[int] = set()
    for ann in data["annotations"]:
        info = ann if isinstance(ann, dict) else {}
        image_id = info.get("image_id")
        image = images.get(image_id) if _is_int(image_id) else None
        file = image["file_name"] if image else ""
        missing = [k for k in _ANN_KEYS if k not in info]
        if missing:
            problem = f"missing key(s) {', '.join(missing)}"
        elif not _is_int(info["id"]) or info["id"] in seen:
            problem = f"annotation id {info['id']!r} is not a unique integer"
        elif image is None:
            if image_id in bad_images:
                dropped[image_id] += 1  # skipped together with its image
                continue
            problem = f"image id {info['image_id']!r} not in images"
        else:
            kind = _mask_kind(info["segmentation"])
            problem = _annotation_problem(info, image, kind, category_ids)
        if problem:
            source.bad.append(_problem("annotation", info.get("id"), file, problem))
            continue
        seen.add(info["id"])
        source.anns[image["id"]].append((info, kind))  # type: ignore[arg-type]
    for image_id, n in dropped.items():
        bad_images[image_id]["reason"] += f"; its {n} annotation(s) skipped with it"
    return source


# ---------------------------------------------------------------------------- converting

def _image_path(images_dir: Path, file_name: str) -> Path:
    """``images_dir/file_name``, or ``images_dir/<basename>`` if only that exists."""
    path = images_dir / file_name
    if not path.exists():
        flat = images_dir / PurePosixPath(file_name).name
        if flat.exists():
            return flat
    return path


def _load_image(path: Path, width: int, height: int) -> bytes | str:
    """The file's bytes after a full decode and a size check, or why it is unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"image file not found ({path})"
    except OSError as exc:
        return f"cannot read image file ({exc.strerror or exc})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.load()
    except UnidentifiedImageError:
        return "image file is not a recognised image format"
    except Exception as exc:  # decoders raise many exception types on corrupt data
        return f"cannot decode image file ({exc})"
    if size != (width, height):
        return f"image file is {size[0]}x{size[1]} pixels but the JSON says {width}x{height}"
    return data


def segmentation_rle(seg: Any, height: int, width: int) -> dict[str, Any]:
    """A checked COCO segmentation as compressed RLE, exactly as ``COCO.annToRLE``."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    counts = seg["counts"]
    return {"size": [height, width],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _row(source: _Source, image: dict[str, Any], loaded: bytes | str,
         tally: _Tally) -> dict[str, Any] | None:
    """The shard row of one image, or None (recorded as bad) if its file is unusable."""
    anns = source.anns[image["id"]]
    if isinstance(loaded, str):
        also = f"; its {len(anns)} annotation(s) skipped with it" if anns else ""
        source.bad.append(_problem("image", image["id"], image["file_name"], loaded + also))
        return None
    h, w = image["height"], image["width"]
    row: dict[str, Any] = {"image_id": image["id"], "file_name": image["file_name"],
                           "image": loaded, "width": w, "height": h, "ann_ids": [],
                           "category_ids": [], "boxes": [], "areas": [], "iscrowd": [],
                           "masks": []}
    names = {c["id"]: c["name"] for c in source.categories}
    for ann, kind in anns:
        rle = segmentation_rle(ann["segmentation"], h, w)
        pixels = int(mask_utils.area(rle))
        if pixels == 0:
            source.bad.append(_problem("annotation", ann["id"], image["file_name"],
                                       f"{kind} mask covers no pixel"))
            continue
        row["ann_ids"].append(ann["id"])
        row["category_ids"].append(ann["category_id"])
        row["boxes"] += [float(v) for v in ann["bbox"]]
        row["areas"].append(float(ann.get("area", pixels)))
        row["iscrowd"].append(int(ann.get("iscrowd", 0)))
        row["masks"].append(rle["counts"])
        tally.per_category[names[ann["category_id"]]] += 1
        tally.kinds[kind] += 1
        tally.crowd += row["iscrowd"][-1]
    tally.images += 1
    tally.without += not row["ann_ids"]
    return row


def _tables(source: _Source, rows_per_shard: int, skip_bad: bool,
            tally: _Tally) -> Iterator[pa.Table]:
    """Shard tables in JSON image order; once anything is bad (without ``skip_bad``) the
    rest is only checked, so that one error lists every problem."""
    with ThreadPoolExecutor(_LOADERS) as pool:
        for start in range(0, len(source.images), rows_per_shard):
            chunk = source.images[start:start + rows_per_shard]
            loaded = pool.map(lambda im: _load_image(
                _image_path(source.images_dir, im["file_name"]), im["width"], im["height"]),
                chunk)
            rows = [r for im, data in zip(chunk, loaded, strict=True)
                    if (r := _row(source, im, data, tally)) is not None]
            if rows and (skip_bad or not source.bad):
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
    if source.bad and not skip_bad:
        raise _problems_error(source.bad, source.json_path)
    if tally.images == 0:
        raise DataError(f"none of the {len(source.images) + len(source.bad)} image(s) is "
                        "usable; expected at least one image file that decodes",
                        path=source.json_path)


def describe_problem(problem: dict[str, Any]) -> str:
    """``annotation 7 (cat.jpg): reason`` for a problem or ``skipped`` entry."""
    file = f" ({problem['file']})" if problem.get("file") else ""
    return f"{problem['kind']} {problem['id']}{file}: {problem['reason']}"


def _problems_error(bad: list[dict[str, Any]], json_path: Path) -> DataError:
    """One error listing the first problems and how many more there are."""
    listed = "; ".join(describe_problem(b) for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(f"{len(bad)} problem(s) in the COCO data (skip_bad / --skip-bad skips "
                     f"and records them): {listed}{more}", path=json_path)


def convert_coco(images_dir: str | os.PathLike, annotations_json: str | os.PathLike,
                 dst: str | os.PathLike, *, skip_bad: bool = False,
                 rows_per_shard: int = ROWS_PER_SHARD, overwrite: bool = False,
                 ) -> dict[str, Any]:
    """Convert COCO instances (one JSON and its images) into a ``format="coco"`` shard folder.

    Every image file is decoded fully and its size compared with the JSON. Problems (a box
    outside the image, a degenerate polygon, an invalid RLE, an empty mask, an unknown
    category or image id, a missing or undecodable image file, malformed entries) fail the
    conversion with one error listing them, and nothing is written, unless ``skip_bad``:
    then bad annotations, and bad images with all their annotations, are skipped and
    recorded in the manifest's ``extra.skipped``.

    Args:
        images_dir: Folder of the image files.
        annotations_json: The COCO instances JSON.
        dst: Output shard folder.
        skip_bad: Skip (and record) bad annotations and images instead of failing.
        rows_per_shard: Images per Parquet file.
        overwrite: Replace an existing ``dst``.

    Returns:
        The manifest written. Its ``extra`` holds ``categories`` ([{id, name,
        supercategory}]), ``source_json`` and ``images_dir`` (absolute), ``counts``
        ({images, images_without_instances, instances, per_category: {name: n},
        mask_kinds: {polygon, rle, uncompressed_rle}, crowd}) and ``skipped`` ([{kind,
        id, file, reason}], kind ``image`` or ``annotation``).

    Raises:
        DataError: Missing or malformed inputs, bad entries (without ``skip_bad``), no
            usable image, or an existing ``dst``.
    """
    images_dir, json_path = Path(images_dir), Path(annotations_json)
    if not images_dir.is_dir():
        raise DataError("images folder not found; expected the folder holding the JSON's "
                        "file_name paths", path=images_dir)
    source = _read_source(json_path, images_dir)
    tally = _Tally()

    def extra(shards: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "categories": source.categories,
            "source_json": str(json_path.resolve()),
            "images_dir": str(images_dir.resolve()),
            "counts": {
                "images": tally.images, "images_without_instances": tally.without,
                "instances": sum(tally.per_category.values()),
                "per_category": {c["name"]: tally.per_category[c["name"]]
                                 for c in source.categories},
                "mask_kinds": {k: tally.kinds[k] for k in MASK_KINDS},
                "crowd": tally.crowd},
            "skipped": source.bad,
        }

    return write_shards(_tables(source, rows_per_shard, skip_bad, tally), dst, format=FORMAT,
                        extra=extra, rows_per_shard=rows_per_shard, overwrite=overwrite)


# ------------------------------------------------------------------------------ reading

def coco_manifest(dst: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a coco shard folder.

    Raises:
        DataError: The folder is not a valid coco shard folder.
    """
    manifest = read_manifest(dst, expected_format=FORMAT)
    categories = (manifest.get("extra") or {}).get("categories")
    if not (isinstance(categories, list) and categories and all(
            isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)
            for c in categories)):
        raise DataError('expected "extra.categories" to be a list of {"id", "name", '
                        '"supercategory"}', path=fs.join(dst, MANIFEST))
    return manifest


def read_categories(dst: str | os.PathLike) -> list[dict[str, Any]]:
    """The COCO category table of a coco shard folder: ``[{id, name, supercategory}]``.

    ``category_ids`` in the rows are these ids (not indices into the list).
    """
    return [dict(c) for c in coco_manifest(dst)["extra"]["categories"]]


def decode_masks(rles: Sequence[bytes | str], height: int, width: int) -> np.ndarray:
    """Masks of one row (its ``masks`` column) as uint8 ``[n, height, width]`` of 0/1."""
    if len(rles) == 0:
        return np.zeros((0, height, width), np.uint8)
    objs = [{"size": [height, width], "counts": r.encode("ascii") if isinstance(r, str) else r}
            for r in rles]
    return np.ascontiguousarray(mask_utils.decode(objs).transpose(2, 0, 1))


def encode_masks(masks: np.ndarray) -> list[bytes]:
    """Binary masks ``[n, H, W]`` as compressed-RLE ``counts`` (the inverse of
    :func:`decode_masks`; also the ``segmentation`` counts of COCO results)."""
    masks = np.asfortranarray(np.asarray(masks, np.uint8).transpose(1, 2, 0))
    return [r["counts"] for r in mask_utils.encode(masks)] if masks.shape[2] else []


def _json_float(value: float) -> float:
    """A float32 value as the shortest float that reads back as the same float32."""
    return float(str(np.float32(value)))


def write_ground_truth_json(dst_shards: str | os.PathLike, path: str | os.PathLike,
                            image_ids: Sequence[int] | None = None) -> Path:
    """Write a COCO ground-truth JSON (images, RLE annotations, categories) from shards.

    For evaluation with pycocotools when the source JSON is not at hand (or to evaluate
    on a subset). Segmentations are compressed RLE with ``counts`` as text.

    Args:
        dst_shards: A coco shard folder.
        path: The JSON file to write (atomically).
        image_ids: Only these images (and their annotations); all if None.

    Returns:
        ``path`` as a Path.

    Raises:
        DataError: Not a coco shard folder, or an image id not in it.
    """
    manifest = coco_manifest(dst_shards)
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    images, anns = [], []
    columns = [f.name for f in SCHEMA if f.name != "image"]
    for row in iter_rows(dst_shards, columns=columns):
        if wanted is not None and row["image_id"] not in wanted:
            continue
        h, w = row["height"], row["width"]
        images.append({"id": row["image_id"], "file_name": row["file_name"], "width": w,
                       "height": h})
        for k, ann_id in enumerate(row["ann_ids"]):
            anns.append({
                "id": ann_id, "image_id": row["image_id"],
                "category_id": row["category_ids"][k],
                "bbox": [_json_float(v) for v in row["boxes"][4 * k:4 * k + 4]],
                "area": _json_float(row["areas"][k]), "iscrowd": row["iscrowd"][k],
                "segmentation": {"size": [h, w], "counts": row["masks"][k].decode("ascii")},
            })
    missing = sorted(wanted - {im["id"] for im in images}) if wanted is not None else []
    if missing:
        raise DataError(f"image id(s) {', '.join(map(str, missing[:MAX_LISTED]))} not in "
                        "this shard folder", path=dst_shards)
    extra = manifest["extra"]
    data = {"info": {"description": "ground truth written by raylab from coco shards",
                     "source_json": extra.get("source_json")},
            "images": images, "annotations": anns, "categories": extra["categories"]}
    atomic_write_text(path, json.dumps(data))
    return Path(path)
