"""Summarise a shard folder (``raylab data inspect``) from its manifest and small columns."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylab.data import clear, coco, fs, imagefolder, pool, segmentation
from raylab.data.jigsaws import SKILL_LEVELS
from raylab.data.shards import MANIFEST, read_manifest, shard_paths, unreadable_shard
from raylab.errors import DataError

_GROUP_COLUMN = "task"
_LABEL_COLUMNS = ("skill", "label")
_SMALL_COLUMNS = ("task", "split", "subject", "skill", "label", "n_frames")
_SKIPPED_TEXT = {"no_meta": "without meta line", "missing_file": "without file",
                 "bad_file": "bad file(s)", "image": "bad image(s)",
                 "annotation": "bad annotation(s)"}
_MAX_LISTED_LABELS = 12
_MAX_LISTED_PROBLEMS = 5


def inspect_shards(dst: str | os.PathLike) -> dict[str, Any]:
    """Summarise a shard folder without reading large columns such as kinematics.

    Args:
        dst: The shard folder.

    Returns:
        ``format``, ``rows``, ``frames`` (sum of ``n_frames``, or None without that column),
        ``counts`` ({group: {label: n}}, group = task), ``subjects`` ({group: [..]}),
        ``schema``, ``shards`` (count), ``path``, ``skipped`` ({"no_meta": [..],
        "missing_file": [..]}) and ``extra`` (the manifest's extra without channel names).
        For ``format="imagefolder"``: ``counts`` is {split: {class name: n}} in class
        order, ``class_names``, ``split_shards`` ({split: number of shards}), ``skipped`` is
        {"bad_file": [{"path", "reason"}]}, and ``extra`` leaves out what these repeat.

    Raises:
        For ``format="clear"`` (a converted stream): ``buckets`` (ids in time order),
        ``bucket_rows`` ({bucket: rows}), ``counts`` ({bucket: {class name: n}}, ``{}`` for
        an unlabeled bucket), ``class_names``, ``unlabeled_buckets``, ``bucket_shards``.
        For ``format="coco"``: ``images`` (= rows), ``instances``,
        ``images_without_instances``, ``counts`` ({category name: instances}, read from the
        shards, in category-table order), ``categories``, ``mask_kinds`` ({polygon, rle,
        uncompressed_rle}: what the source held), ``crowd``, ``skipped`` ({"image": [..],
        "annotation": [..]} of {kind, id, file, reason}) and ``extra`` (source paths).
        For ``format="segmentation"``: ``split_rows`` ({split: rows}, read from the
        shards), ``counts`` ({split: {class name: pixels}}), ``void_pixels`` ({split: n}),
        ``pixel_share`` ({class name: share of the labelled pixels over all splits}),
        ``void_share`` (of all pixels), ``class_names``, ``split_shards`` ({split: number
        of shards}), ``five_crop``, ``skipped`` ({"bad_file": [{"path", "reason"}]}).
        For ``format="pool"``: ``first`` and ``last`` (ISO 8601 UTC, read from the
        shards), ``timestamps`` (their source), ``skipped`` ({"bad_file": [..]}).

    Raises:
        DataError: The folder or manifest is invalid.
    """
    if _is_stream(dst):
        return _inspect_clear(dst)
    manifest = read_manifest(dst)
    if manifest["format"] == coco.FORMAT:
        return _inspect_coco(dst)
    if manifest["format"] == segmentation.FORMAT:
        return _inspect_segmentation(dst)
    if manifest["format"] == pool.FORMAT:
        return _inspect_pool(dst, manifest)
    schema = manifest["schema"]
    columns = [c for c in _SMALL_COLUMNS if c in schema]
    values: dict[str, list[Any]] = defaultdict(list)
    for shard in manifest["shards"]:
        table = _read_columns(os.path.join(dst, shard["file"]), columns)
        for name in columns:
            values[name].extend(table.column(name).to_pylist())
    extra = manifest.get("extra") or {}
    if manifest["format"] == imagefolder.FORMAT:
        return _inspect_imagefolder(dst, manifest, values)
    if (manifest["format"] == clear.BUCKET_FORMAT
            and isinstance(extra.get("class_names"), list)):
        names = extra["class_names"]  # one bucket of a CLEAR stream: label -> class name
        values["label"] = [names[k] if 0 <= k < len(names) else "unlabeled"
                           for k in values["label"]]
        values[_GROUP_COLUMN] = [f"bucket {extra.get('bucket')}"] * manifest["rows"]
    return {
        "format": manifest["format"],
        "rows": manifest["rows"],
        "frames": sum(values["n_frames"]) if "n_frames" in schema else None,
        "counts": _counts(values, manifest["rows"]),
        "subjects": _subjects(values),
        "schema": schema,
        "shards": len(manifest["shards"]),
        "path": fs.absolute(dst),
        "created": manifest.get("created"),
        "skipped": {"no_meta": list(extra.get("skipped_no_meta", [])),
                    "missing_file": list(extra.get("skipped_missing_file", []))},
        "extra": {k: v for k, v in extra.items() if k != "channel_names"},
    }


def _is_stream(dst: str | os.PathLike) -> bool:
    """:func:`clear.is_stream`, also for a manifest nested too deeply to parse.

    ``read_manifest`` then reports that manifest as the error it is.
    """
    try:
        return clear.is_stream(dst)
    except RecursionError:
        return False


def _read_columns(path: str | os.PathLike, columns: list[str]) -> pa.Table:
    """Read ``columns`` of one shard; a DataError naming the shard if it does not decode."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable_shard(path, exc) from None


def _check_labels(labels: list[Any], n_names: int, what: str, path: Path,
                  allowed: tuple[int, ...] = ()) -> None:
    """Every label indexes the ``n_names`` class names (or is one of ``allowed``)."""
    for k in labels:
        if k in allowed or (isinstance(k, int) and 0 <= k < n_names):
            continue
        raise DataError(f"a shard holds label {k!r} but {what} lists {n_names} class "
                        f"name(s); expected labels 0..{n_names - 1}", path=path)


def _inspect_imagefolder(dst: str | os.PathLike, manifest: dict[str, Any],
                         values: dict[str, list[Any]]) -> dict[str, Any]:
    """Summary of an imagefolder shard folder: counts per split and class name."""
    names = imagefolder.class_names(dst)
    _check_labels(values["label"], len(names), '"extra.class_names"', Path(dst) / MANIFEST)
    extra = manifest["extra"]
    counts = {split: dict.fromkeys(names, 0) for split in extra["split_shards"]}
    for split, label in zip(values["split"], values["label"], strict=True):
        counts.setdefault(split, dict.fromkeys(names, 0))[names[label]] += 1
    shown = {k: v for k, v in extra.items()
             if k not in ("class_names", "split_shards", "counts", "skipped")}
    return {**_split_folder_summary(dst, manifest, names, shown), "counts": counts}


def _split_folder_summary(dst: str | os.PathLike, manifest: dict[str, Any],
                          names: list[str], shown: dict[str, Any]) -> dict[str, Any]:
    """The keys an imagefolder and a segmentation summary share (shards grouped by split,
    class names, skipped files); ``shown``: the manifest's extras to print as they are."""
    extra = manifest["extra"]
    return {
        "format": manifest["format"],
        "rows": manifest["rows"],
        "frames": None,
        "class_names": names,
        "split_shards": {s: len(files) for s, files in extra["split_shards"].items()},
        "subjects": {},
        "schema": manifest["schema"],
        "shards": len(manifest["shards"]),
        "path": fs.absolute(dst),
        "created": manifest.get("created"),
        "skipped": {"bad_file": list(extra.get("skipped", []))},
        "extra": shown,
    }


def _inspect_coco(dst: str | os.PathLike) -> dict[str, Any]:
    """Summary of a coco shard folder: instances per category, mask kinds, crowd, skipped."""
    manifest = coco.coco_manifest(dst)
    extra = manifest["extra"]
    names = {c["id"]: c["name"] for c in extra["categories"]}
    found: Counter = Counter()
    crowd = without = 0
    for shard in manifest["shards"]:
        table = _read_columns(os.path.join(dst, shard["file"]), ["category_ids", "iscrowd"])
        ids = table.column("category_ids")
        for entry in pc.value_counts(pc.list_flatten(ids)).to_pylist():
            found[entry["values"]] += entry["counts"]
        crowd += int(pc.sum(pc.list_flatten(table.column("iscrowd"))).as_py() or 0)
        without += int(pc.sum(pc.equal(pc.list_value_length(ids), 0)).as_py() or 0)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"shards hold category id(s) {', '.join(map(str, unknown))} that "
                        '"extra.categories" does not list', path=Path(dst) / MANIFEST)
    skipped = list(extra.get("skipped", []))
    kinds = (extra.get("counts") or {}).get("mask_kinds", {})
    return {
        "format": manifest["format"],
        "rows": manifest["rows"],
        "frames": None,
        "images": manifest["rows"],
        "instances": sum(found.values()),
        "images_without_instances": without,
        "counts": {name: found[i] for i, name in names.items()},
        "categories": extra["categories"],
        "mask_kinds": {k: kinds.get(k, 0) for k in coco.MASK_KINDS},
        "crowd": crowd,
        "subjects": {},
        "schema": manifest["schema"],
        "shards": len(manifest["shards"]),
        "path": fs.absolute(dst),
        "created": manifest.get("created"),
        "skipped": {kind: [e for e in skipped if e.get("kind") == kind]
                    for kind in ("image", "annotation")},
        "extra": {k: extra[k] for k in ("source_json", "images_dir") if k in extra},
    }


def _inspect_segmentation(dst: str | os.PathLike) -> dict[str, Any]:
    """Summary of a segmentation shard folder: rows per split, pixels per class."""
    manifest = segmentation.segmentation_manifest(dst)
    extra = manifest["extra"]
    names = extra["class_names"]
    rows: Counter = Counter()
    for shard in manifest["shards"]:
        table = _read_columns(os.path.join(dst, shard["file"]), ["split"])
        rows.update(table.column("split").to_pylist())
    splits = list(extra["split_shards"])
    pixels = extra.get("pixels") or {}
    counts = {}
    for split in splits:
        found = pixels.get(split) or [0] * len(names)
        if not (isinstance(found, list) and len(found) == len(names)):
            raise DataError(f'"extra.pixels" of split {split!r} holds {found!r}; expected '
                            f"{len(names)} pixel counts (one per class)",
                            path=Path(dst) / MANIFEST)
        counts[split] = dict(zip(names, found, strict=True))
    void = {s: int((extra.get("void_pixels") or {}).get(s, 0)) for s in splits}
    totals = {n: sum(c[n] for c in counts.values()) for n in names}
    labelled = sum(totals.values())
    shown = {k: extra[k] for k in ("class_map_source", "split_folders", "source") if k in extra}
    return {
        **_split_folder_summary(dst, manifest, names, shown),
        "split_rows": {s: rows[s] for s in splits},
        "counts": counts,
        "void_pixels": void,
        "pixel_share": {n: (totals[n] / labelled if labelled else 0.0) for n in names},
        "void_share": (sum(void.values()) / (labelled + sum(void.values()))
                       if labelled + sum(void.values()) else 0.0),
        "five_crop": extra.get("five_crop"),
    }


def _inspect_pool(dst: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Summary of an image pool: rows and the time range of its timestamps."""
    times = [pc.min_max(_read_columns(os.path.join(dst, s["file"]), ["timestamp"])
                        .column("timestamp")).as_py() for s in manifest["shards"]]
    times = [t for t in times if t["min"] is not None]
    extra = manifest["extra"]
    return {
        "format": manifest["format"], "rows": manifest["rows"], "frames": None,
        "first": pool.to_iso(min(t["min"] for t in times)) if times else None,
        "last": pool.to_iso(max(t["max"] for t in times)) if times else None,
        "timestamps": extra.get("timestamps"), "subjects": {}, "schema": manifest["schema"],
        "shards": len(manifest["shards"]), "path": fs.absolute(dst),
        "created": manifest.get("created"),
        "skipped": {"bad_file": list(extra.get("skipped", []))},
        "extra": {k: extra[k] for k in ("source",) if k in extra},
    }


def _inspect_clear(dst: str | os.PathLike) -> dict[str, Any]:
    """Summary of a CLEAR stream: rows and counts per bucket and class name."""
    manifest = clear.read_stream_manifest(dst)
    path = Path(dst) / MANIFEST
    names = manifest["class_names"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f'"class_names" is {names!r}; expected a list of class names',
                        path=path)
    if not (isinstance(manifest["unlabeled_buckets"], list)
            and all(isinstance(b, int) for b in manifest["unlabeled_buckets"])):
        raise DataError(f'"unlabeled_buckets" is {manifest["unlabeled_buckets"]!r}; expected '
                        "a list of bucket ids", path=path)
    counts: dict[str, dict[str, int]] = {}
    shards: dict[str, int] = {}
    for bucket in manifest["buckets"]:
        paths = shard_paths(os.path.join(dst, manifest["bucket_dirs"][str(bucket)]))
        labels = [k for p in paths for k in _read_columns(p, ["label"])
                  .column("label").to_pylist()]
        _check_labels(labels, len(names), '"class_names"', path, allowed=(clear.UNLABELED,))
        unlabeled = bucket in manifest["unlabeled_buckets"]
        found = Counter(names[k] for k in labels if k != clear.UNLABELED)
        counts[str(bucket)] = {} if unlabeled else {n: found[n] for n in names}
        shards[str(bucket)] = len(paths)
    shown = ("source", "seed", "selection")
    return {
        "format": manifest["format"],
        "rows": manifest["rows"],
        "frames": None,
        "buckets": manifest["buckets"],
        "bucket_rows": manifest["bucket_rows"],
        "counts": counts,
        "class_names": names,
        "unlabeled_buckets": manifest["unlabeled_buckets"],
        "bucket_shards": shards,
        "subjects": {},
        "schema": manifest.get("schema", {}),
        "shards": sum(shards.values()),
        "path": fs.absolute(dst),
        "created": manifest.get("created"),
        "skipped": {"bad_file": list(manifest.get("skipped", []))},
        "extra": {k: manifest[k] for k in shown if k in manifest},
    }


def _counts(values: dict[str, list[Any]], rows: int) -> dict[str, dict[str, int]]:
    """Rows per group and label, e.g. ``{"Suturing": {"N": 19, "I": 10, "E": 9}}``."""
    label_col = next((c for c in _LABEL_COLUMNS if values.get(c)), None)
    groups = values.get(_GROUP_COLUMN) or ["all"] * rows
    labels = values[label_col] if label_col else ["-"] * rows
    counts: dict[str, Counter] = defaultdict(Counter)
    for group, label in zip(groups, labels, strict=True):
        counts[str(group)][str(label)] += 1
    return {g: dict(sorted(c.items(), key=_label_order)) for g, c in sorted(counts.items())}


def _label_order(item: tuple[str, int]) -> tuple[int, str]:
    """Sort key putting skill levels in N, I, E order and other labels alphabetically."""
    return (SKILL_LEVELS.index(item[0]), "") if item[0] in SKILL_LEVELS else (3, item[0])


def _subjects(values: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Sorted subjects per group."""
    if not values.get("subject"):
        return {}
    groups = values.get(_GROUP_COLUMN) or ["all"] * len(values["subject"])
    found: dict[str, set[str]] = defaultdict(set)
    for group, subject in zip(groups, values["subject"], strict=True):
        found[str(group)].add(str(subject))
    return {g: sorted(s) for g, s in sorted(found.items())}


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable multi-line text of :func:`inspect_shards` output.

    Args:
        info: The dictionary returned by :func:`inspect_shards`.

    Returns:
        Text without a trailing newline.
    """
    lines = [
        f"path:    {info['path']}",
        f"format:  {info['format']}",
        f"rows:    {info['rows']} in {info['shards']} shard(s)",
    ]
    if info.get("frames") is not None:
        lines.append(f"frames:  {info['frames']}")
    if info.get("class_names") is not None:
        lines.append(f"classes: {len(info['class_names'])} ({_listing(info['class_names'])})")
    is_stream = info["format"] == clear.FORMAT
    is_coco = info["format"] == coco.FORMAT
    is_seg = info["format"] == segmentation.FORMAT
    if info["format"] == pool.FORMAT:
        lines.append(f"time:    {info['first']} .. {info['last']} (UTC, from "
                     f"{info['timestamps']})")
    lines += _clear_lines(info) if is_stream else []
    lines += _coco_lines(info) if is_coco else []
    lines += _segmentation_lines(info) if is_seg else []
    for group, counts in ({} if is_stream or is_coco or is_seg
                          else info.get("counts", {})).items():
        subjects = "".join(info.get("subjects", {}).get(group, []))
        tail = f"  subjects {subjects}" if subjects else ""
        n_shards = info.get("split_shards", {}).get(group)
        where = "" if n_shards is None else f" in {n_shards} shard(s)"
        lines.append(f"  {group:<16} {sum(counts.values()):>5} rows{where} "
                     f"({_per_label(counts)}){tail}")
    for key, entries in info.get("skipped", {}).items():
        if entries:
            text = _SKIPPED_TEXT.get(key, key)
            if key == "bad_file":
                named = _listing([f"{e['path']} ({e['reason']})" for e in entries])
            elif key in ("image", "annotation"):
                named = "; ".join(coco.describe_problem(e)
                                  for e in entries[:_MAX_LISTED_PROBLEMS])
                rest = len(entries) - _MAX_LISTED_PROBLEMS
                named += f"; ... and {rest} more" if rest > 0 else ""
            else:
                named = ", ".join(entries)
            lines.append(f"skipped {len(entries)} {text}: {named}")
    lines.append("schema:  " + ", ".join(f"{k}: {v}" for k, v in info["schema"].items()))
    return "\n".join(lines)


def _clear_lines(info: dict[str, Any]) -> list[str]:
    """One line per bucket of a CLEAR stream."""
    lines = [f"buckets: {len(info['buckets'])} in time order"]
    for bucket in info["buckets"]:
        key = str(bucket)
        counts = info["counts"][key]
        what = _per_label(counts) if bucket not in info["unlabeled_buckets"] else "unlabeled"
        lines.append(f"  bucket {bucket:<9} {info['bucket_rows'][key]:>5} rows in "
                     f"{info['bucket_shards'][key]} shard(s) ({what})")
    return lines


def _coco_lines(info: dict[str, Any]) -> list[str]:
    """Images, instances per category (most frequent first), mask kinds and crowd."""
    counts = info["counts"]
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    shown = [f"{name}={n}" for name, n in ranked[:_MAX_LISTED_LABELS] if n]
    rest = sum(1 for _, n in ranked[_MAX_LISTED_LABELS:] if n)
    more = f", ... and {rest} more" if rest else ""
    used = sum(1 for n in counts.values() if n)
    kinds = ", ".join(f"{k}={n}" for k, n in info["mask_kinds"].items())
    return [
        f"images:  {info['images']} ({info['images_without_instances']} without instances)",
        f"instances: {info['instances']} in {used} of {len(counts)} categories"
        + (f" ({', '.join(shown)}{more})" if shown else ""),
        f"masks:   {kinds} (in the source); crowd {info['crowd']}",
    ]


def _segmentation_lines(info: dict[str, Any]) -> list[str]:
    """Rows per split, pixel share per class (largest first) and void share."""
    crop = info.get("five_crop") or {}
    lines = []
    for split, n in info["split_rows"].items():
        cropped = " (five-crops)" if split in crop.get("splits", []) else ""
        lines.append(f"  {split:<16} {n:>5} rows{cropped} in {info['split_shards'][split]} "
                     "shard(s)")
    ranked = sorted(info["pixel_share"].items(), key=lambda item: -item[1])
    shown = [f"{name} {share:.1%}" for name, share in ranked[:_MAX_LISTED_LABELS]]
    rest = len(ranked) - _MAX_LISTED_LABELS
    more = f", ... and {rest} more" if rest > 0 else ""
    lines.append(f"pixels:  {', '.join(shown)}{more} of labelled pixels; void "
                 f"{info['void_share']:.1%} of all")
    return lines


def _per_label(counts: dict[str, int]) -> str:
    """``N=19, I=10, E=9``; ``500 per label`` or a range when there are many labels."""
    low, high = min(counts.values(), default=0), max(counts.values(), default=0)
    if len(counts) > 4 and low == high:
        return f"{low} per label"
    if len(counts) <= _MAX_LISTED_LABELS:
        return ", ".join(f"{label}={n}" for label, n in counts.items())
    return f"{low}-{high} per label"


def _listing(items: list[str]) -> str:
    """Comma-separated items, shortened after the first few."""
    if len(items) <= _MAX_LISTED_LABELS:
        return ", ".join(items)
    rest = len(items) - _MAX_LISTED_LABELS
    return ", ".join(items[:_MAX_LISTED_LABELS]) + f", ... and {rest} more"
