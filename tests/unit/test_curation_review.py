"""The review pass of a curated CLEAR stream: write_stream, the review page (driven in a real
headless Chromium when one is installed) and apply_review."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raylab.curation.review import FORMAT, apply_review, stream_id, write_review
from raylab.data.clear import SCHEMA, read_stream_manifest, write_stream
from raylab.data.shards import read_manifest
from raylab.errors import DataError

NAMES = ["cat", "dog", "BACKGROUND"]
ODD = '2/dog/we<ird&"one.png'
#: bucket -> [(path, label, score)]; bucket 0 is unlabeled (no scores).
ROWS: dict[int, list[tuple[str, int, float | None]]] = {
    0: [("0/u0.png", -1, None), ("0/u1.png", -1, None), ("0/u2.png", -1, None)],
    1: [("1/cat/a.png", 0, 0.31), ("1/dog/a.png", 1, 0.33), ("1/cat/b.png", 0, 0.29),
        ("1/bg/a.png", 2, 0.21), ("1/dog/b.png", 1, 0.27)],
    2: [("2/cat/a.png", 0, 0.30), (ODD, 1, 0.35), ("2/dog/a.png", 1, 0.28),
        ("2/bg/a.png", 2, 0.22), ("2/bg/b.png", 2, 0.20)],
}
COUNTS = {"0": {}, "1": {"cat": 2, "dog": 2, "BACKGROUND": 1},
          "2": {"cat": 1, "dog": 2, "BACKGROUND": 2}}
LABELLED = [(b, p) for b in (1, 2) for p, _, _ in ROWS[b]]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12 + i, 10), (20 * i % 256, 40, 255 - 9 * i)).save(buf, "PNG")
    return buf.getvalue()


def _table(bucket: int) -> pa.Table:
    rows = ROWS[bucket]
    return pa.table({
        "image": [_png(10 * bucket + i) for i in range(len(rows))],
        "label": pa.array([k for _, k, _ in rows], pa.int32()),
        "bucket": pa.array([bucket] * len(rows), pa.int32()),
        "path": [p for p, _, _ in rows],
        "height": pa.array([10] * len(rows), pa.int32()),
        "width": pa.array([12 + 10 * bucket + i for i in range(len(rows))], pa.int32()),
    }, schema=SCHEMA)


@pytest.fixture
def stream(tmp_path: Path) -> Path:
    """A curated stream: 3 buckets (0 unlabeled), cat, dog and BACKGROUND."""
    return _curated(tmp_path / "stream", NAMES)


def _curated(dst: Path, names: list[str]) -> Path:
    write_stream(dst, names, {b: _table(b) for b in ROWS}, unlabeled=[0], source="test pool",
                 extra={"curation": {"per_class": 2}}, rows_per_shard=2)
    (dst / "curation").mkdir()
    labelled = [(b, p, k, s) for b, rows in ROWS.items() for p, k, s in rows if s is not None]
    pq.write_table(pa.table({
        "path": pa.array([r[1] for r in labelled], pa.string()),
        "bucket": pa.array([r[0] for r in labelled], pa.int32()),
        "label": pa.array([r[2] for r in labelled], pa.int32()),
        "score": pa.array([r[3] for r in labelled], pa.float32()),
    }), dst / "curation" / "selection.parquet")
    (dst / "curation" / "config.json").write_text('{"model": "clip"}\n')
    return dst


def _snapshot(dst: Path) -> dict[str, Any]:
    """Everything a review may change: manifests, rows in order, selection, other files."""
    manifest = read_stream_manifest(dst)
    rows = {}
    for b in manifest["buckets"]:
        folder = dst / manifest["bucket_dirs"][str(b)]
        shards = read_manifest(folder, expected_format="clear_bucket")
        rows[b] = {"counts": shards["extra"]["counts"], "rows": [
            r for s in shards["shards"] for r in pq.read_table(folder / s["file"]).to_pylist()]}
    selection = pq.read_table(dst / "curation" / "selection.parquet").to_pylist()
    return {"manifest": manifest, "buckets": rows, "selection": selection,
            "config": (dst / "curation" / "config.json").read_text()}


class _Page(HTMLParser):
    """Checkboxes, scores, class headings and the review JSON of a review page."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes: list[dict[str, str | None]] = []
        self.scores: list[str] = []
        self.headings: list[str] = []
        self.images: list[str] = []
        self.json = ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("class") == "reject":
            self.boxes.append(a)
        elif tag == "img":
            self.images.append(a["src"] or "")
        elif tag == "span" and a.get("class") == "score":
            self._in = "score"
        elif tag == "pre" and a.get("id") == "review-json":
            self._in = "json"
        elif tag == "h3":
            self._in = "h3"
            self.headings.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("span", "pre", "h3", "small"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "score":
            self.scores.append(data)
        elif self._in == "json":
            self.json += data
        elif self._in == "h3":
            self.headings[-1] += data.strip()


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _review(dst: Path, rejected: list[tuple[int, str]], path: Path) -> Path:
    manifest = read_stream_manifest(dst)
    path.write_text(json.dumps({"format": FORMAT, "stream": stream_id(manifest), "rejected": [
        {"bucket": b, "path": p} for b, p in sorted(rejected)]}, indent=2))
    return path


def _check_applied(before: dict[str, Any], dst: Path, rejected: list[tuple[int, str]],
                   summary: dict[str, Any]) -> None:
    """Exactly the rejected rows are gone, everything else is as it was."""
    after = _snapshot(dst)
    gone = set(rejected)
    for b, bucket in before["buckets"].items():
        kept = [r for r in bucket["rows"] if (b, r["path"]) not in gone]
        assert after["buckets"][b]["rows"] == kept  # order, bytes and sizes kept
        expected = dict(bucket["counts"])
        for bb, p in gone:
            if bb == b:
                label = next(k for q, k, _ in ROWS[b] if q == p)
                expected[NAMES[label]] -= 1
        assert after["buckets"][b]["counts"] == expected
        assert after["manifest"]["counts"][str(b)] == expected
        assert after["manifest"]["bucket_rows"][str(b)] == len(kept)
    assert after["selection"] == [r for r in before["selection"]
                                  if (r["bucket"], r["path"]) not in gone]
    assert after["config"] == before["config"]
    old, new = before["manifest"], after["manifest"]
    changed = {"rows", "bucket_rows", "counts", "created", "reviews"}
    assert {k: v for k, v in new.items() if k not in changed} == {
        k: v for k, v in old.items() if k not in changed}
    assert new["rows"] == old["rows"] - len(gone) == summary["rows_after"]
    assert summary["rows_before"] == old["rows"] and summary["rejected"] == len(gone)
    review = new["reviews"][-1]
    assert review["rejected"] == len(gone) and review["file"] == "review.json"
    assert (dst / review["copy"]).is_file()
    page = _parse((dst / "review" / "index.html").read_text())
    assert {(int(b["data-bucket"]), b["data-path"]) for b in page.boxes} == set(LABELLED) - gone
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


# ------------------------------------------------------------------------ write_stream

def test_write_stream_manifest_and_counts(stream: Path) -> None:
    manifest = json.loads((stream / "manifest.json").read_text())
    assert read_stream_manifest(stream) == manifest
    assert manifest["format"] == "clear" and manifest["class_names"] == NAMES
    assert manifest["buckets"] == [0, 1, 2] and manifest["unlabeled_buckets"] == [0]
    assert manifest["bucket_rows"] == {"0": 3, "1": 5, "2": 5} and manifest["rows"] == 13
    assert manifest["counts"] == COUNTS
    assert manifest["source"] == "test pool" and manifest["skipped"] == []
    assert manifest["curation"] == {"per_class": 2}
    assert list(manifest)[-1] == "created"
    snap = _snapshot(stream)
    for b, rows in ROWS.items():
        assert snap["buckets"][b]["counts"] == COUNTS[str(b)]
        assert [(r["path"], r["label"], r["bucket"]) for r in snap["buckets"][b]["rows"]] == [
            (p, k, b) for p, k, _ in rows]
        bucket = read_manifest(stream / f"bucket_{b:02d}", expected_format="clear_bucket")
        assert [s["rows"] for s in bucket["shards"]] == ([2, 1] if b == 0 else [2, 2, 1])
        assert bucket["extra"]["labeled"] is (b != 0)
        assert bucket["extra"]["source"] == "test pool"


@pytest.mark.parametrize("change, match", [
    (lambda t: {**t, 1: t[1].set_column(1, "label", pa.array([0, 1, 3, 0, 1], pa.int32()))},
     r"bucket 1: label\(s\) \[3\]; expected 0..2"),
    (lambda t: {**t, 0: t[0].set_column(1, "label", pa.array([0, -1, -1], pa.int32()))},
     r"bucket 0: label\(s\) \[0\]; expected -1 \(unlabeled\)"),
    (lambda t: {**t, 2: t[1]}, "bucket 2: the bucket column holds other ids than 2"),
    (lambda t: {**t, 1: t[1].drop_columns(["width"])}, "bucket 1: expected the columns"),
    (lambda t: {**t, 1: t[1].slice(0, 0)}, "bucket 1: no rows"),
    (lambda t: {**t, 1: pa.concat_tables([t[1], t[1]])}, "bucket 1: repeated paths"),
    (lambda t: {}, "expected at least one bucket"),
])
def test_write_stream_rejects_bad_tables(tmp_path: Path, change, match: str) -> None:
    tables = change({b: _table(b) for b in ROWS})
    with pytest.raises(ValueError, match=match):
        write_stream(tmp_path / "s", NAMES, tables, unlabeled=[0] if 0 in tables else [],
                     source="x")
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_write_stream_arguments(tmp_path: Path, stream: Path) -> None:
    tables = {b: _table(b) for b in ROWS}
    with pytest.raises(ValueError, match=r"unlabeled: bucket\(s\) \[7\] not in"):
        write_stream(tmp_path / "s", NAMES, tables, unlabeled=[0, 7], source="x")
    with pytest.raises(ValueError, match="unique non-empty strings"):
        write_stream(tmp_path / "s", ["cat", "cat", "x"], tables, unlabeled=[0], source="x")
    with pytest.raises(ValueError, match=r"key\(s\) rows are written by the stream writer"):
        write_stream(tmp_path / "s", NAMES, tables, unlabeled=[0], source="x",
                     extra={"rows": 1})
    with pytest.raises(DataError, match="output folder already exists"):
        write_stream(stream, NAMES, tables, unlabeled=[0], source="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream"]


# -------------------------------------------------------------------------- the page

def test_review_page_lists_every_labelled_row_once(stream: Path) -> None:
    index = write_review(stream, thumb_size=16)
    text = index.read_text()
    page = _parse(text)
    keys = [(int(b["data-bucket"] or -1), b["data-path"]) for b in page.boxes]
    assert sorted(keys) == sorted(LABELLED) and len(set(keys)) == len(keys)
    scores = {(b, p): s for b in (1, 2) for p, _, s in ROWS[b]}
    assert page.scores == [f"{scores[k]:.3f}" for k in keys]
    # per bucket, classes in manifest order (background last), best score first
    assert [h.split("(")[0].strip() for h in page.headings] == NAMES * 2
    for b in (1, 2):
        shown = [p for bb, p in keys if bb == b]
        expected = sorted(ROWS[b], key=lambda r: (r[1], -r[2]))
        assert shown == [p for p, _, _ in expected]
    assert not any("checked" in b for b in page.boxes)
    # the odd path is escaped everywhere (attribute values and tooltip)
    assert ODD not in text and 'we&lt;ird&amp;&quot;one.png' in text
    assert 'title="2/dog/we&lt;ird&amp;&quot;one.png"' in text
    # self-contained: no network, thumbnails next to the page
    assert "http://" not in text and "https://" not in text
    assert len(page.images) == len(LABELLED)
    for src in page.images:
        with Image.open(index.parent / src) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 16
    assert json.loads(page.json) == {"format": FORMAT, "stream": stream_id(
        read_stream_manifest(stream)), "rejected": []}
    assert not [p for p in stream.iterdir() if p.name.startswith(".")]


def test_review_page_escapes_class_names(tmp_path: Path) -> None:
    text = write_review(_curated(tmp_path / "s", ["c<a&t", "dog", "BACKGROUND"])).read_text()
    assert "c<a&t" not in text and "<h3>c&lt;a&amp;t <small>" in text


def test_review_needs_a_selection_row_per_labelled_row(stream: Path) -> None:
    selection = pq.read_table(stream / "curation" / "selection.parquet")
    pq.write_table(selection.slice(1), stream / "curation" / "selection.parquet")
    with pytest.raises(DataError, match=r"no row for bucket 1 path '1/cat/a.png'"):
        write_review(stream)
    (stream / "curation" / "selection.parquet").unlink()
    with pytest.raises(DataError, match="selection file not found; expected a curated"):
        write_review(stream)
    assert not (stream / "review").exists()


def _chromium_dom(url: str, profile: Path) -> str:
    chromium = shutil.which("chromium")
    assert chromium is not None
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0 and "review-json" in result.stdout, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="no chromium on PATH: the review page is not driven in a browser")
def test_review_page_in_chromium_then_apply(stream: Path, tmp_path: Path) -> None:
    index = write_review(stream, thumb_size=16)
    rejected = [(2, ODD), (1, "1/dog/b.png"), (2, "2/bg/b.png")]
    fragment = urllib.parse.quote(json.dumps([[b, p] for b, p in rejected]), safe="")
    dom = _chromium_dom(f"{index.as_uri()}#reject={fragment}", tmp_path / "profile")
    page = _parse(dom)
    review = json.loads(page.json)
    assert review == {"format": FORMAT, "stream": stream_id(read_stream_manifest(stream)),
                      "rejected": [{"bucket": b, "path": p} for b, p in sorted(rejected)]}
    checked = {(int(b["data-bucket"] or -1), b["data-path"]) for b in page.boxes
               if "checked" in b}
    assert checked == set(rejected)
    assert len(page.boxes) == len(LABELLED)
    assert f"raylab curate apply-review {stream} review.json</code>" in dom  # from the URL
    before = _snapshot(stream)
    path = tmp_path / "review.json"
    path.write_text(page.json)
    summary = apply_review(stream, path)
    assert summary["rejected_counts"] == {"1": {"dog": 1}, "2": {"dog": 1, "BACKGROUND": 1}}
    _check_applied(before, stream, rejected, summary)


def test_apply_review_drops_exactly_the_rejected_rows(stream: Path, tmp_path: Path) -> None:
    write_review(stream)
    rejected = [(1, "1/cat/b.png"), (2, ODD)]
    before = _snapshot(stream)
    summary = apply_review(stream, _review(stream, rejected, tmp_path / "review.json"))
    assert summary["rejected_counts"] == {"1": {"cat": 1}, "2": {"dog": 1}}
    assert summary["bucket_rows"] == {"0": 3, "1": 4, "2": 4}
    _check_applied(before, stream, rejected, summary)
    assert read_stream_manifest(stream)["reviews"][0]["copy"] == \
        "curation/reviews/001-review.json"


def test_apply_review_twice_fails_and_keeps_the_stream(stream: Path, tmp_path: Path) -> None:
    path = _review(stream, [(1, "1/dog/a.png")], tmp_path / "review.json")
    apply_review(stream, path)
    before = _snapshot(stream)
    with pytest.raises(DataError, match=r"review.json: rejected entry 0: path '1/dog/a.png' "
                       r"is not in bucket 1 of the stream \(any more\); 1 review\(s\) were "
                       "applied to this stream already"):
        apply_review(stream, path)
    assert _snapshot(stream) == before
    assert not [p for p in stream.parent.iterdir() if p.name.startswith(".")]


def _entries(*entries: Any) -> str:
    return json.dumps({"format": FORMAT, "stream": "STREAM", "rejected": list(entries)})


@pytest.mark.parametrize("text, match", [
    ('{"format": "raylab-clear-review",\n "rejected": [}', r"review.json:2: invalid JSON"),
    ('[]', r"format is 'list', expected 'raylab-clear-review'"),
    ('{"format": "other", "stream": "x", "rejected": []}', "format is 'other', expected"),
    ('{"format": "raylab-clear-review", "rejected": []}', 'expected "stream" \\(a string\\)'),
    (_entries({"bucket": 1, "path": "1/cat/a.png"}, [1, "1/cat/b.png"]),
     r'rejected entry 1 is \[1, "1/cat/b.png"\]; expected \{"bucket": <int>'),
    (_entries({"bucket": True, "path": "1/cat/a.png"}), "rejected entry 0 is"),
    (_entries({"bucket": 1, "path": 3}), "rejected entry 0 is"),
    (_entries({"bucket": 1, "path": "1/cat/a.png", "why": "blurry"}), "rejected entry 0 is"),
    (_entries({"bucket": 1, "path": "1/cat/a.png"}, {"bucket": 7, "path": "x.png"}),
     r"rejected entry 1: bucket 7 is not in the stream \(buckets \[0, 1, 2\]\)"),
    (_entries({"bucket": 0, "path": "0/u0.png"}), "rejected entry 0: bucket 0 is unlabeled"),
    (_entries({"bucket": 2, "path": "1/cat/a.png"}),
     r"rejected entry 0: path '1/cat/a.png' is not in bucket 2 of the stream \(any more\)$"),
    (_entries({"bucket": 1, "path": "1/cat/a.png"}, {"bucket": 1, "path": "1/cat/a.png"}),
     r"rejected entry 1 repeats entry 0 \(bucket 1, path '1/cat/a.png'\)"),
    (_entries(*[{"bucket": 2, "path": p} for p, _, _ in ROWS[2]]),
     "review rejects all 5 rows of bucket 2; a stream bucket needs at least one row"),
    (json.dumps({"format": FORMAT, "stream": "2020-01-01T00:00:00+00:00/abc",
                 "rejected": []}), "review is of stream '2020-01-01T00:00:00"),
])
def test_bad_review_files(stream: Path, tmp_path: Path, text: str, match: str) -> None:
    sid = stream_id(read_stream_manifest(stream))
    path = tmp_path / "review.json"
    path.write_text(text.replace('"STREAM"', json.dumps(sid)))
    before = _snapshot(stream)
    with pytest.raises(DataError, match=match) as info:
        apply_review(stream, path)
    assert str(info.value).startswith(str(path))
    assert _snapshot(stream) == before


def test_missing_review_file(stream: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.json: cannot read review file"):
        apply_review(stream, tmp_path / "nope.json")
