"""Bad-input corpus (issue 6): every malformed input ends in one clean error line.

Each case builds its input in a fresh folder, from a file in ``bad_inputs/`` or from a
corrupted copy of valid data generated once per session, runs the CLI in-process and
checks the contract of README.md's "Errors" section:

* exit code 2 and exactly one line on stderr, ``raylab: error: ...``, that names the input
  (file and line, shard, config file and key, or flag) and says what was wrong;
* nothing on stdout and no traceback anywhere;
* nothing half-written: the destination is absent or unchanged, no temporary folder is
  left beside it, the case's folder is byte-for-byte as before the call (so nothing was
  written to the working directory either) and the shared valid inputs are untouched;
* Ray never starts: ``ensure_ray`` fails the test if it is reached.

``bad_inputs/README.md`` lists the cases, what is wrong in each and the expected error.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import raylab.runtime.cluster
from raylab.cli import main
from raylab.data.clear import convert_clear, write_clear_sample
from raylab.data.imagefolder import convert_imagefolder, write_image_sample
from raylab.data.jigsaws import convert_jigsaws, write_sample

BAD = Path(__file__).resolve().parent / "bad_inputs"
KIN = Path("Suturing/kinematics/AllGestures/Suturing_D001.txt")
META = Path("Suturing/meta_file_Suturing.txt")
PART = "part-00000.parquet"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------- valid inputs


@dataclass(frozen=True)
class Valid:
    """Valid inputs generated once per session; cases copy them before corrupting."""

    raw: Path  # raw JIGSAWS sample: Suturing, subjects B and D, trials 1-2
    shards: Path  # its shards
    images: Path  # a small ImageFolder (classes disk, triangle)
    image_shards: Path  # its shards
    stream: Path  # a converted 3-bucket CLEAR stream drawn from the ImageFolder

    def roots(self) -> tuple[Path, ...]:
        return (self.raw, self.shards, self.images, self.image_shards, self.stream)


@pytest.fixture(scope="session")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Valid:
    root = tmp_path_factory.mktemp("valid_inputs").resolve()
    raw = write_sample(root / "jigsaws_raw", tasks=("Suturing",), subjects="BD",
                       trials=(1, 2), frames=(100, 120))
    convert_jigsaws(raw, root / "jigsaws_shards")
    images = write_image_sample(root / "images", classes=2, train_per_class=4,
                                test_per_class=2, size=8)
    convert_imagefolder(images, root / "image_shards")
    clear_raw = write_clear_sample(images, root / "clear_raw", n_buckets=3,
                                   per_class_per_bucket=1)
    convert_clear(clear_raw, root / "clear_stream")
    return Valid(raw, root / "jigsaws_shards", images, root / "image_shards",
                 root / "clear_stream")


# ---------------------------------------------------------------------- case helpers


@dataclass(frozen=True)
class Expect:
    """What a case runs and what its error line must say."""

    argv: list[Any]
    names: tuple[str, ...]  # the input at fault, as the message must name it
    what: str  # what was wrong, as the message must say it
    dest: Path  # the output: must not exist afterwards, or be unchanged


@dataclass(frozen=True)
class Case:
    """The folder a case builds its input in (also the working directory) and the data."""

    work: Path
    valid: Valid

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    def copy(self, src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, self.work / name))

    def place(self, bad_file: str, target: Path) -> Path:
        """Put a file of ``bad_inputs/`` at ``target``."""
        shutil.copyfile(BAD / bad_file, target)
        return target

    def train(self, *args: Any, method: str = "skill") -> list[Any]:
        return ["train", method, "--storage", self.runs, *args]


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def corrupt_column_chunk(part: Path, column: str) -> None:
    """Overwrite the pages of one column; the footer (and so the row count) stays valid."""
    with pq.ParquetFile(part) as pf:
        group = pf.metadata.row_group(0)
        chunk = next(group.column(i) for i in range(group.num_columns)
                     if group.column(i).path_in_schema == column)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(part.read_bytes())
    data[start:start + chunk.total_compressed_size] = b"\xab" * chunk.total_compressed_size
    part.write_bytes(bytes(data))


def rewrite_shard(part: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(part)), part)


CASES: dict[str, Callable[[Case], Expect]] = {}
XFAIL: dict[str, str] = {}


def case(name: str, xfail: str | None = None) -> Callable[[Callable[[Case], Expect]],
                                                          Callable[[Case], Expect]]:
    def register(build: Callable[[Case], Expect]) -> Callable[[Case], Expect]:
        assert name not in CASES, name
        CASES[name] = build
        if xfail:
            XFAIL[name] = xfail
        return build
    return register


# --------------------------------------------------------------- raw JIGSAWS -> convert


def kinematics_case(name: str, bad_file: str, line: int | None, what: str,
                    suffix: str = "") -> None:
    """`data convert jigsaws` with one kinematics file replaced by ``bad_file``."""
    def build(c: Case) -> Expect:
        src, dst = c.copy(c.valid.raw, "raw"), c.work / "shards"
        target = src / KIN
        if suffix:
            target.unlink()
            target = target.with_name(target.name + suffix)
        c.place(bad_file, target)
        where = f"{target}:{line}: " if line else f"{target}: "
        return Expect(["data", "convert", "jigsaws", src, dst], (where,), what, dst)
    case(name)(build)


kinematics_case("kinematics-75-columns", "kinematics_75_columns.txt", 2,
                "expected 76 whitespace-separated values, got 75")
kinematics_case("kinematics-nan", "kinematics_nan.txt", 3, "NaN or infinite value")
kinematics_case("kinematics-empty", "kinematics_empty.txt", 1, "empty kinematics file")
kinematics_case("kinematics-binary-garbage", "kinematics_garbage.bin", None,
                "not UTF-8 text")
kinematics_case("kinematics-gzip-garbage", "kinematics_garbage.txt.gz", None,
                "unreadable gzip data", suffix=".gz")
kinematics_case("kinematics-float32-overflow", "kinematics_overflow.txt", 2,
                "NaN or infinite value")
kinematics_case("kinematics-underscore-number", "kinematics_underscore.txt", 2,
                "non-numeric value '1_000' in column 5")


@case("meta-bad-skill-letter")
def _(c: Case) -> Expect:
    src, dst = c.copy(c.valid.raw, "raw"), c.work / "shards"
    c.place("meta_bad_skill.txt", src / META)
    return Expect(["data", "convert", "jigsaws", src, dst], (f"{src / META}:1: ",),
                  "skill 'X' is not N, I or E", dst)


@case("convert-into-existing-folder")
def _(c: Case) -> Expect:
    dst = c.work / "shards"
    dst.mkdir()
    (dst / "keep.txt").write_text("someone's data\n")
    return Expect(["data", "convert", "jigsaws", c.valid.raw, dst], (f"{dst}: ",),
                  "output folder already exists", dst)


@case("convert-below-a-file")
def _(c: Case) -> Expect:
    (c.work / "afile").write_text("not a folder\n")
    dst = c.work / "afile" / "shards"
    return Expect(["data", "convert", "jigsaws", c.valid.raw, dst], (f"{dst}: ",),
                  "cannot create the output folder", dst)


# ------------------------------------------------------------- JIGSAWS shards, manifest


def shards_case(name: str, corrupt: Callable[[Path], Path], what: str,
                command: str = "inspect", xfail: str | None = None) -> None:
    """A corrupted copy of the valid shards through `data inspect` or `train skill`.

    ``corrupt`` changes the copy and returns the path the message must name.
    """
    def build(c: Case) -> Expect:
        shards = c.copy(c.valid.shards, "shards")
        where = corrupt(shards)
        if command == "inspect":
            return Expect(["data", "inspect", shards], (f"{where}",), what, shards)
        return Expect(c.train("--data", shards), (f"{where}",), what, c.runs)
    case(name, xfail)(build)


def truncate_shard(shards: Path) -> Path:
    part = shards / PART
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    return part


def lie_about_shard_rows(shards: Path) -> Path:
    def edit(m: dict[str, Any]) -> None:
        m["shards"][0]["rows"] += 1
        m["rows"] += 1  # consistent in itself: only the footer shows the lie
    edit_json(shards / MANIFEST, edit)
    return shards / PART


def lie_about_total_rows(shards: Path) -> Path:
    edit_json(shards / MANIFEST, lambda m: m.update(rows=99))
    return shards / MANIFEST


def replace_manifest(bad_file: str) -> Callable[[Path], Path]:
    def corrupt(shards: Path) -> Path:
        shutil.copyfile(BAD / bad_file, shards / MANIFEST)
        return shards / MANIFEST
    return corrupt


def remove_shard(shards: Path) -> Path:
    (shards / PART).unlink()
    return shards / PART


def drop_task_column(shards: Path) -> Path:
    rewrite_shard(shards / PART, lambda t: t.drop_columns(["task"]))
    return shards / PART


def corrupt_task_pages(shards: Path) -> Path:
    corrupt_column_chunk(shards / PART, "task")
    return shards / PART


def extra_not_an_object(shards: Path) -> Path:
    edit_json(shards / MANIFEST, lambda m: m.update(extra=5))
    return shards / MANIFEST


def format_not_a_string(shards: Path) -> Path:
    edit_json(shards / MANIFEST, lambda m: m.update(format=["jigsaws"]))
    return shards / MANIFEST


def null_skill(shards: Path) -> Path:
    def change(table: pa.Table) -> pa.Table:
        skills = [None] + table.column("skill").to_pylist()[1:]
        index = table.schema.get_field_index("skill")
        return table.set_column(index, "skill", pa.array(skills, pa.string()))
    rewrite_shard(shards / PART, change)
    return shards


shards_case("shard-truncated", truncate_shard, "unreadable Parquet footer")
shards_case("manifest-lies-about-shard-rows", lie_about_shard_rows,
            "shard holds 3 rows, manifest.json lists 4")
shards_case("manifest-lies-about-total-rows", lie_about_total_rows,
            '"rows" is 99, expected 3 (the sum over shards)')
shards_case("manifest-binary-garbage", replace_manifest("manifest_garbage.bin"),
            "cannot read manifest")
shards_case("manifest-nested-too-deeply", replace_manifest("manifest_deep_nesting.json"),
            "JSON nested too deeply")
shards_case("manifest-json-array", replace_manifest("manifest_array.json"),
            "expected a JSON object at the top level")
shards_case("shard-file-missing", remove_shard, "shard listed in manifest.json is missing")
shards_case("shard-lacks-a-column", drop_task_column, "shard lacks column(s) task")
shards_case("shard-corrupt-pages-inspect", corrupt_task_pages, "unreadable Parquet data")
shards_case("shard-corrupt-pages-train", corrupt_task_pages, "unreadable Parquet data",
            command="train")
shards_case("manifest-extra-not-an-object", extra_not_an_object,
            '"extra" is 5; expected an object')
shards_case("manifest-format-not-a-string", format_not_a_string,
            "\"format\" is ['jigsaws']", command="train")
shards_case("shard-null-skill", null_skill, "column(s) skill are null", command="train")


# ------------------------------------------------------------------ CLEAR, ImageFolder


@case("clear-bucket-folder-missing")
def _(c: Case) -> Expect:
    stream = c.copy(c.valid.stream, "stream")
    shutil.rmtree(stream / "bucket_01")
    return Expect(["data", "inspect", stream], (f"{stream / 'bucket_01'}: ",),
                  "shard folder not found", stream)


@case("clear-class-names-too-short")
def _(c: Case) -> Expect:
    stream = c.copy(c.valid.stream, "stream")
    edit_json(stream / MANIFEST, lambda m: m.update(class_names=m["class_names"][:1]))
    return Expect(["data", "inspect", stream], (f"{stream / MANIFEST}: ",),
                  "lists 1 class name(s); expected labels 0..0", stream)


@case("imagefolder-corrupt-jpg")
def _(c: Case) -> Expect:
    src, dst = c.copy(c.valid.images, "images"), c.work / "shards"
    c.place("corrupt.jpg", src / "train" / "disk" / "corrupt.jpg")
    return Expect(["data", "convert", "imagefolder", src, dst],
                  (f"{src}: ", "train/disk/corrupt.jpg (cannot decode"),
                  "1 bad image file(s)", dst)


@case("imagefolder-shards-class-names-too-short")
def _(c: Case) -> Expect:
    shards = c.copy(c.valid.image_shards, "shards")

    def edit(m: dict[str, Any]) -> None:
        m["extra"]["class_names"] = m["extra"]["class_names"][:1]
    edit_json(shards / MANIFEST, edit)
    return Expect(["data", "inspect", shards], (f"{shards / MANIFEST}: ",),
                  "lists 1 class name(s); expected labels 0..0", shards)


# ---------------------------------------------------------------------- config files


def config_case(name: str, bad_file: str, what: str, key: str | None = None) -> None:
    """`train skill --config bad_inputs/<bad_file>` on valid shards."""
    def build(c: Case) -> Expect:
        path = BAD / bad_file
        names = (f"{path}: ",) + ((f"config key {key!r}",) if key else ())
        return Expect(c.train("--data", c.valid.shards, "--config", path), names, what,
                      c.runs)
    case(name)(build)


config_case("config-wrong-type", "config_wrong_type.yaml", "expected int, got 'sixty'",
            key="window")
config_case("config-negative-window", "config_negative_window.yaml",
            "expected an integer >= 1, got -5", key="window")
config_case("config-zero-batch-size", "config_zero_batch.yaml",
            "expected an integer >= 1, got 0", key="optim.batch_size")
config_case("config-unknown-key", "config_unknown_key.yaml", "unknown config key 'windw'")
config_case("config-not-yaml", "config_not_yaml.yaml", "not valid YAML at line 2")
config_case("config-list-not-mapping", "config_list.yaml",
            "config root: expected a mapping, got [")
config_case("config-binary-garbage", "config_binary.yaml", "cannot read config file")
config_case("config-nested-too-deeply", "config_deep_nesting.yaml",
            "not valid YAML (nested too deeply)")
config_case("config-duplicate-key", "config_duplicate_key.yaml",
            "not valid YAML at line 3 (found duplicate key 'window')")
config_case("config-python-tag", "config_python_tag.yaml",
            "could not determine a constructor for the tag")
config_case("config-section-not-mapping", "config_section_not_mapping.yaml",
            "expected a mapping of SkillOptimConfig fields, got 5", key="optim")


@case("config-file-missing")
def _(c: Case) -> Expect:
    path = c.work / "nope.yaml"
    return Expect(c.train("--data", c.valid.shards, "--config", path), (f"{path}: ",),
                  "config file not found", c.runs)


# ------------------------------------------------------------------------ CLI flags


def cli_case(name: str, args: Callable[[Case], list[Any]], names: tuple[str, ...],
             what: str, xfail: str | None = None) -> None:
    """`train`/`tune` with a bad flag; the storage folder must stay unwritten."""
    case(name, xfail)(lambda c: Expect(args(c), names, what, c.runs))


cli_case("unknown-method", lambda c: c.train("--data", c.valid.shards,
                                             method="nosuchmethod"),
         ("'nosuchmethod'",), "unknown method 'nosuchmethod'; known methods: ")
cli_case("storage-unknown-scheme",
         lambda c: ["train", "skill", "--data", c.valid.shards, "--storage", "foo://bucket"],
         ("--storage 'foo://bucket'",), "unknown scheme 'foo'")
cli_case("set-without-equals", lambda c: c.train("--data", c.valid.shards, "--set", "window"),
         ("--set 'window'",), "expected KEY=VALUE")
cli_case("set-negative-window",
         lambda c: c.train("--data", c.valid.shards, "--set", "window=-5"),
         ("config key 'window'",), "expected an integer >= 1, got -5")
cli_case("set-zero-batch-size",
         lambda c: c.train("--data", c.valid.shards, "--set", "optim.batch_size=0"),
         ("config key 'optim.batch_size'",), "expected an integer >= 1, got 0")
cli_case("set-unknown-key", lambda c: c.train("--data", c.valid.shards, "--set", "windw=60"),
         ("'windw'",), "unknown config key")
cli_case("set-code-as-value",
         lambda c: c.train("--data", c.valid.shards, "--set",
                           'window=__import__("os").system("touch X")'),
         ("config key 'window'",), "expected int, got '__import__")
cli_case("cpus-per-worker-nan",
         lambda c: c.train("--data", c.valid.shards, "--cpus-per-worker", "nan"),
         ("--cpus-per-worker",), "expected > 0, got nan")
cli_case("tune-zero-trials",
         lambda c: ["tune", "skill", "--data", c.valid.shards, "--trials", "0",
                    "--storage", c.runs],
         ("--trials",), "expected")


@case("data-folder-missing")
def _(c: Case) -> Expect:
    data = c.work / "no_such_shards"
    return Expect(c.train("--data", data), (f"{data}: ",), "shard folder not found", c.runs)


@case("data-of-another-format")
def _(c: Case) -> Expect:
    return Expect(c.train("--data", c.valid.shards, method="convnext"),
                  (f"{c.valid.shards / MANIFEST}: ",),
                  "format is 'jigsaws', expected 'imagefolder'", c.runs)


# ------------------------------------------------------------------------------ test


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file below ``root`` (hidden ones included), files by content."""
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        found.update({str(rel / d): "folder" for d in dirs})
        for name in files:
            data = Path(folder, name).read_bytes()
            found[str(rel / name)] = hashlib.sha256(data).hexdigest()
    return found


def refuse_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("Ray was about to start; the error must come before")


PARAMS = [pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[name])]
                       if name in XFAIL else [])
          for name in CASES]


@pytest.mark.parametrize("name", PARAMS)
def test_bad_input(name: str, valid: Valid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(raylab.runtime.cluster, "ensure_ray", refuse_ray)
    work = (tmp_path / "case").resolve()
    work.mkdir()
    monkeypatch.chdir(work)  # a relative default (runs/, a stray X) would land here
    expect = CASES[name](Case(work, valid))
    before = {root: snapshot(root) for root in (work, *valid.roots())}
    dest_before = snapshot(expect.dest) if expect.dest.is_dir() else None

    try:
        rc = main([str(a) for a in expect.argv])
    except BaseException as exc:  # whatever escapes main() is what the user sees
        pytest.fail(f"the CLI raised {type(exc).__name__}: {exc}")
    out, err = capsys.readouterr()

    assert "Traceback" not in out + err
    assert rc == 2, (rc, out, err)
    assert err.startswith("raylab: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, f"expected one line, got: {err!r}"
    for text in expect.names:
        assert text in err, f"the message does not name {text!r}: {err!r}"
    assert expect.what in err, err
    assert out == ""

    if dest_before is None:
        assert not expect.dest.exists(), f"{expect.dest} was created"
    else:
        assert snapshot(expect.dest) == dest_before, f"{expect.dest} changed"
    if expect.dest.parent.is_dir():
        stray = [p.name for p in expect.dest.parent.iterdir()
                 if ".tmp" in p.name or ".old-" in p.name]
        assert stray == [], f"temporary files left beside {expect.dest}: {stray}"
    for root, files in before.items():
        assert snapshot(root) == files, f"{root} changed"


def test_corpus_is_complete() -> None:
    """Every file in bad_inputs/ is used by a case and described in its README."""
    readme = (BAD / "README.md").read_text()
    files = sorted(p.name for p in BAD.iterdir() if p.name != "README.md")
    source = Path(__file__).read_text()
    assert [f for f in files if f'"{f}"' not in source] == []
    assert [f for f in files if f"`{f}`" not in readme] == []
    assert [n for n in CASES if f"`{n}`" not in readme] == []
    assert len(CASES) >= 22
