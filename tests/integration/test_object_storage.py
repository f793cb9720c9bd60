"""Shard sets in an S3-compatible store, through the real S3 API: a moto server on
127.0.0.1, reached as a user reaches MinIO or Ceph (``AWS_ENDPOINT_URL``, credentials
from the environment). Convert writes there with the manifest published last, inspect
and the driver-side reads go through pyarrow's file system, Ray Data reads the shards
directly, and a missing bucket, bad credentials or a deleted shard each end in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylab.cli import main
from raylab.errors import DataError

BUCKET = "raylab-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A fresh bucket; the standard variables point every S3 client here."""
    import boto3

    for key, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _keys(prefix: str) -> list[str]:
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_convert_publishes_the_manifest_last_and_inspect_reads_it(
        s3: str, tmp_path: Path, capsys) -> None:
    from raylab.data.jigsaws import write_sample
    from raylab.data.shards import read_manifest

    raw = write_sample(tmp_path / "raw", tasks=("Suturing",), subjects="BD", trials=(1, 2),
                       frames=(100, 120))
    assert main(["data", "convert", "jigsaws", str(raw), f"{s3}/jig"]) == 0
    assert main(["data", "convert", "jigsaws", str(raw), str(tmp_path / "local")]) == 0
    capsys.readouterr()
    manifest = read_manifest(f"{s3}/jig", expected_format="jigsaws")
    local = read_manifest(tmp_path / "local")
    assert (manifest["rows"], manifest["schema"]) == (local["rows"], local["schema"]) > (0,)
    assert _keys("jig/") == sorted(["jig/manifest.json"]
                                   + [f"jig/{s['file']}" for s in manifest["shards"]])
    assert main(["data", "inspect", f"{s3}/jig", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == local["rows"]

    # A second convert needs --overwrite; with it, stale shards go and the set is whole.
    assert main(["data", "convert", "jigsaws", str(raw), f"{s3}/jig"]) == 2
    assert "already holds files" in capsys.readouterr().err
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key="jig/part-09999.parquet", Body=b"old")
    assert main(["data", "convert", "jigsaws", str(raw), f"{s3}/jig", "--overwrite"]) == 0
    assert "jig/part-09999.parquet" not in _keys("jig/")
    assert read_manifest(f"{s3}/jig")["rows"] == local["rows"]

    # A listed shard that is gone, then one that is damaged: each named, in one line.
    first = f"jig/{manifest['shards'][0]['file']}"
    client = boto3.client("s3")
    body = client.get_object(Bucket=BUCKET, Key=first)["Body"].read()
    client.delete_object(Bucket=BUCKET, Key=first)
    with pytest.raises(DataError, match=r"part-00000.parquet: shard listed in manifest.json "
                                        r"is missing"):
        read_manifest(f"{s3}/jig")
    client.put_object(Bucket=BUCKET, Key=first, Body=body[: len(body) // 2])
    with pytest.raises(DataError, match=r"part-00000.parquet: unreadable Parquet footer"):
        read_manifest(f"{s3}/jig")


def test_image_shards_in_the_store_keep_their_uris(s3: str, tmp_path: Path, capsys) -> None:
    """An imagefolder set converted to the store: every split's shard list, the training
    data a method loads and `data inspect` name store URIs, never a local path made of
    one (``/cwd/s3:/bucket/...``, a bug found by measuring ingest from the store)."""
    from raylab import config as cfglib
    from raylab.data.imagefolder import split_paths, write_image_sample
    from raylab.methods.convnext import ConvNeXtConfig
    from raylab.tasks.classification.data import load_image_data

    src = write_image_sample(tmp_path / "img", classes=2, train_per_class=4,
                             test_per_class=2)
    assert main(["data", "convert", "imagefolder", str(src), f"{s3}/img"]) == 0
    paths = split_paths(f"{s3}/img", "train")
    assert paths and all(p.startswith(f"{s3}/img/") for p in paths), paths
    data = load_image_data(cfglib.apply_overrides(ConvNeXtConfig(), {
        "data": f"{s3}/img", "optim.batch_size": 4}))
    assert data.train_paths == paths and data.train_rows == 8
    assert all(p.startswith(f"{s3}/img/") for p in data.eval_paths)
    capsys.readouterr()
    assert main(["data", "inspect", f"{s3}/img", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == f"{s3}/img"


def test_detection_splits_in_the_store(s3: str, detection_shards: Path) -> None:
    """A detection data folder (one coco shard set per split) uploaded to the store: the
    splits are found and read through it, and a missing split is one error naming the
    splits that are there."""
    from raylab import config as cfglib
    from raylab.data import fs
    from raylab.errors import DataError
    from raylab.tasks.detection.config import DetectionConfig
    from raylab.tasks.detection.data import load_detection_data

    fs.upload_tree(detection_shards, f"{s3}/det")
    local = load_detection_data(cfglib.apply_overrides(DetectionConfig(), {
        "data": str(detection_shards)}))
    remote = load_detection_data(cfglib.apply_overrides(DetectionConfig(), {
        "data": f"{s3}/det"}))
    assert (remote.train_rows, remote.eval_rows) == (local.train_rows, local.eval_rows)
    assert remote.train_counts == local.train_counts  # every training row read
    assert all(p.startswith(f"{s3}/det/") for p in remote.train_paths + remote.eval_paths)
    splits = sorted(p.name for p in detection_shards.iterdir() if p.is_dir())
    with pytest.raises(DataError, match=rf"no coco shard folder for split 'test2017'.*found "
                                        rf"{re.escape(str(splits))}"):
        load_detection_data(cfglib.apply_overrides(DetectionConfig(), {
            "data": f"{s3}/det", "eval_split": "test2017"}))


def test_a_failed_convert_publishes_nothing(s3: str, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["data", "convert", "jigsaws", str(tmp_path / "empty"), f"{s3}/bad"]) == 2
    capsys.readouterr()
    assert _keys("bad/") == []


@pytest.mark.parametrize("where, expected", [
    ("s3://no-such-bucket/jig", "no such bucket"),
    ("{s3}/nothing-here", "shard folder not found"),
])
def test_bad_store_locations_are_one_line(s3: str, capsys, where, expected) -> None:
    location = where.format(s3=s3)
    assert main(["data", "inspect", location]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raylab: error: {location}: ") and err.count("\n") == 1, err
    assert expected in err
    assert "testing" not in err  # no credential in any message


@pytest.mark.parametrize("storage, endpoint, expected", [
    ("s3://no-such-bucket/runs", None, "no such bucket 'no-such-bucket'"),
    ("{s3}/runs", "http://127.0.0.1:{closed}", "Could not connect"),
])
def test_bad_storage_fails_before_ray_starts(s3: str, tiny_jigsaws_shards: Path, capsys,
                                             monkeypatch, storage, endpoint,
                                             expected) -> None:
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.format(closed=_free_port()))
    where = storage.format(s3=s3)
    assert main(["train", "skill", "--data", str(tiny_jigsaws_shards),
                 "--storage", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raylab: error: --storage {where}: ") and expected in err, err
    assert "testing" not in err  # no credential in any message


def _wait_for(predicate, timeout: float, proc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"raylab tune exited early with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the search to progress")
        time.sleep(0.5)


def _text(key: str) -> str:
    import boto3

    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


#: Epochs per trial of the interrupted search: a trial's epoch takes ~0.5 s, and SIGINT
#: must reach Tune while the second trial still runs (with 2 epochs the trial finished
#: first on a busy CI machine, and once with 6); the grace period equals it, so ASHA stops
#: no trial early.
EPOCHS = 12


def test_interrupted_search_in_the_store_resumes_without_rerunning(
        s3: str, sample_shards: Path, tmp_path: Path) -> None:
    """`raylab tune --storage s3://...`, SIGINT while the second (last) trial runs, then
    `raylab tune --resume s3://...` finishes it and keeps the first, and `raylab analyze
    s3://...` reports both: every file in the bucket.

    Beside it runs `raylab train --data s3://... --storage s3://...`, whose driver checks,
    Ray Data reads, checkpoints, final model, metrics and report all use the bucket:
    two commands on one machine, each with its own local cluster. The search's second
    trial can only start once Train has released the first one's CPUs, which takes the
    State API of the right cluster (it hung before, README "Several commands on one
    machine").
    """
    from raylab.data.jigsaws import write_sample

    raw = write_sample(tmp_path / "raw", tasks=("Suturing",), subjects="BD", trials=(1, 2),
                       frames=(100, 120))
    assert main(["data", "convert", "jigsaws", str(raw), f"{s3}/jig"]) == 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    log = (tmp_path / "tune.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylab", "tune", "skill", "--data", str(sample_shards),
         "--set", f"optim.epochs={EPOCHS}", "--set", "step=10", "--space",
         "window=[30,60]", "--trials", "2", "--grace-period", str(EPOCHS), "--storage",
         f"{s3}/store", "--name",
         "exp"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    beside_log = (tmp_path / "beside.log").open("w")
    beside = subprocess.Popen(
        [sys.executable, "-m", "raylab", "train", "skill", "--data", f"{s3}/jig",
         "--set", "optim.epochs=1", "--set", "cv=holdout", "--workers", "1",
         "--storage", f"{s3}/runs", "--name", "r"],
        stdout=beside_log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    runs = "store/exp/train_runs/"

    def histories() -> dict[str, str]:
        return {k: _text(k) for k in _keys(runs) if k.endswith("/metrics.jsonl")}

    def finished(texts: dict[str, str]) -> list[str]:
        return [k for k, text in texts.items() if f'"epoch": {EPOCHS}' in text]

    def second_trial_running() -> bool:
        texts = histories()
        return len(finished(texts)) == 1 and sum(bool(t) for t in texts.values()) == 2

    _wait_for(second_trial_running, 240, proc)
    texts = histories()
    first = finished(texts)[0]
    interrupted = next(k for k in texts if k != first)
    logged_before = len(texts[interrupted].splitlines())
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "tune.log").read_text()[-2000:]
    exit_s = time.monotonic() - t0
    assert f"raylab tune --resume {s3}/store/exp" in (tmp_path / "tune.log").read_text()

    # Resumed as a user would: a new command (its cluster inherits the endpoint).
    t0 = time.monotonic()
    resumed = subprocess.run(
        [sys.executable, "-m", "raylab", "tune", "--resume", f"{s3}/store/exp"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    epochs = [json.loads(x)["epoch"] for x in _text(interrupted).splitlines()]
    # Time lost (BENCHMARKS.md): the epochs the interrupted trial logged and ran again
    # (those after its last checkpoint), plus the driver's exit and the resume's start-up.
    print(f"\ninterrupted search (s3): driver exited {exit_s:.1f} s after SIGINT; resume "
          f"ran {time.monotonic() - t0:.1f} s for the rest; the interrupted trial had "
          f"logged {logged_before} epoch(s), repeated {len(epochs) - len(set(epochs))}")
    assert _text(first) == texts[first]  # the finished trial was not run again
    assert main(["analyze", f"{s3}/store/exp", "--json"]) == 0
    report = json.loads(_text("store/exp/analysis/analysis.json"))
    assert len(report["rows"]) == 2
    assert all(r["epochs"] == EPOCHS for r in report["rows"])
    checkpoints = [r["checkpoint"] for r in report["rows"] if r["checkpoint"]]
    assert checkpoints and all(c.startswith(f"{s3}/store/exp/train_runs/")
                               for c in checkpoints), checkpoints
    assert "store/exp/analysis/report.md" in _keys("store/exp/analysis/")
    assert not list(tmp_path.rglob("raylab_tune.json"))  # nothing went to the local disk
    assert beside.wait(timeout=300) == 0, (tmp_path / "beside.log").read_text()[-2000:]
    assert f"results: {s3}/runs/r" in (tmp_path / "beside.log").read_text()
    keys = _keys("runs/r/")
    for name in ("summary.json", "config.yaml", "report.md", "holdout/model/state.pt",
                 "holdout/metrics.jsonl"):
        assert f"runs/r/{name}" in keys, keys
    assert any(k.endswith("/state.pt") and "checkpoint_" in k for k in keys)
    assert any(k.startswith("runs/r/holdout/tensorboard/events.out.tfevents") for k in keys)
    assert 0.0 <= json.loads(_text("runs/r/summary.json"))["mean_accuracy"] <= 1.0
    assert not list(tmp_path.rglob("summary.json"))  # nothing went to the local disk


def test_wrong_credentials_are_one_line_without_the_key(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    """A store that checks credentials (moto's server with its IAM auth on, in its own
    process) refuses a made-up key: one line naming the location and the credentials,
    never the key itself, for --data and for --storage, before Ray starts."""
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the moto server did not start"
                time.sleep(0.2)
        for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                           "AWS_ACCESS_KEY_ID": "AKIAMADEUPKEY", "AWS_SECRET_ACCESS_KEY":
                           "made-up-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        assert main(["data", "inspect", "s3://locked/shards"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("raylab: error: s3://locked/shards: ") and \
            "access denied: check the credentials" in err and err.count("\n") == 1, err
        assert "made-up-secret" not in err and "AKIAMADEUPKEY" not in err
        # train checks its (local) data first, then the storage, before Ray starts
        from raylab.data.jigsaws import convert_jigsaws, write_sample

        raw = write_sample(tmp_path / "raw", tasks=("Suturing",), subjects="BD",
                           trials=(1, 2), frames=(100, 120))
        convert_jigsaws(raw, tmp_path / "shards")
        assert main(["train", "skill", "--data", str(tmp_path / "shards"), "--storage",
                     "s3://locked/runs"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("raylab: error: --storage s3://locked/runs: ") and \
            "access denied: check the credentials" in err, err
        assert "made-up-secret" not in err and "AKIAMADEUPKEY" not in err
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_clear_state_in_the_store_and_a_shard_deleted_mid_run(
        s3: str, tiny_clear_stream: Path, tmp_path: Path) -> None:
    """Two commands at once, each with its own local cluster:

    - `raylab train clear --storage s3://...`: the stream actor keeps its state
      (`stream_state.json`, R filled bucket by bucket) in the bucket, the summary and
      report go there, nothing to the local disk;
    - `raylab train skill --data s3://...` streaming its shard every epoch, whose shard is
      deleted from the bucket after the first epoch: one line naming the shard's URI and
      where the run's checkpoints stay, exit 2, and every checkpoint kept is whole.
    """
    import boto3

    from raylab.data.jigsaws import write_sample
    from raylab.engine.checkpoint import load_checkpoint

    raw = write_sample(tmp_path / "raw", tasks=("Suturing",), subjects="BD", trials=(1, 2),
                       frames=(100, 120))
    assert main(["data", "convert", "jigsaws", str(raw), f"{s3}/jig"]) == 0
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    clear = subprocess.Popen(
        [sys.executable, "-m", "raylab", "train", "clear", "--data", str(tiny_clear_stream),
         "--set", "model=test_resnet", "--set", "input_size=16", "--set", "optim.epochs=1",
         "--set", "optim.batch_size=8", "--workers", "1", "--storage", f"{s3}/clr",
         "--name", "c"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env, cwd=tmp_path)
    skill = subprocess.Popen(
        [sys.executable, "-m", "raylab", "train", "skill", "--data", f"{s3}/jig",
         "--set", "optim.epochs=6", "--set", "cv=holdout", "--set", "materialize_mb=0",
         "--set", "cache_mb=0", "--set", "checkpoint_every=1", "--workers", "1",
         "--storage", f"{s3}/runs", "--name", "del"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    client = boto3.client("s3")
    shard = next(k for k in _keys("jig/") if k.endswith(".parquet"))

    def first_epoch_logged() -> bool:
        return "runs/del/holdout/metrics.jsonl" in _keys("runs/del/holdout/") and bool(
            _text("runs/del/holdout/metrics.jsonl").strip())

    _wait_for(first_epoch_logged, 240, skill)
    client.delete_object(Bucket=BUCKET, Key=shard)
    out, err = skill.communicate(timeout=300)
    assert skill.returncode == 2, out[-2000:] + err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("raylab: error: ")][-1]
    assert line.startswith(f"raylab: error: {s3}/{shard}: shard could not be read (the file "
                           f"is missing); checkpoints and metrics written so far are kept in "
                           f"{s3}/runs/del/holdout"), line
    epochs = [json.loads(x)["epoch"] for x in _text("runs/del/holdout/metrics.jsonl")
              .splitlines()]
    assert epochs[0] == 1 and epochs[-1] < 6, epochs
    kept = [k for k in _keys("runs/del/holdout/") if k.endswith("/state.pt")
            and "checkpoint_" in k]
    assert kept
    for i, key in enumerate(kept):  # each whole: it loads
        folder = tmp_path / "kept" / str(i)
        folder.mkdir(parents=True)
        client.download_file(BUCKET, key, str(folder / "state.pt"))
        assert load_checkpoint(folder)["epoch"] < 6

    out, _ = clear.communicate(timeout=300)
    assert clear.returncode == 0, out[-3000:]
    state = json.loads(_text("clr/c/run/stream_state.json"))
    assert state["finished"] == [1, 2, 3, 4] and state["cursor"] == 4
    summary = json.loads(_text("clr/c/summary.json"))
    assert all(v is not None for row in summary["matrix"] for v in row)
    assert "clr/c/report.md" in _keys("clr/c/")
    assert not list(tmp_path.rglob("stream_state.json"))  # nothing on the local disk
