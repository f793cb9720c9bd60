"""Semantic segmentation datasets (images + per-pixel class masks) for STEGO: converter to
Parquet shards, readers of the result, synthetic sample.

Raw layout: an image root and a mask root (they may be the same folder), one sub-folder per
split in each::

    IMAGES/<split>/<stem>.<ext>            e.g. coco128/images/train2017/000000000009.jpg
    MASKS/<split>/<stem>.png               e.g. coco128/semantic/train2017/000000000009.png
    MASKS/<split>annot/<stem>.png          e.g. camvid/trainannot/0001TP_006690.png

A mask is a single-channel PNG (mode L, or P read by its palette indices) of raw values:
class ids of the source dataset. A class map (:func:`class_map`) turns them into class
indices ``0..n-1`` or :data:`VOID` (255, ignored pixels). Each shard row holds one image with
its encoded bytes unchanged (a five-crop of it: re-encoded), and the mapped mask as PNG.
Every split gets its own shards, listed in the manifest.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from raylab.data import fs
from raylab.data.imagefolder import _visible_dirs, _visible_files
from raylab.data.shards import MANIFEST, read_manifest, sample_folder, write_shards
from raylab.errors import ConfigError, DataError

FORMAT = "segmentation"
#: Class index of ignored (void) pixels in the stored masks.
VOID = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
ROWS_PER_SHARD = 256
SCHEMA = pa.schema([
    ("image", pa.binary()), ("mask", pa.binary()), ("split", pa.string()),
    ("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
])
#: CamVid's 11 classes (pixel value = index); value 11 is void.
CAMVID_CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                  "Car", "Pedestrian", "Bicyclist")
CAMVID_VOID = 11
_LAYOUT = ("expected IMAGES/<split>/<stem>.<ext> with masks MASKS/<split>/<stem>.png or "
           "MASKS/<split>annot/<stem>.png")
_CLASSES_HINT = ('expected "camvid", a COCO panoptic categories JSON (a list of {id, '
                 'supercategory, ...} or {"categories": [...]}), or a YAML/JSON file '
                 "{classes: [names], map: {value: name or index}, void: [values]}")
_SKIP_HINT = "(skip_bad / --skip-bad skips and records bad items)"


# ----------------------------------------------------------------------------- class map

@dataclass(frozen=True)
class ClassMap:
    """How raw mask values become class indices.

    Attributes:
        names: Class names; a stored mask value ``k < len(names)`` means ``names[k]``.
        lut: ``(256,)`` uint8: raw value -> class index, or :data:`VOID`.
        source: Where the map came from (``"camvid"`` or a file path).
        valid: ``(256,)`` bool: raw values allowed in a mask; another value is an error.
    """

    names: list[str]
    lut: np.ndarray
    source: str
    valid: np.ndarray = field(default_factory=lambda: np.ones(256, bool))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Map an array of raw uint8 mask values to class indices (VOID for void)."""
        return self.lut[values]


def class_map(classes: str | os.PathLike | ClassMap) -> ClassMap:
    """The class map named by ``classes``.

    Args:
        classes: One of

            * ``"camvid"``: CamVid's 11 classes (values 0..10), value 11 void, other
              values an error;
            * a COCO panoptic categories JSON (a list of ``{id, supercategory, ...}``, or a
              dict with ``"categories"``): the coarse COCO-Stuff classes, i.e. the distinct
              supercategories in order of first appearance with categories sorted by id (27
              for COCO's 133 categories: 12 thing then 15 stuff supercategories); value 0
              and every id not in the file are void;
            * a YAML/JSON file ``{classes: [names...], map: {value: class name or index},
              void: [values...]}``: ``map`` defaults to value ``k`` -> class ``k``; values
              in neither ``map`` nor ``void`` are an error when met in a mask;
            * a :class:`ClassMap`, returned as is.

    Returns:
        The :class:`ClassMap`.

    Raises:
        ConfigError: ``classes`` is neither ``"camvid"`` nor an existing file.
        DataError: The file cannot be read or does not hold a valid map (the file named).
    """
    if isinstance(classes, ClassMap):
        return classes
    if isinstance(classes, str) and classes.strip().lower() == "camvid":
        lut = np.full(256, VOID, np.uint8)
        lut[:len(CAMVID_CLASSES)] = np.arange(len(CAMVID_CLASSES))
        valid = np.zeros(256, bool)
        valid[:CAMVID_VOID + 1] = True
        return ClassMap(list(CAMVID_CLASSES), lut, "camvid", valid)
    path = Path(classes)
    if not path.is_file():
        raise ConfigError(f"classes: {os.fspath(classes)!r} is neither a built-in class map "
                          f"nor an existing file; {_CLASSES_HINT}")
    data = _load_map_file(path)
    if isinstance(data, list) or (isinstance(data, dict) and "categories" in data):
        return _coco_map(data if isinstance(data, list) else data["categories"], path)
    if isinstance(data, dict) and "classes" in data:
        return _generic_map(data, path)
    raise DataError(f"not a class map; {_CLASSES_HINT}", path=path)


def _load_map_file(path: Path) -> Any:
    """The parsed JSON (``.json``) or YAML (anything else) content of a class map file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class map ({exc})", path=path) from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # json and yaml raise their own error types
        message = " ".join(str(exc).split())
        raise DataError(f"cannot parse class map ({message}); {_CLASSES_HINT}",
                        path=path) from None


def _pixel_value(value: Any, what: str, path: Path) -> int:
    """A mask value 0..255 from a map file (YAML keys may be ints or digit strings)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise DataError(f"{what} {value!r} is not a mask value; expected an integer 0..255",
                        path=path)
    return value


def _coco_map(categories: Any, path: Path) -> ClassMap:
    """Coarse (supercategory) classes of COCO panoptic categories; id 0 and unknown ids void."""
    if not isinstance(categories, list) or not categories:
        raise DataError(f"expected a non-empty list of categories; {_CLASSES_HINT}", path=path)
    for cat in categories:
        if not (isinstance(cat, dict) and isinstance(cat.get("supercategory"), str)
                and cat["supercategory"]):
            raise DataError(f"category {cat!r} lacks a supercategory name; expected "
                            "{id, name, supercategory, isthing}", path=path)
    ids = [_pixel_value(c.get("id"), "category id", path) for c in categories]
    if 0 in ids:
        raise DataError("category id 0 is listed, but 0 is the unlabelled value of COCO "
                        "panoptic masks; expected ids 1..255", path=path)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"category id {dup} is listed twice", path=path)
    names: list[str] = []
    lut = np.full(256, VOID, np.uint8)
    for cid, cat in sorted(zip(ids, categories, strict=True), key=lambda p: p[0]):
        if cat["supercategory"] not in names:
            names.append(cat["supercategory"])
        lut[cid] = names.index(cat["supercategory"])
    if len(names) >= VOID:
        raise DataError(f"{len(names)} supercategories; expected at most {VOID - 1}", path=path)
    return ClassMap(names, lut, str(path))


def _generic_map(data: dict[str, Any], path: Path) -> ClassMap:
    """``{classes: [...], map: {value: name or index}, void: [...]}``."""
    names = data["classes"]
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n.strip() for n in names)):
        raise DataError(f'"classes" is {names!r}; expected a non-empty list of class names',
                        path=path)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f'class name {dup!r} is listed twice in "classes"', path=path)
    if len(names) >= VOID:
        raise DataError(f"{len(names)} classes; expected at most {VOID - 1}", path=path)
    unknown = sorted(set(data) - {"classes", "map", "void"})
    if unknown:
        raise DataError(f"unknown key(s) {', '.join(map(str, unknown))}; expected classes, "
                        "map, void", path=path)
    mapping = data.get("map")
    if mapping is None:
        mapping = {k: k for k in range(len(names))}
    if not isinstance(mapping, dict):
        raise DataError(f'"map" is {mapping!r}; expected {{value: class name or index}}',
                        path=path)
    void = data.get("void") or []
    if isinstance(void, int | str):
        void = [void]
    if not isinstance(void, list):
        raise DataError(f'"void" is {void!r}; expected a list of mask values', path=path)
    lut = np.full(256, VOID, np.uint8)
    valid = np.zeros(256, bool)
    for key, target in mapping.items():
        value = _pixel_value(key, "map key", path)
        if isinstance(target, str) and target in names:
            index = names.index(target)
        elif isinstance(target, int) and not isinstance(target, bool) \
                and 0 <= target < len(names):
            index = target
        else:
            raise DataError(f"map value {value} -> {target!r} is not a class; expected one of "
                            f"{', '.join(names)} or an index 0..{len(names) - 1}", path=path)
        lut[value], valid[value] = index, True
    for entry in void:
        value = _pixel_value(entry, "void value", path)
        if valid[value] and lut[value] != VOID:
            raise DataError(f"value {value} is both mapped (to {names[lut[value]]!r}) and "
                            "void", path=path)
        lut[value], valid[value] = VOID, True
    return ClassMap(list(names), lut, str(path), valid)


# ----------------------------------------------------------------------------- scanning

@dataclass(frozen=True)
class _Item:
    """One image with the mask it should have."""

    image: Path
    mask: Path
    rel: str


@dataclass
class _Plan:
    """What a conversion will read: image/mask pairs per split, items already bad."""

    images: Path
    masks: Path
    folders: dict[str, str]
    items: dict[str, list[_Item]]
    bad: list[dict[str, str]] = field(default_factory=list)


def _check_root(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} folder not found; {_LAYOUT}", path=path)
    if not path.is_dir():
        raise DataError(f"{what} is not a directory; {_LAYOUT}", path=path)


def _mask_folders(images: Path, masks: Path) -> dict[str, Path]:
    """Split folder name -> its mask folder, for every image sub-folder that has one."""
    found: dict[str, Path] = {}
    for folder in _visible_dirs(images):
        for name in (folder.name, folder.name + "annot"):
            candidate = masks / name
            if candidate.is_dir() and candidate.resolve() != folder.resolve():
                found[folder.name] = candidate
                break
    mask_dirs = {p.resolve() for p in found.values()}
    return {s: m for s, m in found.items() if (images / s).resolve() not in mask_dirs}


def _parse_splits(splits: Mapping[str, str] | Sequence[str] | str | None,
                  present: list[str]) -> dict[str, str]:
    """Split name -> folder name, from a mapping, "name=folder" / "name" entries or a
    comma-separated string."""
    if splits is None:
        return {s: s for s in present}
    if isinstance(splits, str):
        splits = splits.split(",")
    pairs: list[tuple[str, str]] = []
    if isinstance(splits, Mapping):
        pairs = [(str(k).strip(), str(v).strip()) for k, v in splits.items()]
    else:
        for entry in splits:
            name, _, folder = str(entry).partition("=")
            if name.strip() or folder.strip():
                pairs.append((name.strip(), (folder or name).strip()))
    bad = [f"{n}={f}" for n, f in pairs if not n or not f]
    if bad or not pairs:
        example = f"{present[0]}" if present else "train"
        raise ConfigError(f"splits: expected NAME=FOLDER or FOLDER entries, e.g. "
                          f"train={example}; got {bad or 'none'}")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"splits: split name {dup!r} given twice")
    return dict(pairs)


def _scan(images: Path, masks: Path, splits: Any) -> _Plan:
    """Find the split folders and the image/mask pairs of each split to convert."""
    _check_root(images, "image")
    _check_root(masks, "mask")
    mask_dirs = _mask_folders(images, masks)
    if not mask_dirs:
        raise DataError(f"no split folder with a mask folder in {masks}; {_LAYOUT}",
                        path=images)
    wanted = _parse_splits(splits, list(mask_dirs))
    missing = [f for f in wanted.values() if f not in mask_dirs]
    if missing:
        raise DataError(f"split folder(s) {', '.join(missing)} not found (or without a mask "
                        f"folder in {masks}); present: {', '.join(mask_dirs)}", path=images)
    plan = _Plan(images, masks, dict(wanted), {})
    for split, folder in wanted.items():
        items: list[_Item] = []
        for path in _visible_files(images / folder):
            rel = path.relative_to(images).as_posix()
            inner = path.relative_to(images / folder)
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(_Item(path, mask_dirs[folder] / inner.with_suffix(".png"), rel))
            else:
                plan.bad.append({"path": rel, "reason": f"not an image file (extension "
                                 f"{path.suffix or 'none'})"})
        if not items:
            raise DataError(f"split folder has no image files; {_LAYOUT}", path=images / folder)
        plan.items[split] = items
    return plan


# ---------------------------------------------------------------------------- converting

def five_crop_boxes(height: int, width: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """The five square crops of an image, as torchvision's ``five_crop`` cuts them.

    Args:
        height: Image height.
        width: Image width.
        ratio: Crop side as a fraction of ``min(height, width)`` (side rounded, >= 1).

    Returns:
        ``(top, left, side, side)`` of the top-left, top-right, bottom-left, bottom-right
        and centre crops (the centre's offsets rounded as torchvision rounds them).
    """
    side = max(1, round(min(height, width) * ratio))
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    return [(0, 0, side, side), (0, width - side, side, side), (height - side, 0, side, side),
            (height - side, width - side, side, side), (top, left, side, side)]


def _encode_png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _read_mask(item: _Item, cmap: ClassMap) -> np.ndarray | str:
    """The mapped mask of ``item``, or why it is not usable."""
    if not item.mask.is_file():
        return f"no mask {item.mask} for this image; {_LAYOUT}"
    try:
        with Image.open(item.mask) as mask:
            mode = mask.mode
            if mode not in ("L", "P"):
                return (f"mask {item.mask} is not single-channel (mode {mode}); expected an "
                        "8-bit grey (L) or palette (P) PNG of class values")
            raw = np.asarray(mask, dtype=np.uint8)
    except UnidentifiedImageError:
        return f"mask {item.mask} is not a recognised image format"
    except Exception as exc:  # decoders raise many exception types on corrupt data
        return f"cannot read or decode mask {item.mask} ({exc})"
    bad = ~cmap.valid[raw]
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        value = int(raw[row, col])
        return (f"mask {item.mask} holds value {value} (first at row {row}, column {col}), "
                f"which the class map {cmap.source} neither maps nor marks void")
    return cmap.apply(raw)


def _read_image(item: _Item) -> tuple[bytes, Image.Image] | str:
    """The image's bytes and its fully decoded picture, or why it is not usable."""
    try:
        data = item.image.read_bytes()
    except OSError as exc:
        return f"cannot read image ({exc.strerror or exc})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            picture = image.copy()
            picture.format = image.format
    except UnidentifiedImageError:
        return "not a recognised image format"
    except Exception as exc:
        return f"cannot decode image ({exc})"
    return data, picture


def _crop_bytes(picture: Image.Image, box: tuple[int, int, int, int]) -> bytes:
    """A crop re-encoded: JPEG (quality 95) for a JPEG source, PNG otherwise."""
    top, left, h, w = box
    crop = picture.crop((left, top, left + w, top + h))
    out = io.BytesIO()
    if picture.format == "JPEG":
        if crop.mode not in ("RGB", "L"):
            crop = crop.convert("RGB")
        crop.save(out, format="JPEG", quality=95)
    else:
        crop.save(out, format="PNG")
    return out.getvalue()


def _item_rows(item: _Item, cmap: ClassMap, ratio: float,
               ) -> list[tuple[bytes, np.ndarray, str, int, int]] | str:
    """The rows of one image (five with a crop ratio), or why the image is bad."""
    loaded = _read_image(item)
    if isinstance(loaded, str):
        return loaded
    data, picture = loaded
    mask = _read_mask(item, cmap)
    if isinstance(mask, str):
        return mask
    width, height = picture.size
    if mask.shape != (height, width):
        return (f"image is {width}x{height} (width x height) but its mask {item.mask} is "
                f"{mask.shape[1]}x{mask.shape[0]}; expected equal sizes")
    if ratio <= 0:
        return [(data, mask, item.rel, height, width)]
    rows = []
    for i, (top, left, h, w) in enumerate(five_crop_boxes(height, width, ratio)):
        rows.append((_crop_bytes(picture, (top, left, h, w)),
                     np.ascontiguousarray(mask[top:top + h, left:left + w]),
                     f"{item.rel}#crop{i}", h, w))
    return rows


@dataclass
class _Tally:
    """Rows and pixels per class counted while converting."""

    rows: dict[str, int]
    pixels: dict[str, np.ndarray]
    void: dict[str, int]


def _split_tables(plan: _Plan, split: str, cmap: ClassMap, ratio: float, skip_bad: bool,
                  rows_per_shard: int, tally: _Tally) -> Iterator[pa.Table]:
    """Tables of one split's rows; the first bad item raises unless ``skip_bad``."""
    rows: list[tuple[bytes, np.ndarray, str, int, int]] = []
    n = len(cmap.names)
    for item in plan.items[split]:
        made = _item_rows(item, cmap, ratio)
        if isinstance(made, str):
            if not skip_bad:
                raise DataError(f"{made} {_SKIP_HINT}", path=item.image)
            plan.bad.append({"path": item.rel, "reason": made})
            continue
        for row in made:
            counts = np.bincount(row[1].ravel(), minlength=256)
            tally.pixels[split] += counts[:n]
            tally.void[split] += int(counts[VOID])
        tally.rows[split] += len(made)
        rows += made
        if len(rows) >= rows_per_shard:
            yield _table(rows, split)
            rows = []
    if rows:
        yield _table(rows, split)


def _table(rows: list[tuple[bytes, np.ndarray, str, int, int]], split: str) -> pa.Table:
    return pa.table({
        "image": pa.array([r[0] for r in rows], pa.binary()),
        "mask": pa.array([_encode_png(r[1]) for r in rows], pa.binary()),
        "split": pa.array([split] * len(rows), pa.string()),
        "path": pa.array([r[2] for r in rows], pa.string()),
        "height": pa.array([r[3] for r in rows], pa.int32()),
        "width": pa.array([r[4] for r in rows], pa.int32()),
    }, schema=SCHEMA)


def convert_segmentation(images: str | os.PathLike, masks: str | os.PathLike,
                         dst: str | os.PathLike, *, classes: str | os.PathLike | ClassMap,
                         splits: Mapping[str, str] | Sequence[str] | str | None = None,
                         five_crop: float = 0.0, five_crop_splits: Sequence[str] = ("train",),
                         skip_bad: bool = False, overwrite: bool = False,
                         rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, Any]:
    """Convert images with per-pixel class masks into a ``format="segmentation"`` shard
    folder.

    Every image and mask is decoded fully to validate it. An image without a mask, an
    image or mask that does not decode, a mask that is not single-channel, holds a value
    the class map does not know, or differs in size from its image fails the conversion
    (the first such file named, nothing written) unless ``skip_bad``; then the image is
    skipped and recorded under the manifest's ``extra.skipped``.

    Args:
        images: Root holding ``<split folder>/<stem>.<ext>``.
        masks: Root holding ``<split folder>/<stem>.png`` or ``<split folder>annot/...``
            (may be ``images``).
        dst: Output shard folder.
        classes: The class map, see :func:`class_map`.
        splits: Split folders to convert, as split name -> folder: None for every split
            folder (named as the folder), a mapping, or entries ``"name=folder"`` (or
            ``"folder"``), also as one comma-separated string.
        five_crop: Crop ratio (e.g. 0.5, STEGO's); > 0 turns every image of the splits in
            ``five_crop_splits`` into five square crops (:func:`five_crop_boxes`).
        five_crop_splits: Split names (after renaming) that are five-cropped.
        skip_bad: Skip bad images instead of failing.
        overwrite: Replace an existing ``dst``.
        rows_per_shard: Rows per Parquet file; each split has its own shards.

    Returns:
        The manifest written; its ``extra`` holds ``class_names``, ``void`` (255),
        ``class_map_source``, ``counts`` ({split: rows}), ``pixels`` ({split: pixels per
        class}), ``void_pixels`` ({split: n}), ``split_shards`` ({split: [files]}),
        ``split_folders`` ({split: folder}), ``five_crop`` ({"ratio", "splits"}),
        ``skipped`` ([{"path", "reason"}]) and ``source`` ({"images", "masks"}).

    Raises:
        ConfigError: Bad ``classes``, ``splits`` or ``five_crop``.
        DataError: A missing folder or split, a split without images, a bad file (without
            ``skip_bad``), a bad class map file, or an existing ``dst``.
    """
    if not 0.0 <= five_crop <= 1.0:
        raise ConfigError(f"five_crop: expected a crop ratio in (0, 1] or 0 for whole "
                          f"images, got {five_crop}")
    cmap = class_map(classes)
    images, masks = Path(images), Path(masks)
    plan = _scan(images, masks, splits)
    cropped = [s for s in plan.items if five_crop > 0 and s in set(five_crop_splits)]
    n = len(cmap.names)
    tally = _Tally({s: 0 for s in plan.items}, {s: np.zeros(n, np.int64) for s in plan.items},
                   {s: 0 for s in plan.items})
    if plan.bad and not skip_bad:
        first = plan.bad[0]
        raise DataError(f"{first['reason']} {_SKIP_HINT}", path=images / first["path"])

    def tables() -> Iterator[pa.Table]:
        for split in plan.items:
            ratio = five_crop if split in cropped else 0.0
            yield from _split_tables(plan, split, cmap, ratio, skip_bad, rows_per_shard, tally)
            if not tally.rows[split]:
                raise DataError(f"none of the split's {len(plan.items[split])} image(s) is "
                                "usable; expected at least one image with a valid mask",
                                path=images / plan.folders[split])

    def extra(shards: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "class_names": cmap.names,
            "void": VOID,
            "class_map_source": cmap.source,
            "counts": dict(tally.rows),
            "pixels": {s: [int(v) for v in p] for s, p in tally.pixels.items()},
            "void_pixels": dict(tally.void),
            "split_shards": {s: [e["file"] for e in shards if e["group"] == s]
                             for s in plan.items},
            "split_folders": dict(plan.folders),
            "five_crop": {"ratio": float(five_crop) if cropped else 0.0, "splits": cropped},
            "skipped": sorted(plan.bad, key=lambda b: b["path"]),
            "source": {"images": str(images.resolve()), "masks": str(masks.resolve())},
        }

    return write_shards(tables(), dst, format=FORMAT, extra=extra,
                        rows_per_shard=rows_per_shard, overwrite=overwrite, group_by="split")


# ------------------------------------------------------------------------------ reading

def segmentation_manifest(dst: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of a segmentation shard folder.

    Raises:
        DataError: Not a segmentation shard folder, or its ``extra`` is malformed.
    """
    manifest = read_manifest(dst, expected_format=FORMAT)
    extra = manifest.get("extra") or {}
    names, split_shards = extra.get("class_names"), extra.get("split_shards")
    files = {s["file"] for s in manifest["shards"]}
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
            or not isinstance(split_shards, dict)
            or not all(isinstance(v, list) and set(v) <= files for v in split_shards.values())):
        raise DataError('expected "extra" to hold "class_names" (a list of names) and '
                        '"split_shards" ({split: [shard files listed in "shards"]})',
                        path=fs.join(dst, MANIFEST))
    return manifest


def class_names(dst: str | os.PathLike) -> list[str]:
    """Class names of a segmentation shard folder; a mask value ``k`` (not 255) is
    ``names[k]``."""
    return list(segmentation_manifest(dst)["extra"]["class_names"])


def split_names(dst: str | os.PathLike) -> list[str]:
    """The splits of a segmentation shard folder, in conversion order."""
    return list(segmentation_manifest(dst)["extra"]["split_shards"])


def split_rows(dst: str | os.PathLike) -> dict[str, int]:
    """Rows per split of a segmentation shard folder (from the manifest's shard entries)."""
    manifest = segmentation_manifest(dst)
    rows = {s["file"]: s["rows"] for s in manifest["shards"]}
    return {split: sum(rows[f] for f in files)
            for split, files in manifest["extra"]["split_shards"].items()}


def split_paths(dst: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of the shards of one split of a segmentation shard folder.

    Raises:
        DataError: The folder is not a valid segmentation shard folder, or lacks ``split``.
    """
    split_shards = segmentation_manifest(dst)["extra"]["split_shards"]
    if split not in split_shards:
        raise DataError(f"split {split!r} not in this shard folder; present: "
                        f"{', '.join(split_shards) or 'none'}", path=dst)
    return [fs.join(fs.absolute(dst), name) for name in split_shards[split]]


def decode_mask(data: bytes) -> np.ndarray:
    """A stored mask as a ``(H, W)`` uint8 array of class indices (255 = void).

    Raises:
        DataError: The bytes are not a single-channel image.
    """
    try:
        with Image.open(io.BytesIO(data)) as mask:
            if mask.mode not in ("L", "P"):
                raise DataError(f"mask is mode {mask.mode}; expected a single-channel PNG")
            return np.array(mask, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"mask bytes do not decode ({exc}); expected a PNG written by "
                        "raylab data convert segmentation") from None


# --------------------------------------------------------------------- synthetic sample

#: The sample's classes and their raw mask values (the sample's classes.yaml maps them).
SAMPLE_CLASSES = {"sky": 10, "grass": 20, "road": 30, "box": 40, "disk": 50}
SAMPLE_VOID = 0
_SAMPLE_README = """SYNTHETIC SEGMENTATION sample (images + per-pixel class masks)
Written by raylab (raylab.data.segmentation.write_segmentation_sample).

These are NOT real photographs. Each image is a toy outdoor scene: a smooth blue sky
gradient above a random horizon, noisy textured green grass below it, a grey road band with
fine speckle, and red striped boxes and yellow shaded disks as objects, with per-image
colour jitter and pixel noise. Classes differ in colour and in texture.
Layout: images/<split>/<index>.png, masks/<split>/<index>.png (uint8 raw values, mapped by
classes.yaml; value {void} along the 1-pixel border is void), splits train and val.
Convert: raylab data convert segmentation <this>/images <this>/masks SHARDS --classes
<this>/classes.yaml
Parameters: {params}
"""


def _jitter(rng: np.random.Generator, colour: tuple[float, float, float]) -> np.ndarray:
    """A colour with per-channel and brightness jitter."""
    base = np.array(colour) * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-0.06, 0.06)
    return np.clip(base, 0, 1)


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``[size, size, 3]`` uint8 image and its ``[size, size]`` raw mask."""
    y, x = np.mgrid[0:size, 0:size].astype(float) / (size - 1)
    horizon = rng.uniform(0.3, 0.5)
    road_top = rng.uniform(horizon + 0.12, 0.7)
    road_bottom = rng.uniform(road_top + 0.12, 0.95)
    mask = np.full((size, size), SAMPLE_CLASSES["grass"], np.uint8)
    mask[y < horizon] = SAMPLE_CLASSES["sky"]
    mask[(y >= road_top) & (y < road_bottom)] = SAMPLE_CLASSES["road"]
    # sky: smooth vertical gradient, almost no noise
    top, low = _jitter(rng, (0.25, 0.45, 0.85)), _jitter(rng, (0.7, 0.82, 0.95))
    t = (y / max(horizon, 1e-6))[..., None]
    sky = top * (1 - t) + low * t + rng.normal(0, 0.01, (size, size, 3))
    # grass: green with strong noise and vertical blade streaks
    blades = np.sin(x * size * rng.uniform(1.5, 2.5) + rng.uniform(0, 6))[..., None] * 0.08
    grass = (_jitter(rng, (0.2, 0.55, 0.15)) + blades
             + rng.normal(0, 0.12, (size, size, 1)) * np.array([0.6, 1.0, 0.5]))
    # road: grey with fine speckle
    road = _jitter(rng, (0.45, 0.45, 0.47)).mean() + rng.normal(0, 0.05, (size, size, 1))
    road = np.repeat(road, 3, axis=2)
    image = np.where(mask[..., None] == SAMPLE_CLASSES["sky"], sky,
                     np.where(mask[..., None] == SAMPLE_CLASSES["road"], road, grass))
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.15, 0.85), rng.uniform(horizon + 0.05, 0.9)
        r = rng.uniform(0.07, 0.15)
        if rng.random() < 0.5:
            inside = (np.abs(x - cx) < r) & (np.abs(y - cy) < r * rng.uniform(0.6, 1.0))
            stripes = (np.sin(y * size * 1.6) > 0)[..., None] * 0.18
            paint = _jitter(rng, (0.85, 0.12, 0.1)) - stripes
            mask[inside] = SAMPLE_CLASSES["box"]
        else:
            d2 = (x - cx) ** 2 + (y - cy) ** 2
            inside = d2 < r ** 2
            shade = (1 - 0.5 * np.sqrt(d2) / r)[..., None]
            paint = _jitter(rng, (0.95, 0.85, 0.1)) * np.clip(shade, 0.4, 1)
            mask[inside] = SAMPLE_CLASSES["disk"]
        image = np.where(inside[..., None], paint, image)
    image = image + rng.normal(0, 0.02, image.shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = SAMPLE_VOID
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def write_segmentation_sample(dst: str | os.PathLike, *, seed: int = 0, train_images: int = 24,
                              val_images: int = 8, size: int = 64) -> Path:
    """Write a small SYNTHETIC segmentation dataset in the raw layout.

    ``images/{train,val}/<index>.png``, ``masks/{train,val}/<index>.png`` (raw values of
    :data:`SAMPLE_CLASSES`, :data:`SAMPLE_VOID` on the 1-pixel border), ``classes.yaml``
    (the generic class map: sky, grass, road, box, disk; void 0) and ``README.txt``. The
    five classes differ in colour and texture, with per-image colour jitter and noise.

    Args:
        dst: Output folder (new, empty, or an earlier sample, which is replaced).
        seed: Random seed; equal seeds give identical files.
        train_images: Training images.
        val_images: Validation images.
        size: Image side in pixels, 16..1024.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: An argument is out of range.
        DataError: ``dst`` is a file, or a non-empty folder that is not an earlier sample.
    """
    for name, value in (("train_images", train_images), ("val_images", val_images)):
        if value < 1:
            raise ConfigError(f"{name}: expected >= 1, got {value}")
    if not 16 <= size <= 1024:
        raise ConfigError(f"size: expected 16..1024 pixels, got {size}")
    dst = Path(dst)
    with sample_folder(dst, "SYNTHETIC SEGMENTATION", "synthetic segmentation sample") as tmp:
        rng = np.random.default_rng(seed)
        for split, count in (("train", train_images), ("val", val_images)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "masks" / split).mkdir(parents=True)
            for index in range(count):
                pixels, mask = _scene(rng, size)
                Image.fromarray(pixels).save(tmp / "images" / split / f"{index:04d}.png")
                Image.fromarray(mask).save(tmp / "masks" / split / f"{index:04d}.png")
        lines = ["# Class map of the synthetic sample: raw mask value -> class.",
                 f"classes: [{', '.join(SAMPLE_CLASSES)}]", "map:"]
        lines += [f"  {value}: {name}" for name, value in SAMPLE_CLASSES.items()]
        lines += [f"void: [{SAMPLE_VOID}]", ""]
        (tmp / "classes.yaml").write_text("\n".join(lines))
        params = dict(classes=list(SAMPLE_CLASSES), train_images=train_images,
                      val_images=val_images, size=size, seed=seed)
        (tmp / "README.txt").write_text(_SAMPLE_README.format(void=SAMPLE_VOID, params=params))
    return dst
