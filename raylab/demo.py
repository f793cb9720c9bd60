"""`raylab demo`: the whole path on a laptop with nothing but this repository.

A synthetic JIGSAWS-format sample -> Parquet shards -> a Ray Tune search (OptunaSearch +
ASHA) over the skill model's window width on a local Ray cluster -> table, report,
TensorBoard logs and the best checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from raylab import config as cfglib
from raylab.data import jigsaws
from raylab.data.shards import read_manifest
from raylab.errors import DataError
from raylab.methods.skill import SkillConfig, SkillMethod
from raylab.runtime import tuner
from raylab.runtime.analysis import collect, format_table, write_report
from raylab.runtime.cluster import ensure_ray
from raylab.runtime.options import RunOptions
from raylab.runtime.search_space import parse_space


def prepare_sample(out: Path) -> Path:
    """Sample and shards under ``out``; reused when a valid shard folder is already there."""
    shards = out / "shards"
    try:
        read_manifest(shards, expected_format="jigsaws")
        print(f"[1/3] reusing the sample shards in {shards}")
        return shards
    except DataError:
        pass
    raw = out / "sample_raw"
    if not raw.exists():
        jigsaws.write_sample(raw, seed=0)
    summary = jigsaws.convert_jigsaws(raw, shards, overwrite=True)
    print(f"[1/3] wrote a synthetic JIGSAWS-format sample to {raw} and converted "
          f"{summary['rows']} trials to {shards}")
    return shards


def run_demo(out: Path, trials: int = 4) -> None:
    start = time.perf_counter()
    out = out.resolve()
    shards = prepare_sample(out)
    cfg = cfglib.apply_overrides(SkillConfig(), {
        "data": str(shards), "task": "Suturing", "cv": "loso", "optim.epochs": 10, "step": 10,
        "checkpoint_every": 2,
    })
    options = RunOptions(workers=1, storage=str(out / "runs"))
    storage = options.resolved_storage()
    name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    space = parse_space(SkillConfig, ["window=[30, 60, 90]"])
    print(f"[2/3] Ray Tune: {trials} trials over window in [30, 60, 90] "
          f"(OptunaSearch + ASHA, 1 Train worker per trial) ...", flush=True)
    ensure_ray()
    tuner.run_search(SkillMethod(), cfg, options, space, trials, storage, name,
                     grace_period=2)
    result = collect(Path(storage) / name)
    report = write_report(result)
    print("[3/3] results\n")
    print(format_table(result))
    best = result["best"]
    if best is not None:
        print(f"\nbest: window={best['window']} with {result['metric']} = "
              f"{best[result['metric']]:.3f}")
        print(f"best checkpoint: {best['checkpoint']}")
    print(f"report:      {report / 'report.md'}")
    print(f"plots:       {report}")
    print(f"TensorBoard: tensorboard --logdir {Path(storage) / name}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
