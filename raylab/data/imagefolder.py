"""ImageFolder datasets: converter to Parquet shards, readers of the result, synthetic sample.

Raw layout (as read by ``torchvision.datasets.ImageFolder``, one folder per split)::

    <src>/<split>/<class>/<image>      e.g. cifar10/train/airplane/0000.jpg

Class names are the sorted union of the class folder names over every split folder of
``<src>``, so a label means the same class in every split (and in a conversion of one split
only). Each shard row holds one image with its encoded bytes unchanged; decoding happens in
the data pipeline. Every split gets its own shards, listed in the manifest.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from raylab.data import fs
from raylab.data.shards import MANIFEST, read_manifest, sample_folder, write_shards
from raylab.errors import ConfigError, DataError

FORMAT = "imagefolder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
ROWS_PER_SHARD = 1000
MAX_LISTED = 10
SCHEMA = pa.schema([
    ("image", pa.binary()), ("label", pa.int32()), ("split", pa.string()),
    ("path", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
])
_LAYOUT = "expected <src>/<split>/<class>/<image>, e.g. train/cat/0001.jpg"
_EXT_TEXT = " ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class _Item:
    """One candidate image file."""

    path: Path
    rel: str
    label: int


@dataclass
class _Plan:
    """What a conversion will read: classes, image files per split, files already bad."""

    src: Path
    class_names: list[str]
    items: dict[str, list[_Item]]
    bad: list[dict[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- scanning

def _visible_dirs(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden files anywhere below ``folder``, outside hidden folders, sorted."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, f) for f in files if not f.startswith(".")]
    return sorted(found)


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _select_splits(src: Path, splits: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The split folders present in ``src`` and those to convert."""
    if not src.exists():
        raise DataError(f"source folder not found; {_LAYOUT}", path=src)
    if not src.is_dir():
        raise DataError(f"not a directory; {_LAYOUT}", path=src)
    present = [p.name for p in _visible_dirs(src)]
    if not present:
        raise DataError(f"no split folders; {_LAYOUT}", path=src)
    if splits is None:
        return present, present
    wanted = list(dict.fromkeys(s.strip() for s in splits if s.strip()))
    if not wanted:
        raise ConfigError(f"splits: expected at least one split name, e.g. {present[0]}")
    missing = [s for s in wanted if s not in present]
    if missing:
        raise DataError(f"split(s) {', '.join(missing)} not found; present: "
                        f"{', '.join(present)}", path=src)
    return present, wanted


def _class_folders(split_dir: Path) -> list[str]:
    """Class folder names of a split folder; an error if it has none."""
    names = [p.name for p in _visible_dirs(split_dir)]
    if not names:
        loose = sum(1 for p in split_dir.iterdir() if p.is_file() and _is_image_name(p))
        hint = (f" but {loose} image file(s) directly inside (is the source folder one "
                "level too deep?)") if loose else ""
        raise DataError(f"split folder has no class folders{hint}; {_LAYOUT}", path=split_dir)
    return names


def _scan(src: Path, splits: Sequence[str] | None) -> _Plan:
    """Find the classes and the image files of each split to convert."""
    present, wanted = _select_splits(src, splits)
    folders = {s: _class_folders(src / s) for s in wanted}
    others = {p.name for s in present if s not in folders for p in _visible_dirs(src / s)}
    names = sorted(others.union(*folders.values()))
    plan = _Plan(src, names, {})
    for split in wanted:
        items: list[_Item] = []
        for name in folders[split]:
            label = names.index(name)
            for path in _visible_files(src / split / name):
                rel = path.relative_to(src).as_posix()
                if _is_image_name(path):
                    items.append(_Item(path, rel, label))
                else:
                    plan.bad.append({"path": rel, "reason": "not an image file (extension "
                                     f"{path.suffix or 'none'}; expected {_EXT_TEXT})"})
        if not items:
            raise DataError(f"split has no image files; expected <class>/<image> with an "
                            f"extension among {_EXT_TEXT}", path=src / split)
        plan.items[split] = items
    return plan


# ---------------------------------------------------------------------------- converting

def _load(path: Path) -> tuple[bytes, int, int] | str:
    """The file's bytes, height and width, or why it is not a usable image.

    The image is decoded fully (and converted to RGB, as the pipeline will), so that a
    truncated or corrupt file is caught here and not in the middle of training.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.convert("RGB")
            width, height = image.size
    except UnidentifiedImageError:
        return "not a recognised image format"
    except Exception as exc:  # decoders raise many exception types on corrupt data
        return f"cannot decode ({exc})"
    return data, height, width


def _split_tables(plan: _Plan, split: str, rows_per_shard: int, seed: int,
                  counts: dict[str, int]) -> Iterator[pa.Table]:
    """Tables of the decodable images of one split, shuffled with ``seed``."""
    items = list(plan.items[split])
    random.Random(f"{seed}/{split}").shuffle(items)
    for start in range(0, len(items), rows_per_shard):
        rows: list[tuple[_Item, bytes, int, int]] = []
        for item in items[start:start + rows_per_shard]:
            loaded = _load(item.path)
            if isinstance(loaded, str):
                plan.bad.append({"path": item.rel, "reason": loaded})
            else:
                rows.append((item, *loaded))
                counts[plan.class_names[item.label]] += 1
        if rows:
            yield pa.table({
                "image": pa.array([r[1] for r in rows], pa.binary()),
                "label": pa.array([r[0].label for r in rows], pa.int32()),
                "split": pa.array([split] * len(rows), pa.string()),
                "path": pa.array([r[0].rel for r in rows], pa.string()),
                "height": pa.array([r[2] for r in rows], pa.int32()),
                "width": pa.array([r[3] for r in rows], pa.int32()),
            }, schema=SCHEMA)


def _bad_files_error(bad: list[dict[str, str]], src: Path) -> DataError:
    """One error naming how many files below ``src`` are bad and the first few, with why."""
    bad = sorted(bad, key=lambda b: b["path"])
    listed = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(f"{len(bad)} bad image file(s), expected images that decode fully "
                     f"(skip_bad / --skip-bad skips and records them): {listed}{more}",
                     path=src)


def convert_imagefolder(src: str | os.PathLike, dst: str | os.PathLike, *,
                        splits: Sequence[str] | None = None, skip_bad: bool = False,
                        rows_per_shard: int = ROWS_PER_SHARD, overwrite: bool = False,
                        seed: int = 0) -> dict[str, Any]:
    """Convert an ImageFolder tree into a ``format="imagefolder"`` shard folder.

    Every image is decoded fully to validate it. A bad file (one without an image
    extension, or one that does not decode) fails the conversion, listing the bad files,
    unless ``skip_bad``; then it is skipped and recorded in the manifest.

    Args:
        src: Root holding ``<split>/<class>/<image>``.
        dst: Output shard folder.
        splits: Split folders to convert; None converts every split folder of ``src``.
        skip_bad: Skip bad files instead of failing.
        rows_per_shard: Rows per Parquet file; each split has its own shards.
        overwrite: Replace an existing ``dst``.
        seed: Seed of the per-split shuffle of rows (so every shard mixes classes).

    Returns:
        Summary: ``rows``, ``splits`` ({split: rows}), ``counts`` ({split: {class: n}}),
        ``class_names``, ``skipped`` ([{"path", "reason"}]), ``shards`` and ``dst``.

    Raises:
        DataError: Missing or malformed ``src``, an unknown split, a split without class
            folders or images, bad files (without ``skip_bad``), or an existing ``dst``.
        ConfigError: ``splits`` is empty.
    """
    src = Path(src)
    plan = _scan(src, splits)
    counts = {s: dict.fromkeys(plan.class_names, 0) for s in plan.items}

    def tables() -> Iterator[pa.Table]:
        for split in plan.items:
            for table in _split_tables(plan, split, rows_per_shard, seed, counts[split]):
                if skip_bad or not plan.bad:  # once a file is bad, only validate the rest
                    yield table
            if skip_bad and not any(counts[split].values()):
                raise DataError(f"none of the split's {len(plan.items[split])} image file(s) "
                                "decodes; expected at least one valid image", path=src / split)
        if plan.bad and not skip_bad:
            raise _bad_files_error(plan.bad, src)

    extra = _manifest_extra(plan, counts, seed)
    manifest = write_shards(tables(), dst, format=FORMAT, extra=extra,
                            rows_per_shard=rows_per_shard, overwrite=overwrite,
                            group_by="split")
    return {"rows": manifest["rows"], "splits": {s: sum(c.values()) for s, c in counts.items()},
            "counts": counts, "class_names": plan.class_names,
            "skipped": manifest["extra"]["skipped"],
            "shards": len(manifest["shards"]), "dst": str(dst)}


def _manifest_extra(plan: _Plan, counts: dict[str, dict[str, int]],
                    seed: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The manifest's ``extra``, built once all images have been read."""
    def build(shards: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "class_names": plan.class_names,
            "split_shards": {s: [e["file"] for e in shards if e["group"] == s]
                             for s in plan.items},
            "counts": counts,
            "skipped": sorted(plan.bad, key=lambda b: b["path"]),
            "source": str(plan.src.resolve()),
            "seed": seed,
        }
    return build


# ------------------------------------------------------------------------------ reading

def _imagefolder_manifest(dst: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of an imagefolder shard folder."""
    manifest = read_manifest(dst, expected_format=FORMAT)
    extra = manifest.get("extra") or {}
    names, split_shards = extra.get("class_names"), extra.get("split_shards")
    files = {s["file"] for s in manifest["shards"]}
    if (not isinstance(names, list) or not isinstance(split_shards, dict)
            or not all(isinstance(v, list) and set(v) <= files for v in split_shards.values())):
        raise DataError('expected "extra" to hold "class_names" (a list) and "split_shards" '
                        "({split: [shard files listed in \"shards\"]})",
                        path=fs.join(dst, MANIFEST))
    return manifest


def split_paths(dst: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of the shards of one split of an imagefolder shard folder.

    Args:
        dst: The shard folder.
        split: Split name, e.g. ``"train"``.

    Returns:
        Absolute shard file paths, in manifest order.

    Raises:
        DataError: The folder is not a valid imagefolder shard folder, or lacks ``split``.
    """
    split_shards = _imagefolder_manifest(dst)["extra"]["split_shards"]
    if split not in split_shards:
        raise DataError(f"split {split!r} not in this shard folder; present: "
                        f"{', '.join(split_shards) or 'none'}", path=dst)
    return [fs.join(fs.absolute(dst), name) for name in split_shards[split]]


def class_names(dst: str | os.PathLike) -> list[str]:
    """Class names of an imagefolder shard folder; ``label`` indexes this list.

    Raises:
        DataError: The folder is not a valid imagefolder shard folder.
    """
    return list(_imagefolder_manifest(dst)["extra"]["class_names"])


# --------------------------------------------------------------------- synthetic sample

_SAMPLE_README = """SYNTHETIC IMAGE sample (ImageFolder layout)
Written by raylab (raylab.data.imagefolder.write_image_sample).

These are NOT real photographs. Each class is one shape drawn with a random colour,
position, scale and rotation over a random background with a colour gradient and pixel
noise, so that a small CNN has to learn the shape, not the colour.
Layout: <split>/<class>/<index>.png with splits train and test.
Parameters: {params}
"""
_SUPERSAMPLE = 3


# Ordered so that the default first four are distinct enough to learn from 60 images each.
SAMPLE_CLASSES = ("disk", "triangle", "ring", "stripes", "plus", "square", "frame",
                  "checker", "crescent", "bar")
_LUMA = np.array([0.299, 0.587, 0.114])


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Mask of the points ``(u, v)`` (shape frame, about [-1, 1]^2) inside shape ``name``."""
    r2, box = u ** 2 + v ** 2, np.maximum(np.abs(u), np.abs(v))
    masks = {
        "disk": lambda: r2 < 0.9,
        "square": lambda: box < 0.75,
        "triangle": lambda: (v > -0.5) & (np.sqrt(3) * np.abs(u) + v < 1),
        "ring": lambda: (r2 < 1) & (r2 > 0.4),
        "plus": lambda: (np.minimum(np.abs(u), np.abs(v)) < 0.3) & (box < 1),
        "frame": lambda: (box < 0.85) & (box > 0.5),
        "stripes": lambda: (box < 0.9) & (np.sin(3.5 * np.pi * u) > 0),
        "checker": lambda: (box < 0.9) & (np.sin(2.2 * np.pi * u) * np.sin(2.2 * np.pi * v) > 0),
        "crescent": lambda: (r2 < 1) & ((u - 0.45) ** 2 + v ** 2 > 0.6),
        "bar": lambda: (np.abs(u) < 1) & (np.abs(v) < 0.3),
    }
    return masks[name]()


def _draw(rng: np.random.Generator, shape: str, size: int) -> np.ndarray:
    """One ``[size, size, 3]`` uint8 image of a shape on a noisy background."""
    n = size * _SUPERSAMPLE
    y, x = np.mgrid[0:n, 0:n] / (n - 1) * 2 - 1
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    scale, angle = rng.uniform(0.5, 0.8), rng.uniform(0, 2 * np.pi)
    u = (np.cos(angle) * (x - cx) + np.sin(angle) * (y - cy)) / scale
    v = (-np.sin(angle) * (x - cx) + np.cos(angle) * (y - cy)) / scale
    background, foreground = rng.uniform(0, 1, size=(2, 3))
    while abs((foreground - background) @ _LUMA) < 0.25:  # visible in grey as well
        background, foreground = rng.uniform(0, 1, size=(2, 3))
    slope = rng.normal(0, 0.1, size=(2, 3))
    image = background + x[..., None] * slope[0] + y[..., None] * slope[1]
    image = np.where(_shape_mask(shape, u, v)[..., None], foreground, image)
    image = image.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    image += rng.normal(0, 0.05, size=image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _check_sample_args(classes: int, train_per_class: int, test_per_class: int,
                       size: int) -> None:
    """Validate write_image_sample arguments."""
    if not 2 <= classes <= len(SAMPLE_CLASSES):
        raise ConfigError(f"classes: expected 2..{len(SAMPLE_CLASSES)}, got {classes}")
    for name, value in (("train_per_class", train_per_class),
                        ("test_per_class", test_per_class)):
        if value < 1:
            raise ConfigError(f"{name}: expected >= 1, got {value}")
    if not 8 <= size <= 512:
        raise ConfigError(f"size: expected 8..512 pixels, got {size}")


def write_image_sample(dst: str | os.PathLike, *, classes: int = 4,
                       train_per_class: int = 60, test_per_class: int = 20, size: int = 32,
                       seed: int = 0) -> Path:
    """Write a small SYNTHETIC ImageFolder tree (train/test, PNG) of learnable shapes.

    The classes are the first ``classes`` shapes of ``SAMPLE_CLASSES`` (disk, triangle,
    ring, stripes, ...), each drawn with random colours, position, scale and rotation over
    a background gradient with pixel noise. A small CNN reaches about 90% test accuracy on
    the default 4 classes within 10 epochs.

    Args:
        dst: Output folder (new, empty, or an earlier sample, which is replaced).
        classes: Number of classes, 2..10.
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        size: Image side in pixels.
        seed: Random seed; equal seeds give identical images.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: An argument is out of range.
        DataError: ``dst`` is a file, or a non-empty folder that is not an earlier sample.
    """
    dst = Path(dst)
    _check_sample_args(classes, train_per_class, test_per_class, size)
    with sample_folder(dst, "SYNTHETIC IMAGE", "synthetic image sample") as tmp:
        rng = np.random.default_rng(seed)
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            for name in SAMPLE_CLASSES[:classes]:
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for index in range(per_class):
                    pixels = _draw(rng, name, size)
                    Image.fromarray(pixels).save(folder / f"{index:04d}.png")
        params = dict(classes=list(SAMPLE_CLASSES[:classes]), train_per_class=train_per_class,
                      test_per_class=test_per_class, size=size, seed=seed)
        (tmp / "README.txt").write_text(_SAMPLE_README.format(params=params))
    return dst
