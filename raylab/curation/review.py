"""The human pass over a curated CLEAR stream: a review page, then ``apply_review``.

The CLEAR paper (Lin et al. 2021) picks each bucket's images by CLIP similarity and then has
people drop the remaining mistakes. :func:`write_review` writes ``DST/review/index.html``, a
self-contained page (no network) showing every labelled row of the stream as a thumbnail
under its bucket and class, best CLIP score first, each with a "reject" box. The page keeps
the ticks in its link (``#reject=<encodeURIComponent(JSON [[bucket, path], ...])>``) and
downloads them as ``review.json``::

    {"format": "raylab-clear-review", "stream": "<stream id>",
     "rejected": [{"bucket": 1, "path": "1/bus/0001.jpg"}, ...]}   # sorted by (bucket, path)

:func:`apply_review` checks that file against the stream and rewrites the stream without the
rejected rows (its manifests, counts and ``curation/selection.parquet`` with it), atomically.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raylab.config import atomic_write_text
from raylab.data.clear import REQUIRED_KEYS, bucket_paths, read_stream_manifest, write_stream
from raylab.data.shards import MANIFEST, output_folder
from raylab.errors import DataError

FORMAT = "raylab-clear-review"
SELECTION = "curation/selection.parquet"
REVIEW_DIR = "review"
REVIEWS_DIR = "curation/reviews"  # a copy of every applied review file
APPLY_COMMAND = "raylab curate apply-review"
#: Top-level manifest keys that write_stream writes itself; the others are carried over.
_OWN_KEYS = (*REQUIRED_KEYS, "schema", "skipped", "source", "created")
_ENTRY = 'expected {"bucket": <int>, "path": "<path>"}'


@dataclass(frozen=True)
class _Row:
    """One labelled row of the stream with its CLIP score."""

    bucket: int
    path: str
    label: int
    score: float
    index: int  # row position in its bucket


def stream_id(manifest: Mapping[str, Any]) -> str:
    """The id a review file names its stream by: ``<created>/<hash of the row counts>``."""
    keys = ("created", "class_names", "bucket_rows", "counts")
    text = json.dumps({k: manifest.get(k) for k in keys}, sort_keys=True)
    return f"{manifest.get('created')}/{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------------------ reading

def _read_bucket(dst: Path, manifest: dict[str, Any], bucket: int,
                 columns: list[str] | None = None) -> pa.Table:
    """Every row of one bucket, in stream order."""
    tables = []
    for path in bucket_paths(dst, bucket, manifest):
        with pq.ParquetFile(path) as pf:
            tables.append(pf.read(columns=columns))
    return pa.concat_tables(tables)


def _read_selection(dst: Path) -> pa.Table:
    """``curation/selection.parquet`` with its columns checked."""
    path = dst / SELECTION
    hint = "expected a curated stream (raylab curate clear writes it)"
    if not path.is_file():
        raise DataError(f"selection file not found; {hint}", path=path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"unreadable Parquet file ({exc}); {hint}", path=path) from None
    missing = [c for c in ("path", "bucket", "label", "score") if c not in table.column_names]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; expected path, bucket, "
                        "label, score", path=path)
    nulls = [c for c in ("path", "bucket", "label", "score") if table.column(c).null_count]
    if nulls:
        raise DataError(f"null values in column(s) {', '.join(nulls)}; expected a value in "
                        "every row", path=path)
    return table


def _labelled_rows(dst: Path, manifest: dict[str, Any]) -> dict[int, list[_Row]]:
    """Every labelled row per bucket (stream order) with its score from the selection.

    Raises:
        DataError: A labelled row has no selection row, or one of another label.
    """
    selection = _read_selection(dst)
    found = {(b, p): (k, s) for b, p, k, s in zip(*(selection.column(c).to_pylist() for c in (
        "bucket", "path", "label", "score")))}
    rows: dict[int, list[_Row]] = {}
    for bucket in _labelled_buckets(manifest):
        table = _read_bucket(dst, manifest, bucket, ["path", "label"])
        rows[bucket] = []
        for index, (path, label) in enumerate(zip(table.column("path").to_pylist(),
                                                  table.column("label").to_pylist())):
            label_score = found.get((bucket, path))
            if label_score is None or label_score[0] != label:
                what = "no row" if label_score is None else f"label {label_score[0]}"
                raise DataError(f"{what} for bucket {bucket} path {path!r}, which the stream "
                                f"labels {label}; expected one selection row per labelled "
                                "stream row", path=dst / SELECTION)
            rows[bucket].append(_Row(bucket, path, label, float(label_score[1]), index))
    return rows


def _labelled_buckets(manifest: dict[str, Any]) -> list[int]:
    return [b for b in manifest["buckets"] if b not in manifest["unlabeled_buckets"]]


# ----------------------------------------------------------------------------- the page

def write_review(dst: str | os.PathLike, *, thumb_size: int = 96) -> Path:
    """Write the review page ``DST/review/index.html`` and its JPEG thumbnails.

    One grid per labelled bucket and class (class order of the manifest), best score first;
    each image shows its score and a "reject" box, its path as tooltip. The ``review``
    folder is written into a temporary sibling and renamed, replacing an older page.

    Args:
        dst: A curated stream (with ``curation/selection.parquet``).
        thumb_size: Longest side of the thumbnails in pixels.

    Returns:
        The path of ``index.html``.

    Raises:
        DataError: The stream or its selection file is missing or malformed, or an image
            does not decode.
        ValueError: ``thumb_size`` is below 8.
    """
    if thumb_size < 8:
        raise ValueError(f"thumb_size: expected >= 8 pixels, got {thumb_size}")
    dst = Path(dst)
    manifest = read_stream_manifest(dst)
    rows = _labelled_rows(dst, manifest)
    with output_folder(dst / REVIEW_DIR, overwrite=True) as tmp:
        (tmp / "thumbs").mkdir()
        for bucket, bucket_rows in rows.items():
            _write_thumbs(dst, manifest, bucket, bucket_rows, tmp / "thumbs", thumb_size)
        atomic_write_text(tmp / "index.html", _page(manifest, rows, thumb_size))
    return dst / REVIEW_DIR / "index.html"


def _thumb_name(row: _Row) -> str:
    return f"b{row.bucket:02d}-{row.index:06d}.jpg"


def _write_thumbs(dst: Path, manifest: dict[str, Any], bucket: int, rows: list[_Row],
                  folder: Path, size: int) -> None:
    """One JPEG thumbnail per row of ``bucket``."""
    images = _read_bucket(dst, manifest, bucket, ["image"]).column("image")
    for row in rows:
        try:
            with Image.open(io.BytesIO(images[row.index].as_py())) as image:
                image.thumbnail((size, size))
                image.convert("RGB").save(folder / _thumb_name(row), quality=85)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"bucket {bucket}: image {row.path!r} does not decode ({exc}); "
                            "expected the stream's images to decode",
                            path=dst / manifest["bucket_dirs"][str(bucket)]) from None


def _script_json(value: Any) -> str:
    """JSON safe inside a <script> element."""
    return (json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _page(manifest: dict[str, Any], rows: dict[int, list[_Row]], size: int) -> str:
    """The whole review page."""
    esc = html.escape
    names = manifest["class_names"]
    ranks = {(r.bucket, r.path): i for i, r in enumerate(sorted(
        (r for bucket_rows in rows.values() for r in bucket_rows),
        key=lambda r: (r.bucket, r.path)))}
    sid = stream_id(manifest)
    empty = json.dumps({"format": FORMAT, "stream": sid, "rejected": []}, indent=2)
    nav = " ".join(f'<a href="#bucket-{b}">bucket {b}</a>' for b in rows)
    sections = []
    for bucket, bucket_rows in rows.items():
        parts = [f'<section id="bucket-{bucket}"><h2>Bucket {bucket}</h2>']
        for label, name in enumerate(names):
            shown = sorted((r for r in bucket_rows if r.label == label),
                           key=lambda r: (-r.score, r.path))
            images = "image" if len(shown) == 1 else "images"
            parts.append(f"<h3>{esc(name)} <small>({len(shown)} {images}, bucket {bucket})"
                         "</small></h3>")
            parts.append('<div class="grid">' + "".join(
                _figure(r, ranks[(r.bucket, r.path)], size) for r in shown) + "</div>")
        sections.append("\n".join(parts) + "</section>")
    return _TEMPLATE.format(
        rows=len(ranks), buckets=len(rows), created=esc(str(manifest.get("created"))),
        size=size, command=esc(APPLY_COMMAND), nav=nav,
        empty=esc(empty), sections="\n".join(sections), stream=_script_json(sid),
        format=_script_json(FORMAT), command_js=_script_json(APPLY_COMMAND), css=_CSS,
        js=_JS)


def _figure(row: _Row, rank: int, size: int) -> str:
    """One thumbnail with its score and reject box."""
    path = html.escape(row.path)
    return (f'<figure title="{path}"><img src="thumbs/{_thumb_name(row)}" alt="{path}" '
            f'loading="lazy" style="max-width:{size}px;max-height:{size}px">'
            f'<figcaption><span class="score">{row.score:.3f}</span> <label><input '
            f'type="checkbox" class="reject" data-bucket="{row.bucket}" data-path="{path}" '
            f'data-rank="{rank}"> reject</label></figcaption></figure>')


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 3em; color: #222; }
header p { margin: .3em 0; max-width: 60em; }
.bar { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ccc;
       padding: .4em 0; z-index: 1; }
.bar nav { display: inline; margin-left: 1em; }
.bar a { margin-right: .6em; }
#review-json { max-height: 8em; overflow: auto; background: #f4f4f4; padding: .4em;
               font-size: 12px; }
#unknown { color: #a00; }
.grid { display: flex; flex-wrap: wrap; gap: 6px; }
figure { margin: 0; padding: 3px; border: 2px solid transparent; text-align: center; }
figure.rejected { border-color: #c00; background: #fdd; }
figure.rejected img { opacity: .5; }
figcaption { font-size: 12px; }
.score { font-family: monospace; }
h3 { margin: 1em 0 .3em; }
section { scroll-margin-top: 3em; }
"""

_JS = r"""
(function () {
  "use strict";
  var boxes = Array.prototype.slice.call(document.querySelectorAll("input.reject"));
  var byKey = new Map();
  boxes.forEach(function (b) { byKey.set(b.dataset.bucket + "\n" + b.dataset.path, b); });
  var pre = document.getElementById("review-json");
  var note = document.getElementById("unknown");

  function review() {
    var picked = boxes.filter(function (b) { return b.checked; });
    picked.sort(function (a, b) { return a.dataset.rank - b.dataset.rank; });
    return {format: FORMAT, stream: STREAM, rejected: picked.map(function (b) {
      return {bucket: Number(b.dataset.bucket), path: b.dataset.path};
    })};
  }

  function render(keepLink) {
    var r = review();
    var text = JSON.stringify(r, null, 2) + "\n";
    pre.textContent = text;
    document.getElementById("count").textContent = r.rejected.length + " rejected";
    boxes.forEach(function (b) {
      if (b.hasAttribute("checked") !== b.checked) { b.toggleAttribute("checked", b.checked); }
      b.closest("figure").classList.toggle("rejected", b.checked);
    });
    if (keepLink) {
      var pairs = r.rejected.map(function (e) { return [e.bucket, e.path]; });
      var url = location.pathname + location.search +
        (pairs.length ? "#reject=" + encodeURIComponent(JSON.stringify(pairs)) : "");
      try { history.replaceState(null, "", url); } catch (e) { /* some file: URLs */ }
    }
    return text;
  }

  function fromLink() {
    var m = /^#reject=(.*)$/.exec(location.hash);
    if (!m) { return; }
    var pairs = null;
    try { pairs = JSON.parse(decodeURIComponent(m[1])); } catch (e) { pairs = null; }
    if (!Array.isArray(pairs)) {
      note.textContent = "The link's #reject=... is not a JSON list of [bucket, path] pairs; " +
        "it was ignored.";
      note.hidden = false;
      return;
    }
    var missing = [];
    boxes.forEach(function (b) { b.checked = false; });
    pairs.forEach(function (p) {
      var box = Array.isArray(p) && p.length === 2 ? byKey.get(String(p[0]) + "\n" + p[1]) : null;
      if (box) { box.checked = true; } else { missing.push(JSON.stringify(p)); }
    });
    note.hidden = !missing.length;
    note.textContent = missing.length ? missing.length + " rejection(s) of the link are not " +
      "on this page (reviewed away already?): " + missing.slice(0, 5).join(", ") : "";
  }

  document.addEventListener("change", function (e) {
    if (e.target.matches("input.reject")) { render(true); }
  });
  window.addEventListener("hashchange", function () { fromLink(); render(false); });
  document.getElementById("download").addEventListener("click", function () {
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([render(false)], {type: "application/json"}));
    a.download = "review.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 1000);
  });
  function showFolder() {  // the stream folder from this page's address, so moves are fine
    if (location.protocol !== "file:") { return; }
    var folder = decodeURIComponent(location.pathname).replace(/\/review\/index\.html$/, "");
    if (/^\/[A-Za-z]:\//.test(folder)) { folder = folder.slice(1); }
    var quoted = /^[\w@%+=:,.\/-]+$/.test(folder) ? folder :
      "'" + folder.replace(/'/g, "'\\''") + "'";
    document.getElementById("stream-folder").textContent = folder;
    document.getElementById("command").textContent = COMMAND + " " + quoted + " review.json";
  }

  showFolder();
  fromLink();
  render(false);
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Review of a curated CLEAR stream</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>Review of a curated CLEAR stream</h1>
<p>Stream folder: <code id="stream-folder">the folder holding this page's review/
folder</code></p>
<p>Each image was picked for the class it is shown under by its CLIP similarity (the score,
best first). <b>Tick "reject" on every image that does not show its class</b> (under
BACKGROUND: every image that shows one of the other classes); leave the rest. Then press
<b>Download review.json</b> and run <code id="command">{command} STREAM review.json</code>:
the rejected images leave the
stream, and this page is rewritten.</p>
<p>The page's link keeps your ticks (after <code>#reject=</code>): bookmark it to come back
later, or send it to a colleague. {rows} images in {buckets} labelled buckets; stream
written {created}; thumbnails {size} pixels.</p>
<p id="unknown" hidden></p>
<pre id="review-json">{empty}
</pre>
</header>
<div class="bar"><button id="download" type="button">Download review.json</button>
<span id="count">0 rejected</span> <nav>{nav}</nav></div>
{sections}
<script>
var STREAM = {stream};
var FORMAT = {format};
var COMMAND = {command_js};
{js}
</script>
</body>
</html>
"""


# ------------------------------------------------------------------------- applying

def apply_review(dst: str | os.PathLike, review_path: str | os.PathLike, *,
                 thumb_size: int = 96) -> dict[str, Any]:
    """Drop the rows a review file rejects from a curated stream, atomically.

    The review is checked in full first. Then the stream is rewritten into a temporary
    sibling of ``dst`` (manifests and counts, ``curation/selection.parquet`` without the
    rejected rows, every other file as it was, a copy of the review file under
    ``curation/reviews/``, a new review page) and renamed into place, so a failure leaves
    the old stream intact. The manifest's ``reviews`` list gains ``{"file", "copy",
    "rejected", "applied"}``.

    Args:
        dst: A curated stream.
        review_path: The ``review.json`` the review page downloads.
        thumb_size: Thumbnail size of the regenerated review page.

    Returns:
        ``dst``, ``review``, ``rejected`` (rows dropped), ``rejected_counts``
        (``{bucket: {class: n}}``, buckets and classes with a rejection only),
        ``rows_before``, ``rows_after``, ``bucket_rows`` (after).

    Raises:
        DataError: The stream is invalid, or the review file is unreadable, invalid JSON,
            of another format or stream, or has an entry that is malformed, repeated, or
            not a labelled row of the stream (the message names the entry index), or it
            rejects every row of a bucket.
    """
    dst, review_path = Path(dst), Path(review_path)
    manifest = read_stream_manifest(dst)
    review = _load_review(review_path)
    rows = _labelled_rows(dst, manifest)
    drop = _check_entries(review, manifest, rows, review_path)
    names = manifest["class_names"]
    counts: dict[str, dict[str, int]] = {}
    for bucket, paths in sorted(drop.items()):
        for row in rows[bucket]:
            if row.path in paths:
                per_class = counts.setdefault(str(bucket), {})
                per_class[names[row.label]] = per_class.get(names[row.label], 0) + 1
    n_rejected = sum(len(p) for p in drop.values())
    earlier = manifest.get("reviews", [])
    if not isinstance(earlier, list):
        raise DataError(f'"reviews" is {earlier!r}; expected a list', path=dst / MANIFEST)
    copy = f"{REVIEWS_DIR}/{len(earlier) + 1:03d}-{review_path.name}"
    extra = {k: v for k, v in manifest.items() if k not in _OWN_KEYS}
    extra["reviews"] = [*earlier, {
        "file": review_path.name, "copy": copy, "rejected": n_rejected,
        "applied": datetime.now(timezone.utc).isoformat(timespec="seconds")}]
    with output_folder(dst, overwrite=True) as tmp:
        new = write_stream(tmp, names, _ReviewedBuckets(dst, manifest, drop),
                           unlabeled=manifest["unlabeled_buckets"],
                           source=str(manifest.get("source", dst)),
                           overwrite=True, extra=extra)
        _carry_over(dst, tmp, manifest)
        _write_selection(_read_selection(dst), drop, tmp / SELECTION)
        (tmp / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(review_path, tmp / copy)
        write_review(tmp, thumb_size=thumb_size)
    return {"dst": str(dst), "review": str(review_path), "rejected": n_rejected,
            "rejected_counts": counts, "rows_before": manifest["rows"],
            "rows_after": new["rows"], "bucket_rows": new["bucket_rows"]}


def _load_review(path: Path) -> dict[str, Any]:
    """The review file, with its top level checked."""
    try:
        review = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read review file ({exc}); expected the review.json that "
                        "the review page downloads", path=path) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON ({exc.msg}); expected the review.json that the "
                        "review page downloads", path=path, line=exc.lineno) from None
    if not isinstance(review, dict) or review.get("format") != FORMAT:
        found = review.get("format") if isinstance(review, dict) else type(review).__name__
        raise DataError(f"format is {found!r}, expected {FORMAT!r} (the review.json that "
                        "the review page downloads)", path=path)
    if not (isinstance(review.get("stream"), str) and isinstance(review.get("rejected"), list)):
        raise DataError('expected "stream" (a string) and "rejected" (a list of '
                        '{"bucket": <int>, "path": "<path>"})', path=path)
    return review


def _check_entries(review: dict[str, Any], manifest: dict[str, Any],
                   rows: dict[int, list[_Row]], path: Path) -> dict[int, set[str]]:
    """``{bucket: rejected paths}`` after checking every entry against the stream."""
    present = {b: {r.path for r in bucket_rows} for b, bucket_rows in rows.items()}
    seen: dict[tuple[int, str], int] = {}
    drop: dict[int, set[str]] = {}
    reviews = len(manifest.get("reviews", []))
    for i, entry in enumerate(review["rejected"]):
        where = f"rejected entry {i}"
        if not (isinstance(entry, dict) and set(entry) == {"bucket", "path"}
                and isinstance(entry["bucket"], int) and not isinstance(entry["bucket"], bool)
                and isinstance(entry["path"], str)):
            raise DataError(f"{where} is {json.dumps(entry)[:200]}; {_ENTRY}", path=path)
        bucket, rel = entry["bucket"], entry["path"]
        if bucket not in manifest["buckets"]:
            raise DataError(f"{where}: bucket {bucket} is not in the stream (buckets "
                            f"{manifest['buckets']})", path=path)
        if bucket not in present:
            raise DataError(f"{where}: bucket {bucket} is unlabeled; a review rejects rows "
                            "of labelled buckets only", path=path)
        if rel not in present[bucket]:
            again = (f"; {reviews} review(s) were applied to this stream already (is this "
                     "one of them?)") if reviews else ""
            raise DataError(f"{where}: path {rel!r} is not in bucket {bucket} of the stream "
                            f"(any more){again}", path=path)
        if (bucket, rel) in seen:
            raise DataError(f"{where} repeats entry {seen[bucket, rel]} (bucket {bucket}, "
                            f"path {rel!r})", path=path)
        seen[bucket, rel] = i
        drop.setdefault(bucket, set()).add(rel)
    if review["stream"] != stream_id(manifest):
        raise DataError(f"review is of stream {review['stream']!r}, but the stream is now "
                        f"{stream_id(manifest)!r} (it was rewritten since); review the "
                        f"current page ({REVIEW_DIR}/index.html) instead", path=path)
    for bucket, paths in drop.items():
        if len(paths) == len(present[bucket]):
            raise DataError(f"review rejects all {len(paths)} rows of bucket {bucket}; a "
                            "stream bucket needs at least one row (curate it again with "
                            "other settings instead)", path=path)
    return drop


class _ReviewedBuckets(Mapping[int, pa.Table]):
    """The stream's buckets without the rejected rows, read one bucket at a time."""

    def __init__(self, dst: Path, manifest: dict[str, Any], drop: dict[int, set[str]]):
        self.dst, self.manifest, self.drop = dst, manifest, drop

    def __getitem__(self, bucket: int) -> pa.Table:
        table = _read_bucket(self.dst, self.manifest, bucket)
        rejected = self.drop.get(bucket)
        if not rejected:
            return table
        return table.filter(pa.array([p not in rejected for p in
                                      table.column("path").to_pylist()], pa.bool_()))

    def __iter__(self) -> Iterator[int]:
        return iter(self.manifest["buckets"])

    def __len__(self) -> int:
        return len(self.manifest["buckets"])


def _carry_over(old: Path, new: Path, manifest: dict[str, Any]) -> None:
    """Every file of ``old`` outside the stream itself into ``new`` (hard links where the
    file system allows); the selection file and review page are written afresh."""
    skip = {MANIFEST, REVIEW_DIR, *manifest["bucket_dirs"].values()}
    selection = (old / SELECTION).resolve()

    def link_or_copy(src: str, target: str) -> None:
        if Path(src).resolve() == selection:
            return
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)

    for entry in old.iterdir():
        if entry.name in skip:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(new / entry.name))


def _write_selection(table: pa.Table, drop: dict[int, set[str]], target: Path) -> None:
    """The selection table without the rejected rows."""
    keep = [path not in drop.get(bucket, ()) for bucket, path in zip(
        table.column("bucket").to_pylist(), table.column("path").to_pylist())]
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.filter(pa.array(keep, pa.bool_())), target)
