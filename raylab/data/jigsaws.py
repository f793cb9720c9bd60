"""JIGSAWS surgical-skill kinematics: reader, Parquet converter and synthetic sample writer.

Raw layout (as distributed by JHU)::

    <root>/<Task>/kinematics/AllGestures/<Task>_<Subject><Trial:03d>.txt[.gz]
    <root>/<Task>/meta_file_<Task>.txt

Each kinematics line holds 76 whitespace-separated floats (30 Hz): for each of MTM-left,
MTM-right, PSM-left and PSM-right, 3 positions, a 3x3 rotation matrix, 3 linear and 3
angular velocities and the gripper angle. Each meta line is
``name <tab><tab> skill <tab> GRS total <tab><tab> 6 GRS sub-scores`` with CRLF line ends.
"""

from __future__ import annotations

import gzip as gzip_lib
import io
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raylab.data.shards import sample_folder, write_shards
from raylab.errors import ConfigError, DataError

TASKS = ("Suturing", "Needle_Passing", "Knot_Tying")
N_CHANNELS = 76
SKILL_LEVELS = ("N", "I", "E")
MANIPULATORS = ("mtm_left", "mtm_right", "psm_left", "psm_right")
_PER_MANIPULATOR = (
    [f"pos_{a}" for a in "xyz"]
    + [f"rot_{i}{j}" for i in range(3) for j in range(3)]
    + [f"linvel_{a}" for a in "xyz"]
    + [f"angvel_{a}" for a in "xyz"]
    + ["gripper"]
)
CHANNEL_NAMES = tuple(f"{m}_{c}" for m in MANIPULATORS for c in _PER_MANIPULATOR)
ROWS_PER_SHARD = 16
META_FORMAT = "'<trial name> <N|I|E> <GRS total> <6 GRS sub-scores>'"
_NAME_RE = re.compile(r"^(" + "|".join(TASKS) + r")_([A-Z])(\d{3})$")
_KIN_HINT = f"expected lines of {N_CHANNELS} whitespace-separated numbers"
SAMPLE_SKILLS = {"B": "N", "G": "N", "H": "N", "I": "N", "C": "I", "F": "I", "D": "E",
                 "E": "E"}
SCHEMA = pa.schema([
    ("task", pa.string()), ("subject", pa.string()), ("trial", pa.int32()),
    ("name", pa.string()), ("skill", pa.string()), ("grs", pa.int32()),
    ("grs_sub", pa.list_(pa.int32())), ("n_frames", pa.int32()),
    ("kinematics", pa.list_(pa.float32())), ("source", pa.string()),
])

assert len(CHANNEL_NAMES) == N_CHANNELS


@dataclass(frozen=True)
class MetaRecord:
    """One line of a JIGSAWS meta file.

    Attributes:
        name: Trial name, e.g. ``Suturing_B001``.
        skill: Self-proclaimed skill level, one of ``N``, ``I``, ``E``.
        grs: Global Rating Score total.
        grs_sub: The six GRS sub-scores.
    """

    name: str
    skill: str
    grs: int
    grs_sub: tuple[int, ...]


# ----------------------------------------------------------------------------- reading

def _read_text(path: Path) -> str:
    """Read a text file, gunzipping it when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})", path=path) from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip_lib.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"unreadable gzip data ({exc}); expected a gzip-compressed "
                            "text file", path=path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start}); expected a text file",
                        path=path) from None


def read_kinematics(path: str | os.PathLike) -> np.ndarray:
    """Read one JIGSAWS kinematics file (``.txt`` or ``.txt.gz``).

    Args:
        path: The file.

    Returns:
        A float32 array of shape ``[T, 76]``.

    Raises:
        DataError: The file is missing, empty, unreadable, has a line without exactly 76
            values, a non-numeric token, or a NaN/infinite value (path and line named).
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"empty kinematics file; {_KIN_HINT}", path=path, line=1)
    try:
        arr = np.loadtxt(io.StringIO(text), dtype=np.float32, ndmin=2, comments=None)
    except ValueError:
        _diagnose_kinematics(text, path)
        raise DataError(f"cannot parse kinematics; {_KIN_HINT}", path=path) from None
    if arr.shape[1] != N_CHANNELS:
        _diagnose_kinematics(text, path)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise DataError(f"NaN or infinite value; {_KIN_HINT} (finite, within float32 range)",
                        path=path, line=_line_of_row(text, row))
    return arr


def _diagnose_kinematics(text: str, path: Path) -> None:
    """Find the first malformed line of a kinematics text and raise a DataError for it."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != N_CHANNELS:
            raise DataError(f"expected {N_CHANNELS} whitespace-separated values, got "
                            f"{len(tokens)}", path=path, line=lineno)
        for col, token in enumerate(tokens, start=1):
            if not _is_number(token):
                raise DataError(f"non-numeric value {token[:40]!r} in column {col}; expected "
                                "a number", path=path, line=lineno)


def _is_number(token: str) -> bool:
    """Whether NumPy's text reader takes ``token`` as a number.

    Python's ``float`` also takes ``1_000`` and non-ASCII digits, which ``np.loadtxt``
    refuses; both count as non-numeric here, so that the error names their line.
    """
    if not token.isascii() or "_" in token:
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def _line_of_row(text: str, row: int) -> int:
    """1-based line number of the ``row``-th non-blank line of ``text``."""
    seen = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            seen += 1
            if seen == row:
                return lineno
    return row + 1


def parse_trial_name(name: str) -> tuple[str, str, int]:
    """Split a trial name into task, subject and trial number.

    Args:
        name: E.g. ``Knot_Tying_B001``.

    Returns:
        E.g. ``("Knot_Tying", "B", 1)``.

    Raises:
        DataError: The name is not ``<Task>_<Subject letter><3-digit trial>``.
    """
    match = _NAME_RE.match(name)
    if match is None:
        raise DataError(f"bad trial name {name!r}; expected <Task>_<Subject><Trial:03d> with "
                        f"Task one of {', '.join(TASKS)}, e.g. Suturing_B001")
    return match.group(1), match.group(2), int(match.group(3))


def read_meta(path: str | os.PathLike, task: str | None = None) -> dict[str, MetaRecord]:
    """Read a JIGSAWS meta file (tabs, blank fields, CRLF and blank lines allowed).

    Args:
        path: ``meta_file_<Task>.txt``.
        task: If given, every trial name must belong to this task.

    Returns:
        ``{trial name: MetaRecord}`` in file order.

    Raises:
        DataError: A non-blank line does not parse, or a name repeats (path and line named).
    """
    path = Path(path)
    records: dict[str, MetaRecord] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_meta_line(line, path, lineno)
        if task is not None and not record.name.startswith(task + "_"):
            raise DataError(f"trial {record.name!r} is not a {task} trial; expected names "
                            f"like {task}_B001", path=path, line=lineno)
        if record.name in records:
            raise DataError(f"duplicate trial {record.name!r}; expected one line per trial",
                            path=path, line=lineno)
        records[record.name] = record
    return records


def _parse_meta_line(line: str, path: Path, lineno: int) -> MetaRecord:
    """Parse one non-blank meta line."""
    tokens = line.split()

    def fail(why: str) -> DataError:
        return DataError(f"{why}; expected {META_FORMAT}, got {line.strip()[:80]!r}",
                         path=path, line=lineno)

    if len(tokens) != 9:
        raise fail(f"{len(tokens)} fields instead of 9")
    name, skill, *scores = tokens
    if _NAME_RE.match(name) is None:
        raise fail(f"bad trial name {name!r}")
    if skill not in SKILL_LEVELS:
        raise fail(f"skill {skill!r} is not N, I or E")
    if not all(re.fullmatch(r"\d+", s) for s in scores):
        raise fail("scores must be non-negative integers")
    values = [int(s) for s in scores]
    return MetaRecord(name=name, skill=skill, grs=values[0], grs_sub=tuple(values[1:]))


def skill_label(row_skill: str, grs: int, labels: str, grs_thresholds: Sequence[float]) -> int:
    """Class index of a trial.

    Args:
        row_skill: Self-proclaimed skill ``N``, ``I`` or ``E``.
        grs: GRS total.
        labels: ``"self"`` maps N/I/E to 0/1/2; ``"grs"`` maps ``grs < t0`` to 0,
            ``grs < t1`` to 1 and anything else to 2.
        grs_thresholds: ``(t0, t1)`` with ``t0 <= t1`` (used when ``labels == "grs"``).

    Returns:
        0, 1 or 2.

    Raises:
        ConfigError: Unknown ``labels`` or bad thresholds.
        DataError: Unknown skill letter.
    """
    if labels == "self":
        if row_skill not in SKILL_LEVELS:
            raise DataError(f"skill {row_skill!r} is not one of N, I, E")
        return SKILL_LEVELS.index(row_skill)
    if labels == "grs":
        if len(grs_thresholds) != 2 or grs_thresholds[0] > grs_thresholds[1]:
            raise ConfigError(f"grs_thresholds: expected two ascending numbers, got "
                              f"{list(grs_thresholds)!r}")
        return 0 if grs < grs_thresholds[0] else 1 if grs < grs_thresholds[1] else 2
    raise ConfigError(f"labels: expected 'self' or 'grs', got {labels!r}")


# -------------------------------------------------------------------------- converting

@dataclass(frozen=True)
class _Trial:
    """A labelled trial with its kinematics file."""

    task: str
    subject: str
    trial: int
    path: Path
    meta: MetaRecord


def _check_tasks(src: Path, tasks: list[str] | None) -> list[str]:
    """Validate the task list against TASKS and the folders present in ``src``."""
    if not src.is_dir():
        raise DataError("JIGSAWS folder not found; expected <root>/<Task>/kinematics/"
                        "AllGestures/*.txt[.gz] and <root>/<Task>/meta_file_<Task>.txt",
                        path=src)
    if tasks is None:
        found = [t for t in TASKS if (src / t).is_dir()]
        if not found:
            raise DataError(f"no task folder found; expected one or more of "
                            f"{', '.join(TASKS)}", path=src)
        return found
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(map(repr, unknown))}; expected some of "
                        f"{', '.join(TASKS)}")
    for task in tasks:
        if not (src / task).is_dir():
            raise DataError(f"task folder not found; expected {task}/kinematics/AllGestures "
                            "and the meta file", path=src / task)
    return list(dict.fromkeys(tasks))


def _kinematics_files(task_dir: Path, task: str) -> dict[str, Path]:
    """Map trial name to kinematics file for one task folder."""
    kin_dir = task_dir / "kinematics" / "AllGestures"
    if not kin_dir.is_dir():
        raise DataError("kinematics folder not found; expected <Task>/kinematics/AllGestures/"
                        f"{task}_<Subject><Trial:03d>.txt[.gz]", path=kin_dir)
    files: dict[str, Path] = {}
    for path in sorted(kin_dir.iterdir()):
        name = path.name.removesuffix(".gz").removesuffix(".txt")
        if not path.name.endswith((".txt", ".txt.gz")) or not name.startswith(task + "_"):
            continue
        if _NAME_RE.match(name) is None:
            continue
        if name in files:
            raise DataError(f"both {files[name].name} and {path.name} exist; expected one "
                            "kinematics file per trial", path=kin_dir)
        files[name] = path
    return files


def _scan(src: Path, tasks: list[str]) -> tuple[list[_Trial], list[str], list[str]]:
    """List labelled trials plus the names skipped for lack of meta line or file."""
    trials: list[_Trial] = []
    no_meta: list[str] = []
    missing: list[str] = []
    for task in tasks:
        task_dir = src / task
        meta = read_meta(task_dir / f"meta_file_{task}.txt", task=task)
        files = _kinematics_files(task_dir, task)
        no_meta += sorted(n for n in files if n not in meta)
        missing += sorted(n for n in meta if n not in files)
        for name, record in meta.items():
            if name in files:
                _, subject, trial = parse_trial_name(name)
                trials.append(_Trial(task, subject, trial, files[name], record))
    trials.sort(key=lambda t: (t.task, t.subject, t.trial))
    return trials, no_meta, missing


def _trial_table(trial: _Trial, src: Path) -> pa.Table:
    """One-row table holding a trial and its flattened kinematics."""
    arr = read_kinematics(trial.path)
    flat = pa.array(arr.reshape(-1), type=pa.float32())
    kin = pa.ListArray.from_arrays(pa.array([0, len(flat)], type=pa.int32()), flat)
    columns = {
        "task": [trial.task], "subject": [trial.subject], "trial": [trial.trial],
        "name": [trial.meta.name], "skill": [trial.meta.skill], "grs": [trial.meta.grs],
        "grs_sub": [list(trial.meta.grs_sub)], "n_frames": [arr.shape[0]],
        "source": [trial.path.relative_to(src).as_posix()],
    }
    arrays = [kin if f.name == "kinematics" else pa.array(columns[f.name], type=f.type)
              for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def convert_jigsaws(src: str | os.PathLike, dst: str | os.PathLike,
                    tasks: list[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert a raw JIGSAWS folder into a ``format="jigsaws"`` shard folder.

    One row per labelled trial, sorted by (task, subject, trial). Trials without a meta line
    and meta lines without a kinematics file are skipped and listed in the manifest.

    Args:
        src: Raw JIGSAWS root.
        dst: Output shard folder.
        tasks: Tasks to convert; None converts every task whose folder exists.
        overwrite: Replace an existing ``dst``.

    Returns:
        Summary: ``rows``, ``frames``, ``per_task``, ``skipped_no_meta``,
        ``skipped_missing_file``, ``shards`` and ``dst``.

    Raises:
        DataError: Unknown task, missing folder or file, or malformed input.
    """
    src = Path(src)
    tasks = _check_tasks(src, tasks)
    trials, no_meta, missing = _scan(src, tasks)
    frames = {"n": 0}

    def tables() -> Iterator[pa.Table]:
        for trial in trials:
            table = _trial_table(trial, src)
            frames["n"] += table["n_frames"][0].as_py()
            yield table

    extra = {"tasks": tasks, "n_channels": N_CHANNELS, "channel_names": list(CHANNEL_NAMES),
             "skipped_no_meta": no_meta, "skipped_missing_file": missing,
             "source": str(src.resolve())}
    manifest = write_shards(tables(), dst, format="jigsaws", extra=extra,
                            rows_per_shard=ROWS_PER_SHARD, overwrite=overwrite)
    return {"rows": manifest["rows"], "frames": frames["n"],
            "per_task": {t: sum(tr.task == t for tr in trials) for t in tasks},
            "skipped_no_meta": no_meta, "skipped_missing_file": missing,
            "shards": len(manifest["shards"]), "dst": str(dst)}


# --------------------------------------------------------------------- synthetic sample

_SAMPLE_README = """SYNTHETIC JIGSAWS-format sample
Written by raylab (raylab.data.jigsaws.write_sample).

This is NOT real surgical data. It mimics the JIGSAWS layout and file formats:
  <Task>/kinematics/AllGestures/<Task>_<Subject><Trial:03d>.txt[.gz]  (76 values per line)
  <Task>/meta_file_<Task>.txt  (tab-separated, blank fields, CRLF line ends)
Skill levels follow the real study: subjects B, G, H, I novice (N); C, F intermediate (I);
D, E expert (E). Experts move faster and more smoothly; novices show tremor, jitter and
pauses. One trial per task has no meta line, to exercise the converter's skipping.
Parameters: {params}
"""

# Per-skill motion style: speed (cycles/s), tremor amplitude, jitter std, pause fraction.
_STYLE = {"E": (0.6, 0.0003, 0.0002, 0.0), "I": (0.4, 0.003, 0.0015, 0.1),
          "N": (0.25, 0.007, 0.0035, 0.25)}
# Workspace centre (metres) of each manipulator.
_CENTRES = np.array([[-0.08, 0.02, 0.45], [0.08, 0.02, 0.45], [-0.05, 0.0, 0.1],
                     [0.05, 0.0, 0.1]])
_GRS_RANGE = {"E": (3, 5), "I": (2, 4), "N": (1, 3)}


def _time_warp(rng: np.random.Generator, n: int, speed: float, pause: float) -> np.ndarray:
    """Cumulative task phase (in cycles) with a wobbling speed and optional pauses."""
    t = np.arange(n) / 30.0
    rate = speed * (1.0 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.05, 0.15) * t
                                       + rng.uniform(0, 2 * np.pi)))
    if pause > 0:
        n_pauses = max(1, int(round(pause * n / 40)))
        for start in rng.integers(0, max(1, n - 40), size=n_pauses):
            rate[start:start + int(rng.integers(20, 45))] *= 0.03
    return np.cumsum(rate) / 30.0


def _smooth_signal(rng: np.random.Generator, phase: np.ndarray, dims: int,
                   scale: float) -> np.ndarray:
    """Sum of sinusoids of the phase plus a smoothed random walk, shape ``[T, dims]``."""
    freqs = rng.uniform(0.5, 2.0, size=(1, dims, 3))
    amps = rng.uniform(0.3, 1.0, size=(1, dims, 3)) * scale
    shifts = rng.uniform(0, 2 * np.pi, size=(1, dims, 3))
    base = (amps * np.sin(2 * np.pi * freqs * phase[:, None, None] + shifts)).sum(axis=2)
    walk = np.cumsum(rng.normal(0, scale * 0.01, size=(len(phase), dims)), axis=0)
    kernel = np.ones(15) / 15
    walk = np.stack([np.convolve(walk[:, d], kernel, mode="same") for d in range(dims)], 1)
    return base + walk


def _rotations(angles: np.ndarray) -> np.ndarray:
    """Row-major 3x3 rotation matrices (ZYX Euler) for angles ``[T, 3]``, shape ``[T, 9]``."""
    cz, cy, cx = np.cos(angles).T
    sz, sy, sx = np.sin(angles).T
    rot = np.stack([
        cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx,
        sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx,
        -sy, cy * sx, cy * cx,
    ], axis=1)
    return rot


def _manipulator(rng: np.random.Generator, phase: np.ndarray, skill: str,
                 centre: np.ndarray) -> np.ndarray:
    """19 channels of one manipulator: position, rotation, velocities, gripper."""
    _, tremor, jitter, _ = _STYLE[skill]
    n = len(phase)
    t = np.arange(n) / 30.0
    shake = tremor * np.sin(2 * np.pi * rng.uniform(6, 10) * t[:, None]
                            + rng.uniform(0, 2 * np.pi, size=3))
    pos = (centre + rng.normal(0, 0.005, size=3) + _smooth_signal(rng, phase, 3, 0.02) + shake
           + rng.normal(0, jitter, size=(n, 3)))
    angles = _smooth_signal(rng, phase, 3, 0.3) + rng.normal(0, jitter * 8, size=(n, 3))
    gripper = (0.4 + 0.5 * np.sin(2 * np.pi * 0.7 * phase + rng.uniform(0, 6))
               + rng.normal(0, jitter * 10, size=n))
    linvel = np.gradient(pos, axis=0) * 30.0
    angvel = np.gradient(angles, axis=0) * 30.0
    return np.concatenate([pos, _rotations(angles), linvel, angvel, gripper[:, None]], axis=1)


def _sample_trial(rng: np.random.Generator, n: int, skill: str) -> np.ndarray:
    """A synthetic ``[n, 76]`` trial for a subject of the given skill."""
    speed, _, _, pause = _STYLE[skill]
    phase = _time_warp(rng, n, speed * rng.uniform(0.85, 1.15), pause)
    return np.concatenate([_manipulator(rng, phase, skill, c) for c in _CENTRES], axis=1)


def _format_rows(arr: np.ndarray) -> str:
    """Format a trial the way JIGSAWS does: fixed-width columns, one frame per line."""
    fmt = "%16.8f" * arr.shape[1]
    return "\n".join(fmt % tuple(row) for row in arr.tolist()) + "\n"


def _meta_line(rng: np.random.Generator, name: str, skill: str) -> str:
    """A meta line in the original layout: tabs, blank fields, CRLF."""
    low, high = _GRS_RANGE[skill]
    subs = rng.integers(low, high + 1, size=6)
    scores = "\t".join(str(int(s)) for s in subs)
    return f"{name}\t\t{skill}\t{int(subs.sum())}\t\t{scores}\r\n"


def write_sample(dst: str | os.PathLike, tasks: Sequence[str] = TASKS,
                 subjects: str = "BCDEFGHI", trials: Sequence[int] = (1, 2, 3, 4, 5),
                 frames: tuple[int, int] = (600, 900), seed: int = 0,
                 gzip: bool = False) -> Path:
    """Write a small SYNTHETIC raw JIGSAWS folder whose skill labels are learnable.

    Args:
        dst: Output folder (new, empty, or an earlier sample, which is replaced).
        tasks: Tasks to generate.
        subjects: Subject letters among B..I (skill as in the real study).
        trials: Trial numbers per subject.
        frames: Inclusive range of frames per trial.
        seed: Random seed; equal seeds give identical files.
        gzip: Write ``.txt.gz`` kinematics instead of ``.txt``.

    Returns:
        ``dst`` as a Path.

    Raises:
        ConfigError: Unknown task or subject, or bad frame range.
        DataError: ``dst`` is a non-empty folder that is not an earlier sample.
    """
    dst = Path(dst)
    _check_sample_args(tasks, subjects, trials, frames)
    with sample_folder(dst, "SYNTHETIC JIGSAWS", "synthetic sample") as tmp:
        rng = np.random.default_rng(seed)
        for index, task in enumerate(tasks):
            _write_sample_task(tmp / task, task, index, rng, subjects, trials, frames, gzip)
        params = dict(tasks=list(tasks), subjects=subjects, trials=list(trials),
                      frames=list(frames), seed=seed, gzip=gzip)
        (tmp / "README.txt").write_text(_SAMPLE_README.format(params=params))
    return dst


def _check_sample_args(tasks: Sequence[str], subjects: str, trials: Sequence[int],
                       frames: tuple[int, int]) -> None:
    """Validate write_sample arguments."""
    if not tasks or any(t not in TASKS for t in tasks):
        raise ConfigError(f"tasks: expected some of {', '.join(TASKS)}, got {list(tasks)!r}")
    if (not subjects or any(s not in SAMPLE_SKILLS for s in subjects)
            or len(set(subjects)) != len(subjects)):
        raise ConfigError(f"subjects: expected distinct letters among BCDEFGHI, got "
                          f"{subjects!r}")
    if (not trials or any(not 1 <= int(k) <= 999 for k in trials)
            or len(set(trials)) != len(trials)):
        raise ConfigError(f"trials: expected distinct numbers in 1..999, got {list(trials)!r}")
    if len(frames) != 2 or not 2 <= frames[0] <= frames[1]:
        raise ConfigError(f"frames: expected (low, high) with 2 <= low <= high, got {frames!r}")


def _write_sample_task(folder: Path, task: str, index: int, rng: np.random.Generator,
                       subjects: str, trials: Sequence[int], frames: tuple[int, int],
                       gzip: bool) -> None:
    """Write the kinematics files and meta file of one synthetic task."""
    kin_dir = folder / "kinematics" / "AllGestures"
    kin_dir.mkdir(parents=True)
    names = [(s, int(k)) for s in subjects for k in trials]
    unlabelled = names[(index * len(trials) + len(trials) - 1) % len(names)]
    meta = []
    for subject, trial in names:
        skill = SAMPLE_SKILLS[subject]
        name = f"{task}_{subject}{trial:03d}"
        n = int(rng.integers(frames[0], frames[1] + 1))
        data = _format_rows(_sample_trial(rng, n, skill)).encode()
        if gzip:
            packed = gzip_lib.compress(data, compresslevel=1, mtime=0)
            (kin_dir / f"{name}.txt.gz").write_bytes(packed)
        else:
            (kin_dir / f"{name}.txt").write_bytes(data)
        line = _meta_line(rng, name, skill)
        if (subject, trial) != unlabelled or len(names) < 2:
            meta.append(line)
    (folder / f"meta_file_{task}.txt").write_bytes(("".join(meta) + "\r\n").encode())
