"""Ray Tune over Ray Train: OptunaSearch + ASHA, one TorchTrainer per trial, resumable.

Each trial is a function that applies its sampled overrides to the base config and asks
the method to fit a TorchTrainer with ``TuneReportCallback`` (Train V2 cannot be passed
to ``Tuner`` directly). Everything needed to rebuild that function is saved as
``raylab_tune.json`` in the experiment folder, which is what ``--resume`` and
``raylab analyze`` read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raylab import config as cfglib
from raylab.data import fs
from raylab.errors import ConfigError, DataError, RaylabError
from raylab.registry import get_method
from raylab.runtime.cluster import check_request, cluster_resources, quiet_ray_data
from raylab.runtime.options import RunOptions
from raylab.runtime.search_space import Dimension

SPEC_FILE = "raylab_tune.json"


class TrialFailed(RaylabError):
    """Every trial of a search failed."""


def make_trainable(method_name: str, base_config: dict[str, Any], options: dict[str, Any],
                   train_storage: str) -> Any:
    """The Tune function for one trial (closes over plain data only)."""

    def trial(overrides: dict[str, Any]) -> None:
        quiet_ray_data()
        method = get_method(method_name)
        cfg = cfglib.apply_overrides(cfglib.from_dict(method.Config, base_config), overrides)
        run_opts = RunOptions(**options)
        trial_id = tune.get_context().get_trial_id()
        method.tune_trial(cfg, run_opts, train_storage, trial_id, [TuneReportCallback()])

    return trial


def concurrency_cap(options: RunOptions, resources: dict[str, float]) -> int:
    """How many trials fit at once: Tune cannot see the Train workers' resources.

    Each trial needs its workers plus one CPU for its Ray Data input tasks; without that
    CPU, concurrent trials take every slot and their input pipelines wait forever.
    """
    per_trial_cpus = max(options.peak_workers, 1) * options.cpus_per_worker + 1.0
    cap = int(resources.get("CPU", 1) // per_trial_cpus)
    if options.gpus_per_worker:
        gpus = max(options.peak_workers, 1) * options.gpus_per_worker
        cap = min(cap, int(resources.get("GPU", 0) // gpus))
    return max(cap, 1)


def _tuner(spec: dict[str, Any], storage: str, restore: bool) -> Any:
    experiment = spec["experiment"]
    trainable = tune.with_resources(
        make_trainable(spec["method"], spec["base_config"], spec["options"],
                       f"{storage.rstrip('/')}/{experiment}/train_runs"),
        {"CPU": 0.01},
    )
    if restore:
        return tune.Tuner.restore(f"{storage.rstrip('/')}/{experiment}", trainable=trainable,
                                  resume_errored=True)
    options = RunOptions(**spec["options"])
    max_t = spec["max_epochs"]
    space = {d["key"]: Dimension(d["key"], d["kind"], tuple(d["values"])).to_tune()
             for d in spec["space"]}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec["metric"],
            mode=spec["mode"],
            search_alg=OptunaSearch(seed=spec["seed"]),
            # Tune's training_iteration restarts at 0 on restore; the loop's own epoch
            # does not, so ASHA's rungs stay right across --resume.
            scheduler=ASHAScheduler(time_attr="epoch", max_t=max_t,
                                    grace_period=max(1, min(max_t, spec["grace_period"])),
                                    reduction_factor=2),
            num_samples=spec["trials"],
            max_concurrent_trials=concurrency_cap(options, cluster_resources()),
        ),
        run_config=tune.RunConfig(name=experiment, storage_path=storage, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def run_search(method: Any, cfg: Any, options: RunOptions, space: list[Dimension],
               trials: int, storage: str, experiment: str, grace_period: int = 2,
               max_epochs: int | None = None) -> tuple[dict[str, Any], Any]:
    """Start a search of ``method`` (a registered Method); returns the spec saved beside
    it (see :func:`resume_search`, with ``unfinished``: trials still to run) and Tune's
    ``ResultGrid``. ``max_epochs``: the runs' length on Tune's time axis
    (default ``method.max_epochs(cfg)``)."""
    if not space:
        raise ConfigError("--space: nothing to search; give at least one KEY=SPEC")
    if options.workers < 1:
        raise ConfigError("--workers: tune needs >= 1 (Tune receives each epoch's metrics "
                          "through a Train callback, which in-process mode does not run)")
    if trials < 1:
        raise ConfigError(f"--trials: expected an integer >= 1, got {trials}")
    check_request(options.workers, options.cpus_per_worker, options.gpus_per_worker)
    spec = {
        "method": method.name,
        "experiment": experiment,
        "storage": storage,
        "base_config": cfglib.to_dict(cfg),
        "options": vars(options).copy(),
        "space": [{"key": d.key, "kind": d.kind, "values": list(d.values)} for d in space],
        "trials": trials,
        "metric": method.metric,
        "mode": method.mode,
        "max_epochs": method.max_epochs(cfg) if max_epochs is None else max_epochs,
        "grace_period": grace_period,
        "seed": getattr(cfg, "seed", 0),
    }
    fs.write_atomic(fs.join(fs.join(storage, experiment), SPEC_FILE),
                    json.dumps(spec, indent=2).encode())
    grid = _tuner(spec, storage, restore=False).fit()
    return _finish(spec, grid)


def load_spec(experiment_dir: str | Path) -> dict[str, Any]:
    """``raylab_tune.json`` of an experiment folder (local or in object storage)."""
    path = fs.join(experiment_dir, SPEC_FILE)
    try:
        found = fs.kind(path) == "file"
    except DataError as exc:
        raise ConfigError(f"{experiment_dir}: {exc.reason}") from None
    if not found:
        raise ConfigError(f"{experiment_dir}: not a raylab tune experiment (no {SPEC_FILE})")
    try:
        return json.loads(fs.read_bytes(path))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})") from None


def resume_search(experiment_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """Continue an interrupted search: finished trials are kept, the rest run. Returns
    what :func:`run_search` does."""
    if fs.is_uri(experiment_dir):
        experiment_dir = os.fspath(experiment_dir).rstrip("/")
        parent = experiment_dir.rsplit("/", 1)[0]
    else:
        experiment_dir = Path(experiment_dir).resolve()
        parent = str(experiment_dir.parent)
    spec = load_spec(experiment_dir)
    grid = _tuner(spec, parent, restore=True).fit()
    return _finish(spec, grid)


def _done_trials(spec: dict[str, Any], grid: Any) -> int:
    """Trials that finished (or failed) for good.

    The in-memory grid of an interrupted search counts the trial that was running at
    SIGINT as terminated; the experiment state Tune saves for ``--resume`` (local or in
    object storage) has it as pending, so that state decides.
    """
    try:
        where = f"{spec['storage'].rstrip('/')}/{spec['experiment']}"
        trials = tune.ExperimentAnalysis(where).trials
        return sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    except Exception:  # noqa: BLE001 - unreadable state: fall back to the grid
        return grid.num_terminated + grid.num_errors


def _finish(spec: dict[str, Any], grid: Any) -> tuple[dict[str, Any], Any]:
    """Fail if every trial failed; say how to resume when the search was interrupted."""
    errors = [r.error for r in grid if r.error is not None]
    if errors and len(errors) == len(grid):
        raise TrialFailed(f"all {len(grid)} trials failed; first error: "
                          f"{str(errors[0]).strip().splitlines()[-1]}")
    # Trials Tune never created (still in the searcher) are missing from the grid.
    spec = dict(spec, unfinished=max(spec["trials"] - _done_trials(spec, grid), 0))
    if spec["unfinished"]:
        where = f"{spec['storage'].rstrip('/')}/{spec['experiment']}"
        print(f"search interrupted with {spec['unfinished']} trial(s) to go; continue with: "
              f"raylab tune --resume {where}", flush=True)
    return spec, grid
