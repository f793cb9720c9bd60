"""runtime.datasets.read_shards: the small-set path (read by the driver, handed over with
ray.data.from_blocks) gives the same rows as streaming the files, in enough blocks for
every CPU, and a damaged file is one DataError naming it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylab.errors import DataError
from raylab.runtime.datasets import read_shards

pytestmark = pytest.mark.ray


@pytest.fixture()
def shard_files(tmp_path: Path) -> list[str]:
    paths = []
    for i, rows in enumerate((7, 0, 13)):  # an empty shard too
        path = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(pa.table({"name": [f"f{i}r{j}" for j in range(rows)],
                                 "value": [float(j) for j in range(rows)],
                                 "unused": list(range(rows))},
                                schema=pa.schema([("name", pa.string()),
                                                  ("value", pa.float64()),
                                                  ("unused", pa.int64())])), path)
        paths.append(str(path))
    return paths


def _rows(ds) -> list[tuple]:
    return sorted((r["name"], r["value"]) for r in ds.iter_rows())


def test_small_sets_match_streaming(ray_cluster, shard_files: list[str]) -> None:
    held = read_shards(shard_files, ["name", "value"], shuffle_files=True, materialize_mb=64)
    streamed = read_shards(shard_files, ["name", "value"], shuffle_files=False,
                           materialize_mb=0)
    assert _rows(held) == _rows(streamed)
    assert len(_rows(held)) == 20
    assert held.columns() == ["name", "value"]
    in_order = read_shards(shard_files, ["name", "value"], shuffle_files=False,
                           materialize_mb=64)
    assert _rows(in_order) == _rows(streamed)
    assert in_order.num_blocks() >= 3  # cut so that every CPU gets work


def test_streamed_files_are_cut_into_small_blocks(ray_cluster, shard_files: list[str]
                                                  ) -> None:
    """rows_per_block: a streamed file reaches the next stage in blocks of at most that
    many rows (so its per-row work spreads over tasks), and no row is lost or repeated."""
    whole = read_shards(shard_files, ["name", "value"], shuffle_files=False, materialize_mb=0)
    cut = read_shards(shard_files, ["name", "value"], shuffle_files=False, materialize_mb=0,
                      rows_per_block=4)
    assert _rows(cut) == _rows(whole)
    sizes = [len(b["name"]) for b in cut.iter_batches(batch_size=None)]
    assert max(sizes) <= 4 and sum(sizes) == 20
    # Without the cut, Ray Data hands each file over whole, as one block.
    files = sorted(n for f in shard_files if (n := pq.read_metadata(f).num_rows))
    assert sorted(len(b["name"]) for b in whole.iter_batches(batch_size=None)) == files
    # A read task may hand on all of a file's blocks at once, through a private Ray Data
    # setting that its task operator must still read (else the setting does nothing).
    import inspect

    from ray.data._internal.execution.operators import task_pool_map_operator

    from raylab.runtime.datasets import STREAM_GENERATOR_BLOCKS

    assert cut.context._max_num_blocks_in_streaming_gen_buffer >= STREAM_GENERATOR_BLOCKS
    assert "_max_num_blocks_in_streaming_gen_buffer" in inspect.getsource(
        task_pool_map_operator)


def test_a_damaged_streamed_shard_is_named(ray_cluster, shard_files: list[str]) -> None:
    Path(shard_files[1]).write_bytes(b"not parquet at all")
    streamed = read_shards(shard_files, ["name", "value"], shuffle_files=True,
                           materialize_mb=0, rows_per_block=4)
    from raylab.cli import find_raylab_error
    from raylab.errors import shard_read_error

    with pytest.raises(Exception) as caught:  # Ray Data wraps the task's error
        streamed.take_all()
    # What the CLI prints as its one line (cli.main looks the same two ways).
    error = find_raylab_error(caught.value) or shard_read_error(caught.value)
    assert isinstance(error, DataError)
    assert str(error).startswith(f"{shard_files[1]}: ")
    assert "unreadable" in str(error) or "not a Parquet" in str(error), str(error)


def test_a_damaged_small_shard_is_named(ray_cluster, shard_files: list[str]) -> None:
    Path(shard_files[2]).write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"part-00002\.parquet: unreadable Parquet data"):
        read_shards(shard_files, ["name", "value"], shuffle_files=False, materialize_mb=64)


def test_skill_statistics_agree_on_both_paths(ray_cluster, tmp_path: Path) -> None:
    """Channel statistics from the rows the driver read equal the Ray Data pass over the
    same shards (the path taken when the set streams)."""
    import numpy as np

    from raylab.methods.skill.data import (
        TRIAL_COLUMNS,
        TrialRows,
        channel_stats,
        table_channel_stats,
    )
    from raylab.runtime.datasets import local_tables, stream_shards

    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        frames = [int(n) for n in rng.integers(8, 30, size=4)]
        path = tmp_path / f"kin-{i}.parquet"
        pq.write_table(pa.table({
            "name": [f"s{i}t{j}" for j in range(4)],
            "n_frames": pa.array(frames, type=pa.int32()),
            "kinematics": pa.array([rng.normal(j, 2, size=n * 76).astype(np.float32)
                                    for j, n in enumerate(frames)],
                                   type=pa.list_(pa.float32())),
        }), path)
        paths.append(str(path))
    names = {"s0t1", "s0t3", "s1t0", "s1t2"}
    held = table_channel_stats(local_tables(paths, TRIAL_COLUMNS, 64), names)
    streamed = channel_stats(TrialRows(stream_shards(paths, TRIAL_COLUMNS,
                                                     shuffle_files=False), None), names)
    np.testing.assert_allclose(held.mean, streamed.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(held.std, streamed.std, rtol=1e-9, atol=0)


def test_local_workers_run_at_full_priority(ray_cluster) -> None:
    """ensure_ray's local cluster gives its workers niceness 0: at Ray's default 15 a
    training step lost ~30 % of its speed to the driver and the daemons on 2 cores."""
    import os

    @ray_cluster.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray_cluster.get(niceness.remote()) == 0


def test_max_train_rows_is_one_fixed_seeded_subset(ray_cluster, tmp_path: Path) -> None:
    """``max_train_rows`` keeps the same rows in every epoch (the first rows after a random
    block order would differ), and DINO's k-NN bank, built from the same files and seed,
    holds exactly the rows it trained on."""
    from raylab import config as cfglib
    from raylab.data.imagefolder import convert_imagefolder, write_image_sample
    from raylab.methods.dino.config import DINOConfig
    from raylab.tasks.classification.data import (
        encoded_images,
        load_image_data,
        row_paths,
        row_subset,
    )

    src = write_image_sample(tmp_path / "raw", classes=2, train_per_class=20,
                             test_per_class=2)
    shards = tmp_path / "shards"
    convert_imagefolder(src, shards, rows_per_shard=8)
    cfg = cfglib.apply_overrides(DINOConfig(), {"data": str(shards), "seed": 3,
                                                "optim.batch_size": 4})
    paths = load_image_data(cfg).train_paths
    assert len(paths) > 1  # several files, so a random block order changes the first rows
    train = encoded_images(paths, cfg, True, limit=10)
    epochs = [sorted(r["path"] for r in train.iter_rows()) for _ in range(3)]
    assert len(epochs[0]) == 10 and epochs[0] == epochs[1] == epochs[2]
    bank = encoded_images(paths, cfg, False, limit=10)
    assert sorted(r["path"] for r in bank.iter_rows()) == epochs[0]
    assert epochs[0] == sorted(row_subset(row_paths(paths), 10, 3))
    other = cfglib.apply_overrides(cfg, {"seed": 4})
    assert sorted(r["path"] for r in encoded_images(paths, other, True, limit=10)
                  .iter_rows()) != epochs[0]


def test_skill_windows_normalised_per_recording(ray_cluster, tmp_path: Path) -> None:
    """normalize: recording through the Ray Data windowing: every window of a trial is
    normalised with that trial's own statistics (by hand), not the training split's."""
    import numpy as np

    from raylab.methods.skill.config import SkillConfig
    from raylab.methods.skill.data import TRIAL_COLUMNS, Trial, TrialRows, window_dataset
    from raylab.runtime.datasets import stream_shards

    rng = np.random.default_rng(2)
    kin = {f"t{j}": rng.normal(3 * j, j + 1, size=(12, 76)).astype(np.float32)
           for j in range(3)}
    path = tmp_path / "kin.parquet"
    pq.write_table(pa.table({
        "name": list(kin), "n_frames": pa.array([12] * 3, type=pa.int32()),
        "kinematics": pa.array([k.reshape(-1) for k in kin.values()],
                               type=pa.list_(pa.float32()))}), path)
    rows = TrialRows(stream_shards([str(path)], TRIAL_COLUMNS, shuffle_files=False), None)
    trials = [Trial(name, "S", 1, 0, 12) for name in kin]
    cfg = SkillConfig(window=6, step=3, normalize="recording")
    out = window_dataset(rows, trials, cfg, None).take_all()
    assert len(out) == 3 * 3
    for row in out:
        frames = kin[trials[int(row["trial_idx"])].name]
        own = (frames - frames.mean(0)) / frames.std(0)
        start = int(row["window_idx"]) * 3
        np.testing.assert_allclose(row["x"], own[start:start + 6], rtol=1e-4, atol=1e-4)


def test_skill_windows_cut_on_the_driver_equal_the_ray_data_windows(ray_cluster,
                                                                    tmp_path: Path) -> None:
    """Rows the driver holds are windowed there (one numpy pass, no tasks); the windows
    (values, labels, trial and window indices) are exactly those the Ray Data tasks cut
    from the same shards, with training-split statistics and per recording."""
    import numpy as np

    from raylab.methods.skill.config import SkillConfig
    from raylab.methods.skill.data import (
        TRIAL_COLUMNS,
        Trial,
        TrialRows,
        table_channel_stats,
        window_dataset,
    )
    from raylab.runtime.datasets import dataset_from_tables, local_tables, stream_shards

    rng = np.random.default_rng(3)
    paths, trials = [], []
    for i in range(2):
        frames = [int(n) for n in rng.integers(12, 40, size=5)]
        names = [f"s{i}t{j}" for j in range(5)]
        trials += [Trial(n, f"S{i}", j, j % 3, f) for j, (n, f) in enumerate(zip(names, frames))]
        path = tmp_path / f"kin-{i}.parquet"
        pq.write_table(pa.table({
            "name": names, "n_frames": pa.array(frames, type=pa.int32()),
            "kinematics": pa.array([rng.normal(j, 2, size=n * 76).astype(np.float32)
                                    for j, n in enumerate(frames)],
                                   type=pa.list_(pa.float32()))}), path)
        paths.append(str(path))
    chosen = [t for t in trials if t.name not in ("s0t2", "s1t4")]
    tables = local_tables(paths, TRIAL_COLUMNS, 64)
    held = TrialRows(dataset_from_tables(tables, shuffle_files=True), tables)
    streamed = TrialRows(stream_shards(paths, TRIAL_COLUMNS, shuffle_files=True), None)

    def rows_of(ds) -> list[tuple]:
        return sorted((int(r["trial_idx"]), int(r["window_idx"]), int(r["y"]),
                       np.asarray(r["x"], dtype=np.float32).tobytes()) for r in ds.take_all())

    stats = table_channel_stats(tables, {t.name for t in chosen})
    for normalize, st in (("train", stats), ("recording", None)):
        cfg = SkillConfig(window=10, step=4, normalize=normalize)
        here, tasks = rows_of(window_dataset(held, chosen, cfg, st)), \
            rows_of(window_dataset(streamed, chosen, cfg, st))
        assert len(here) == sum((t.n_frames - 10) // 4 + 1 for t in chosen)
        assert here == tasks
    # Windows larger than materialize_mb go through the tasks, as before.
    big = SkillConfig(window=10, step=4, materialize_mb=0)
    assert rows_of(window_dataset(held, chosen, big, stats)) == \
        rows_of(window_dataset(streamed, chosen, big, stats))


def test_small_epochs_run_without_ray_datas_allocator(ray_cluster, shard_files: list[str]
                                                     ) -> None:
    """A dataset whose epoch fits in a quarter of the object store runs without Ray
    Data's resource allocator (its first second of each execution runs one task at a
    time: runtime.datasets); a large one, or one whose context caps Ray Data's CPUs,
    keeps it. Ray must still build no allocator when the flag is off (Ray calls it a
    kill switch to be removed; then the setting would silently do nothing)."""
    import ray
    import ray.data
    from ray.data._internal.execution import create_resource_allocator

    from raylab.runtime.datasets import SMALL_EPOCH_STORE_SHARE, without_allocator_if_small

    store = ray.cluster_resources()["object_store_memory"]
    small = without_allocator_if_small(ray.data.range(8), 1 << 20)
    assert small.context.op_resource_reservation_enabled is False
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled is True
    large = without_allocator_if_small(ray.data.range(8),
                                       2 * SMALL_EPOCH_STORE_SHARE * store)
    assert large.context.op_resource_reservation_enabled is True
    capped = ray.data.range(8)
    capped.context.execution_options.resource_limits = (
        capped.context.execution_options.resource_limits.copy(cpu=1))
    assert without_allocator_if_small(capped, 1 << 20).context \
        .op_resource_reservation_enabled is True
    assert create_resource_allocator(None, small.context) is None
    # Counted from local shard files (rows from their footers, plus their bytes); remote
    # ones keep the allocator.
    from raylab.runtime.datasets import without_allocator_if_small_files

    local = without_allocator_if_small_files(ray.data.range(8), shard_files, 1 << 10)
    assert local.context.op_resource_reservation_enabled is False
    huge = without_allocator_if_small_files(ray.data.range(8), shard_files, store)
    assert huge.context.op_resource_reservation_enabled is True
    remote = without_allocator_if_small_files(ray.data.range(8), ["s3://b/x.parquet"], 1)
    assert remote.context.op_resource_reservation_enabled is True
    doubled = small.map(lambda r: {"id": r["id"] * 2}).take_all()
    assert sorted(r["id"] for r in doubled) == [2 * i for i in range(8)]
