"""Bad input to the CLI ends in one ``raylab: error:`` line and exit code 2, before Ray starts.

``ensure_ray`` is replaced by a function that fails the test, so every case here proves
that the error is found before a cluster would start.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import raylab.runtime.cluster
from raylab.cli import main
from raylab.data.jigsaws import convert_jigsaws, write_sample

KIN = Path("Suturing/kinematics/AllGestures/Suturing_D001.txt")
META = Path("Suturing/meta_file_Suturing.txt")


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny raw JIGSAWS folder: Suturing, subjects B and D, trials 1-2, 100-120 frames."""
    root = tmp_path_factory.mktemp("cli_raw") / "raw"
    return write_sample(root, tasks=("Suturing",), subjects="BD", trials=(1, 2),
                        frames=(100, 120))


@pytest.fixture(scope="module")
def shards(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("cli_shards") / "shards"
    convert_jigsaws(raw, dst)
    return dst


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was about to start; the error must come before")

    monkeypatch.setattr(raylab.runtime.cluster, "ensure_ray", refuse)
    monkeypatch.chdir(tmp_path)  # anything written to a relative default lands here


def fail(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI, check the one-line error contract and return that line."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    assert err.startswith("raylab: error: ")
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def assert_nothing_written(dst: Path) -> None:
    assert not dst.exists()
    assert [p.name for p in dst.parent.glob(f".{dst.name}.tmp-*")] == []


def assert_storage_empty(storage: Path) -> None:
    """No experiment folder (or anything else) under the storage path."""
    assert not storage.exists() or list(storage.iterdir()) == []


# --------------------------------------------------------------------------- data convert


def test_convert_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src, dst = tmp_path / "missing", tmp_path / "dst"
    err = fail(capsys, "data", "convert", "jigsaws", src, dst)
    assert err.startswith(f"raylab: error: {src}: JIGSAWS folder not found")
    assert_nothing_written(dst)


def _edit_line(path: Path, index: int, edit: Callable[[list[str]], list[str]]) -> None:
    lines = path.read_text().splitlines()
    lines[index] = " ".join(edit(lines[index].split()))
    path.write_text("\n".join(lines) + "\n")


CORRUPTIONS: dict[str, tuple[Path, Callable[[Path], None], str]] = {
    "75 columns": (KIN, lambda p: _edit_line(p, 4, lambda t: t[:75]),
                   ":5: expected 76 whitespace-separated values, got 75"),
    "non-numeric": (KIN, lambda p: _edit_line(p, 4, lambda t: t[:10] + ["abc"] + t[11:]),
                    ":5: non-numeric value 'abc' in column 11"),
    "NaN": (KIN, lambda p: _edit_line(p, 6, lambda t: t[:3] + ["nan"] + t[4:]),
            ":7: NaN or infinite value"),
    "empty file": (KIN, lambda p: p.write_text(""), ":1: empty kinematics file"),
    "bad meta line": (META, lambda p: p.write_text("Suturing_B001\tX\t10\r\n"),
                      ":1: 3 fields instead of 9"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_convert_corrupt_input(case: str, raw: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rel, corrupt, fragment = CORRUPTIONS[case]
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(raw, src)
    corrupt(src / rel)
    err = fail(capsys, "data", "convert", "jigsaws", src, dst)
    assert err.startswith(f"raylab: error: {src / rel}{fragment}")
    assert_nothing_written(dst)


def test_convert_unknown_task(raw: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "dst"
    err = fail(capsys, "data", "convert", "jigsaws", raw, dst, "--tasks", "Unknown")
    assert err == ("raylab: error: unknown task(s) 'Unknown'; expected some of Suturing, "
                   "Needle_Passing, Knot_Tying")
    assert_nothing_written(dst)


# --------------------------------------------------------------------------- data inspect


def test_inspect_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fail(capsys, "data", "inspect", tmp_path)
    assert err.startswith(f"raylab: error: {tmp_path / 'manifest.json'}: manifest.json not found")


def test_inspect_corrupt_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text("{oops")
    err = fail(capsys, "data", "inspect", tmp_path)
    assert err.startswith(f"raylab: error: {tmp_path / 'manifest.json'}:1: invalid JSON")


# ---------------------------------------------------------------------------------- train


def test_train_data_without_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, storage = tmp_path / "nodata", tmp_path / "runs"
    data.mkdir()
    err = fail(capsys, "train", "skill", "--data", data, "--storage", storage)
    assert err.startswith(f"raylab: error: {data / 'manifest.json'}: manifest.json not found")
    assert_storage_empty(storage)


@pytest.mark.parametrize(("override", "message"), [
    ("nope=1", "unknown config key 'nope'; known keys here: "),
    ("window=abc", "config key 'window': expected int, got 'abc'"),
    ("optim.lr=-1", "config key 'optim.lr': expected a positive number, got -1.0"),
])
def test_train_bad_set(override: str, message: str, shards: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "runs"
    err = fail(capsys, "train", "skill", "--data", shards, "--set", override,
               "--storage", storage)
    assert err.startswith(f"raylab: error: {message}")
    assert_storage_empty(storage)


def test_train_unknown_method(capsys: pytest.CaptureFixture[str]) -> None:
    err = fail(capsys, "train", "nosuchmethod")
    assert err.startswith("raylab: error: unknown method 'nosuchmethod'; known methods: ")
    assert "skill" in err


def test_train_window_larger_than_every_trial(shards: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "runs"
    err = fail(capsys, "train", "skill", "--data", shards, "--set", "window=5000",
               "--storage", storage)
    assert err.startswith(f"raylab: error: {shards}: window 5000 is larger than trial Suturing_")
    assert "frames); choose window <= " in err
    assert_storage_empty(storage)


def test_train_unknown_storage_scheme(shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = fail(capsys, "train", "skill", "--data", shards, "--storage", "ftp://x/y")
    assert err.startswith("raylab: error: --storage 'ftp://x/y': unknown scheme 'ftp'")


# ----------------------------------------------------------------------------------- tune


def test_tune_resume_not_an_experiment(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    err = fail(capsys, "tune", "--resume", exp)
    assert err == (f"raylab: error: {exp.resolve()}: not a raylab tune experiment "
                   "(no raylab_tune.json)")
    assert list(exp.iterdir()) == []


def test_tune_empty_space(shards: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "runs"
    err = fail(capsys, "tune", "skill", "--data", shards, "--space", "window=[]",
               "--storage", storage)
    assert err == "raylab: error: --space window: an empty list has nothing to choose from"
    assert_storage_empty(storage)


# --------------------------------------------------------------------------------- assess


def test_assess_empty_checkpoint_folder(raw: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    recording = tmp_path / "Suturing_B001.txt"
    shutil.copy(raw / "Suturing/kinematics/AllGestures/Suturing_B001.txt", recording)
    err = fail(capsys, "assess", "--checkpoint", ckpt, recording)
    assert err == f"raylab: error: {ckpt}: not a raylab checkpoint (no meta.json)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Suturing_B001.txt", "ckpt"]


# ------------------------------------------------------------- good input gets that far


@pytest.mark.parametrize("argv", [
    ["train", "skill", "--set", "optim.lr=1e-3", "--set", "window=60"],
    ["tune", "skill"],  # the method's default space, `optim.lr=log(3e-4, 3e-3)` included
    ["tune", "skill", "--space", "optim.lr=log(1e-4,1e-2)", "--space", "window=[30,60]"],
])
def test_valid_input_passes_every_check_before_ray(argv: list[str], shards: Path,
                                                   tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="Ray was about to start"):
        main(argv + ["--data", str(shards), "--storage", str(tmp_path / "runs")])
    assert_storage_empty(tmp_path / "runs")
