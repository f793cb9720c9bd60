"""Tests of raylab.data.jigsaws and raylab.data.inspect on synthetic and real JIGSAWS data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylab.data.inspect import format_inspection, inspect_shards
from raylab.data.jigsaws import (
    CHANNEL_NAMES,
    N_CHANNELS,
    MetaRecord,
    convert_jigsaws,
    parse_trial_name,
    read_kinematics,
    read_meta,
    skill_label,
    write_sample,
)
from raylab.data.shards import iter_rows, read_manifest
from raylab.errors import ConfigError, DataError

SMALL = {"subjects": "BCD", "trials": (1, 2), "frames": (40, 60)}


def _row(values: list[float] | None = None, n: int = N_CHANNELS) -> str:
    values = values if values is not None else [0.5] * n
    return " ".join(f"{v:.6f}" for v in values)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------- constants


def test_channel_names() -> None:
    assert len(CHANNEL_NAMES) == N_CHANNELS == len(set(CHANNEL_NAMES))
    assert CHANNEL_NAMES[0] == "mtm_left_pos_x"
    assert CHANNEL_NAMES[3:12] == tuple(f"mtm_left_rot_{i}{j}" for i in range(3)
                                        for j in range(3))
    assert CHANNEL_NAMES[18] == "mtm_left_gripper"
    assert CHANNEL_NAMES[57] == "psm_right_pos_x"
    assert CHANNEL_NAMES[-1] == "psm_right_gripper"


def test_parse_trial_name() -> None:
    assert parse_trial_name("Knot_Tying_B001") == ("Knot_Tying", "B", 1)
    assert parse_trial_name("Needle_Passing_I005") == ("Needle_Passing", "I", 5)
    for bad in ("Knot_Tying_B1", "Sewing_B001", "Suturing_b001", "Suturing_B001.txt"):
        with pytest.raises(DataError, match="expected <Task>_<Subject><Trial:03d>"):
            parse_trial_name(bad)


def test_skill_label() -> None:
    assert [skill_label(s, 0, "self", ()) for s in "NIE"] == [0, 1, 2]
    assert [skill_label("N", g, "grs", (15, 23)) for g in (8, 15, 22, 23, 30)] == [0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="labels"):
        skill_label("N", 10, "other", (15, 23))
    with pytest.raises(ConfigError, match="grs_thresholds"):
        skill_label("N", 10, "grs", (23, 15))
    with pytest.raises(DataError, match="not one of N, I, E"):
        skill_label("X", 10, "self", ())


# ------------------------------------------------------------------------ kinematics


@pytest.mark.parametrize("name", ["k.txt", "k.txt.gz"])
def test_read_kinematics_plain_and_gzip(tmp_path: Path, name: str) -> None:
    rows = [[i + c / 100 for c in range(N_CHANNELS)] for i in range(3)]
    path = _write(tmp_path / name, "\r\n".join(_row(r) for r in rows) + "\r\n\r\n")
    arr = read_kinematics(path)
    assert arr.dtype == np.float32 and arr.shape == (3, N_CHANNELS)
    np.testing.assert_allclose(arr, np.array(rows, np.float32))


@pytest.mark.parametrize(("text", "line", "message"), [
    ("", 1, "empty kinematics file"),
    ("\n  \n", 1, "empty kinematics file"),
    (f"{_row()}\n{_row()}\n{_row(n=75)}\n", 3, "expected 76 whitespace-separated values, got 75"),
    (f"{_row()}\n\n{_row(n=77)}\n", 3, "expected 76 whitespace-separated values, got 77"),
    (f"{_row()}\n{_row()[:-8]} abc\n", 2, "non-numeric value 'abc' in column 76"),
    (f"{_row()}\n{_row([float('nan')] * N_CHANNELS)}\n", 2, "NaN or infinite"),
    (f"\n{_row()}\n{_row([1e300] * N_CHANNELS)}\n", 3, "NaN or infinite"),
])
def test_read_kinematics_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = _write(tmp_path / "bad.txt", text)
    with pytest.raises(DataError, match=message) as err:
        read_kinematics(path)
    assert str(err.value).startswith(f"{path}:{line}: ")


def test_read_kinematics_bad_gzip_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "k.txt.gz"
    path.write_bytes(gzip.compress(_row().encode())[:-10])
    with pytest.raises(DataError, match="unreadable gzip") as err:
        read_kinematics(path)
    assert str(path) in str(err.value)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="unreadable gzip"):
        read_kinematics(path)
    with pytest.raises(DataError, match="file not found"):
        read_kinematics(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- meta

META = ("Suturing_B001\t\tN\t13\t\t3\t2\t1\t2\t2\t3\r\n"
        "\r\n"
        "Suturing_D002 \t\tE\t25\t\t4\t4\t4\t4\t4\t5\r\n"
        "\r\n")


def test_read_meta_tabs_crlf_blank_lines(tmp_path: Path) -> None:
    meta = read_meta(_write(tmp_path / "meta_file_Suturing.txt", META), task="Suturing")
    assert list(meta) == ["Suturing_B001", "Suturing_D002"]
    assert meta["Suturing_B001"] == MetaRecord("Suturing_B001", "N", 13, (3, 2, 1, 2, 2, 3))
    assert meta["Suturing_D002"].grs_sub == (4, 4, 4, 4, 4, 5)


@pytest.mark.parametrize(("line", "why"), [
    ("Suturing_B002\t\tN\t13\t\t3\t2\t1\t2\t2\r\n", "8 fields instead of 9"),
    ("Suturing_B002\t\tX\t13\t\t3\t2\t1\t2\t2\t3\r\n", "skill 'X' is not N, I or E"),
    ("Suturing_B002\t\tN\tabc\t\t3\t2\t1\t2\t2\t3\r\n", "non-negative integers"),
    ("Sewing_B002\t\tN\t13\t\t3\t2\t1\t2\t2\t3\r\n", "bad trial name"),
    ("Suturing_B001\t\tN\t13\t\t3\t2\t1\t2\t2\t3\r\n", "duplicate trial"),
    ("Knot_Tying_B002\t\tN\t13\t\t3\t2\t1\t2\t2\t3\r\n", "not a Suturing trial"),
])
def test_read_meta_bad_line(tmp_path: Path, line: str, why: str) -> None:
    path = _write(tmp_path / "meta_file_Suturing.txt", META + line)
    with pytest.raises(DataError, match=why) as err:
        read_meta(path, task="Suturing")
    assert str(err.value).startswith(f"{path}:5: ")
    if "fields" in why or "skill" in why:
        assert "expected '<trial name> <N|I|E> <GRS total> <6 GRS sub-scores>'" in str(err.value)


# -------------------------------------------------------------------- sample + convert


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic sample (8 subjects x 5 trials x 3 tasks)."""
    return write_sample(tmp_path_factory.mktemp("sample") / "raw")


@pytest.fixture(scope="module")
def converted(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("conv") / "shards"
    return dst, convert_jigsaws(sample, dst)


def test_sample_layout(sample: Path) -> None:
    assert "SYNTHETIC" in (sample / "README.txt").read_text()
    meta = (sample / "Suturing" / "meta_file_Suturing.txt").read_bytes()
    assert b"\t\tN\t" in meta and meta.endswith(b"\r\n\r\n")
    files = list((sample / "Knot_Tying" / "kinematics" / "AllGestures").glob("*.txt"))
    assert len(files) == 40
    arr = read_kinematics(files[0])
    assert arr.shape[1] == N_CHANNELS and 600 <= arr.shape[0] <= 900
    rot = arr[:, 3:12].reshape(-1, 3, 3)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape),
                               atol=1e-4)


def test_sample_round_trip(converted: tuple[Path, dict]) -> None:
    dst, summary = converted
    assert summary["rows"] == 3 * 39
    assert summary["per_task"] == {"Suturing": 39, "Needle_Passing": 39, "Knot_Tying": 39}
    assert len(summary["skipped_no_meta"]) == 3 and summary["skipped_missing_file"] == []
    manifest = read_manifest(dst, expected_format="jigsaws")
    assert manifest["extra"]["n_channels"] == N_CHANNELS
    assert manifest["extra"]["channel_names"] == list(CHANNEL_NAMES)
    assert len(manifest["shards"]) >= 6
    rows = list(iter_rows(dst, columns=["task", "subject", "trial", "skill", "n_frames"]))
    keys = [(r["task"], r["subject"], r["trial"]) for r in rows]
    assert keys == sorted(keys)
    assert summary["frames"] == sum(r["n_frames"] for r in rows)
    skills = {(r["subject"], r["skill"]) for r in rows}
    assert skills == {("B", "N"), ("G", "N"), ("H", "N"), ("I", "N"), ("C", "I"), ("F", "I"),
                      ("D", "E"), ("E", "E")}


def test_sample_skill_is_visible_in_jitter(converted: tuple[Path, dict]) -> None:
    jitter: dict[str, list[float]] = {"N": [], "I": [], "E": []}
    for row in iter_rows(converted[0], columns=["skill", "kinematics"]):
        kin = np.asarray(row["kinematics"], np.float32).reshape(-1, N_CHANNELS)
        jitter[row["skill"]].append(float(np.abs(np.diff(kin[:, 12:15], axis=0)).mean()))
    means = {k: np.mean(v) for k, v in jitter.items()}
    assert means["E"] < means["I"] < means["N"]
    assert max(jitter["E"]) < min(jitter["N"])


def test_converted_row_matches_file(converted: tuple[Path, dict], sample: Path) -> None:
    dst, _ = converted
    table = pq.read_table(dst / "part-00000.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    arr = read_kinematics(sample / row["source"])
    assert row["n_frames"] == arr.shape[0]
    np.testing.assert_array_equal(np.asarray(row["kinematics"], np.float32), arr.reshape(-1))
    assert row["grs"] == sum(row["grs_sub"]) and len(row["grs_sub"]) == 6


def test_inspect_sample(converted: tuple[Path, dict]) -> None:
    dst, summary = converted
    info = inspect_shards(dst)
    assert info["format"] == "jigsaws" and info["rows"] == 117
    assert info["frames"] == summary["frames"]
    assert info["counts"]["Suturing"] == {"N": 19, "I": 10, "E": 10}
    assert info["subjects"]["Knot_Tying"] == list("BCDEFGHI")
    assert info["skipped"]["no_meta"] == summary["skipped_no_meta"]
    assert info["shards"] == summary["shards"] and "kinematics" in info["schema"]
    text = format_inspection(info)
    assert "jigsaws" in text and "117" in text and "Suturing" in text


def test_sample_deterministic_and_gzip(tmp_path: Path) -> None:
    a = write_sample(tmp_path / "a", seed=3, **SMALL)
    b = write_sample(tmp_path / "b", seed=3, **SMALL)
    c = write_sample(tmp_path / "c", seed=3, gzip=True, **SMALL)
    name = "Suturing/kinematics/AllGestures/Suturing_C002.txt"
    assert (a / name).read_bytes() == (b / name).read_bytes()
    np.testing.assert_array_equal(read_kinematics(a / name), read_kinematics(c / f"{name}.gz"))
    assert (write_sample(tmp_path / "d", seed=4, **SMALL) / name).read_bytes() != (
        a / name).read_bytes()
    write_sample(a, seed=3, gzip=True, **SMALL)  # an earlier sample may be replaced
    assert not (a / name).exists() and (a / f"{name}.gz").exists()


def test_sample_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        write_sample(tmp_path, **SMALL)
    with pytest.raises(ConfigError, match="subjects"):
        write_sample(tmp_path / "s", subjects="BZ")


def _small_raw(tmp_path: Path) -> Path:
    return write_sample(tmp_path / "raw", tasks=("Suturing", "Knot_Tying"), **SMALL)


def test_convert_subset_and_existing_dst(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path)
    summary = convert_jigsaws(raw, tmp_path / "out", tasks=["Knot_Tying"])
    assert summary["per_task"] == {"Knot_Tying": 5} and summary["rows"] == 5
    with pytest.raises(DataError, match="already exists"):
        convert_jigsaws(raw, tmp_path / "out")
    summary = convert_jigsaws(raw, tmp_path / "out", overwrite=True)
    assert summary["per_task"] == {"Suturing": 5, "Knot_Tying": 5}
    assert read_manifest(tmp_path / "out")["extra"]["tasks"] == ["Suturing", "Knot_Tying"]


def test_convert_missing_meta_file_is_skipped_and_counted(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path)
    (raw / "Suturing/kinematics/AllGestures/Suturing_B001.txt").unlink()
    summary = convert_jigsaws(raw, tmp_path / "out", tasks=["Suturing"])
    assert summary["skipped_missing_file"] == ["Suturing_B001"]
    assert summary["rows"] == 4


def test_convert_unknown_task_and_missing_folders(tmp_path: Path) -> None:
    raw = _small_raw(tmp_path)
    with pytest.raises(DataError, match="unknown task.*'Sewing'.*Suturing, Needle_Passing"):
        convert_jigsaws(raw, tmp_path / "out", tasks=["Sewing"])
    with pytest.raises(DataError, match="task folder not found") as err:
        convert_jigsaws(raw, tmp_path / "out", tasks=["Needle_Passing"])
    assert str(raw / "Needle_Passing") in str(err.value)
    with pytest.raises(DataError, match="JIGSAWS folder not found"):
        convert_jigsaws(tmp_path / "nowhere", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.parametrize(("corrupt", "where", "message"), [
    ("kin", "Knot_Tying_D002.txt:2", "expected 76 whitespace-separated values, got 75"),
    ("meta", "meta_file_Knot_Tying.txt:2", "6 GRS sub-scores"),
])
def test_failed_conversion_leaves_nothing(tmp_path: Path, corrupt: str, where: str,
                                          message: str) -> None:
    raw = _small_raw(tmp_path)
    if corrupt == "kin":
        path = raw / "Knot_Tying/kinematics/AllGestures/Knot_Tying_D002.txt"
        lines = path.read_text().splitlines()
        lines[1] = " ".join(lines[1].split()[:75])
        path.write_text("\n".join(lines) + "\n")
    else:
        path = raw / "Knot_Tying/meta_file_Knot_Tying.txt"
        lines = path.read_text().splitlines()
        lines[1] = "Knot_Tying_B002\t\tN\t13"
        path.write_text("\r\n".join(lines) + "\r\n")
    before = _all_files(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        convert_jigsaws(raw, tmp_path / "out")
    assert where in str(err.value)
    assert _all_files(tmp_path) == before  # no output folder, no temporary folder


# -------------------------------------------------------------------------- real data

REAL_META = {"Suturing": 39, "Needle_Passing": 28, "Knot_Tying": 36}
REAL_ROWS = {"Suturing": 38, "Needle_Passing": 28, "Knot_Tying": 36}
REAL_NO_META = [
    "Suturing_H002",
    "Needle_Passing_B005", "Needle_Passing_E002", "Needle_Passing_F002", "Needle_Passing_F005",
    "Needle_Passing_G001", "Needle_Passing_G002", "Needle_Passing_G003", "Needle_Passing_G004",
    "Needle_Passing_G005", "Needle_Passing_H001", "Needle_Passing_H003", "Needle_Passing_I001",
    "Knot_Tying_B005", "Knot_Tying_H001", "Knot_Tying_I004",
]


@pytest.fixture(scope="module")
def real_converted(real_jigsaws_root: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("real") / "jigsaws"
    return dst, convert_jigsaws(real_jigsaws_root, dst)


@pytest.mark.data
def test_real_meta(real_jigsaws_root: Path) -> None:
    for task, n in REAL_META.items():
        meta = read_meta(real_jigsaws_root / task / f"meta_file_{task}.txt", task=task)
        assert len(meta) == n
        assert all(r.grs == sum(r.grs_sub) for r in meta.values())
    suturing = read_meta(real_jigsaws_root / "Suturing" / "meta_file_Suturing.txt")
    assert suturing["Suturing_B001"] == MetaRecord("Suturing_B001", "N", 13, (3, 2, 1, 2, 2, 3))


@pytest.mark.data
def test_real_convert(real_converted: tuple[Path, dict]) -> None:
    dst, summary = real_converted
    assert summary["per_task"] == REAL_ROWS and summary["rows"] == 102
    assert summary["skipped_missing_file"] == ["Suturing_G001"]
    assert summary["skipped_no_meta"] == REAL_NO_META
    assert summary["frames"] > 0 and summary["shards"] >= 6
    info = inspect_shards(dst)
    assert info["counts"] == {"Knot_Tying": {"N": 16, "I": 10, "E": 10},
                              "Needle_Passing": {"N": 11, "I": 8, "E": 9},
                              "Suturing": {"N": 18, "I": 10, "E": 10}}
    assert info["subjects"]["Needle_Passing"] == list("BCDEFHI")
    assert info["frames"] == summary["frames"]


@pytest.mark.data
def test_real_first_values(real_converted: tuple[Path, dict], real_jigsaws_root: Path) -> None:
    dst, _ = real_converted
    path = real_jigsaws_root / "Suturing/kinematics/AllGestures/Suturing_B001.txt.gz"
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()
    first = np.array(lines[0].split(), dtype=np.float32)
    row = next(r for r in iter_rows(dst, columns=["name", "n_frames", "source", "kinematics"])
               if r["name"] == "Suturing_B001")
    assert row["source"] == "Suturing/kinematics/AllGestures/Suturing_B001.txt.gz"
    assert row["n_frames"] == len([ln for ln in lines if ln.strip()]) > 0
    np.testing.assert_array_equal(np.asarray(row["kinematics"][:N_CHANNELS], np.float32), first)
