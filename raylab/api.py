"""raylab from Python (a notebook, a script): train, tune, resume and analyze.

The ``raylab`` command line is a thin layer over these functions, so both take the same
values, print the same progress and fail the same way: a :class:`~raylab.errors.RaylabError`
naming the file, key or flag and what was expected (the CLI prints it as one line).

    import raylab

    run = raylab.train("skill", data="shards/jigsaws", overrides={"optim.epochs": 5})
    run.summary["test_accuracy"], run.models, run.report, run.tensorboard

    grid = raylab.tune("skill", data="shards/jigsaws",
                       space={"window": [30, 60, 90], "optim.lr": "log(1e-4, 1e-2)"},
                       trials=8)
    grid.get_best_result().metrics
    raylab.analyze(grid.experiment_path)["best_config"]

Ray starts on the first call (a local cluster, or the one at ``address`` /
``RAY_ADDRESS``) and stays up for the next ones in the same process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raylab import config as cfglib
from raylab.errors import ConfigError, RaylabError
from raylab.runtime.options import RunOptions, local_path, parse_cpus, parse_workers

#: A config given as a YAML file or as a mapping of config values.
ConfigLike = str | os.PathLike | dict[str, Any] | None
#: Overrides as ``{"optim.lr": 1e-3}`` (values as Python data) or ``["optim.lr=1e-3"]``
#: (the CLI's ``--set`` text, values parsed as YAML).
Overrides = dict[str, Any] | list[str] | None


@dataclass(frozen=True)
class RunResult:
    """What :func:`train` made.

    Attributes:
        method: The registered method.
        experiment: The experiment's folder (a URI on remote storage): ``summary.json``,
            ``config.yaml``, the report and plots, and one folder per run.
        summary: ``summary.json``: the test metrics and what the method reports.
        models: Each run's name -> its final model folder, what ``raylab predict``,
            ``export`` and ``assess`` (and a reuse or CLEAR run's ``backbone``) take.
        report: ``report.md`` where the method writes one (local storage), else None.
        tensorboard: The folder to give ``tensorboard --logdir``.
    """

    method: str
    experiment: str
    summary: dict[str, Any]
    models: dict[str, str]
    report: str | None
    tensorboard: str


@dataclass(frozen=True)
class TuneRun:
    """A finished (or interrupted) search: what :func:`tune` and ``raylab tune`` share.

    Attributes:
        experiment: The experiment's folder (what :func:`resume` and :func:`analyze` take).
        grid: Tune's ``ResultGrid``.
        unfinished: Trials still to run after an interruption (0 when it completed).
    """

    experiment: str
    grid: Any
    unfinished: int


def method_config(method: str, data: str | os.PathLike | None = None,
                  config: ConfigLike = None, overrides: Overrides = None) -> tuple[Any, Any]:
    """The registered method and its checked config: its defaults, then ``config``, then
    ``overrides``, then ``data`` (the shard folder). Path keys are made absolute: Ray's
    workers do not share this process's working directory."""
    from raylab.registry import get_method

    found = get_method(method)
    if isinstance(config, dict):
        cfg = cfglib.apply_overrides(found.Config(), dict(config))
    elif config is not None and not isinstance(config, str | os.PathLike):
        raise ConfigError(f"config: expected a YAML file or a dict of config values, got "
                          f"{type(config).__name__}")
    else:
        cfg = cfglib.load(found.Config, config)
    if overrides:
        if not isinstance(overrides, dict | list):
            raise ConfigError(f"overrides: expected a dict {{key: value}} or a list of "
                              f"'KEY=VALUE', got {type(overrides).__name__}")
        cfg = cfglib.apply_overrides(cfg, overrides)
    if data is not None:
        cfg = cfglib.apply_overrides(cfg, {"data": _absolute(os.fspath(data))})
    # Other path keys may also take a name (MiniViT's teacher: a folder or a timm model):
    # those are made absolute only when they name something on this machine.
    paths = {key: _absolute(value) for key in found.path_keys
             if (value := getattr(cfg, key, None))
             and (key == "data" or "://" in value or Path(value).expanduser().exists())}
    if paths:
        cfg = cfglib.apply_overrides(cfg, paths)
    return found, cfg


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_options(method: str, *, workers: int | str = 1, cpus_per_worker: float | str = "auto",
                gpus_per_worker: float = 0.0, storage: str | os.PathLike = "runs",
                name: str = "", max_failures: int = 0, address: str | None = None,
                tuning: bool = False) -> tuple[RunOptions, str]:
    """The checked run options and the experiment name (default METHOD-TIMESTAMP); the
    storage is resolved later, once the config and the data are known good."""
    first, most = parse_workers(str(workers))
    joins = bool(address or os.environ.get("RAY_ADDRESS"))
    cpus = parse_cpus(cpus_per_worker, max(first, most), joins, tuning=tuning)
    options = RunOptions(workers=first, max_workers=most, cpus_per_worker=cpus,
                         gpus_per_worker=float(gpus_per_worker), storage=os.fspath(storage),
                         name=name, max_failures=int(max_failures))
    options.validate()
    return options, options.name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(method: str, data: str | os.PathLike | None = None, config: ConfigLike = None,
          overrides: Overrides = None, *, workers: int | str = 1,
          cpus_per_worker: float | str = "auto", gpus_per_worker: float = 0.0,
          storage: str | os.PathLike = "runs", name: str = "", max_failures: int = 0,
          address: str | None = None, verbose: bool = False) -> RunResult:
    """Train and evaluate ``method`` as ``raylab train`` does.

    Args:
        method: A registered method (``raylab methods``).
        data: The shard folder (same as ``overrides={"data": ...}``).
        config: A YAML file or a dict of config values (nested or dotted keys).
        overrides: Config values laid over ``config``.
        workers: Data-parallel Train workers, ``"MIN-MAX"`` for an elastic run, 0 to run
            in this process.
        cpus_per_worker: A number, or ``"auto"`` (see ``raylab train --help``).
        gpus_per_worker: GPUs per worker.
        storage: A local folder or an ``s3://`` / ``gs://`` URI.
        name: The experiment's folder name under ``storage``.
        max_failures: Worker failures to recover from via the last checkpoint.
        address: A Ray cluster to join (default ``RAY_ADDRESS``, else a local one).
        verbose: Also show Ray's own log lines.

    Raises:
        RaylabError: Bad config, data or options (before Ray starts), or a failed run.
    """
    from raylab.runtime.cluster import ensure_ray

    found, cfg = method_config(method, data, config, overrides)
    options, name = run_options(found.name, workers=workers, cpus_per_worker=cpus_per_worker,
                                gpus_per_worker=gpus_per_worker, storage=storage, name=name,
                                max_failures=max_failures, address=address)
    loaded = found.check(cfg, options)
    options.storage = options.resolved_storage()
    ensure_ray(address, verbose=verbose)
    print(f"raylab train {found.name}: experiment {name} in {options.storage}", flush=True)
    summary, results = found.run_experiment(cfg, options, options.storage, name, data=loaded)
    experiment = f"{options.storage.rstrip('/')}/{name}"
    folder = local_path(options.storage, name)
    report = None if folder is None else folder / "report.md"
    return RunResult(method=found.name, experiment=experiment, summary=summary,
                     models={r.plan.name: str(r.checkpoint) for r in results if r.checkpoint},
                     report=str(report) if report is not None and report.is_file() else None,
                     tensorboard=experiment)


def _space_text(key: str, spec: Any) -> str:
    """A search dimension given as Python data -> the ``--space`` text it means: a list is
    a choice, a 2-tuple a range, text is read as ``--space`` text, anything else fixed."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ConfigError(f"space {key}: a range is a (low, high) tuple, got {spec!r}")
        return f"({json.dumps(spec[0])}, {json.dumps(spec[1])})"
    try:
        return json.dumps(spec)
    except TypeError:
        raise ConfigError(f"space {key}: expected a list (choice), a (low, high) tuple, "
                          f"'log(low, high)' or a value, got {spec!r}") from None


def tune_search(method: str, data: str | os.PathLike | None = None, config: ConfigLike = None,
                overrides: Overrides = None, *, space: dict[str, Any] | list[str] | None = None,
                trials: int = 8, grace_period: int = 2, workers: int | str = 1,
                cpus_per_worker: float | str = "auto", gpus_per_worker: float = 0.0,
                storage: str | os.PathLike = "runs", name: str = "", max_failures: int = 0,
                address: str | None = None, verbose: bool = False) -> TuneRun:
    """:func:`tune`, returning the experiment folder and what is left to run as well."""
    from raylab.runtime import tuner
    from raylab.runtime.cluster import ensure_ray
    from raylab.runtime.search_space import parse_space

    for arg, value in (("trials", trials), ("grace_period", grace_period)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{arg.replace('_', '-')}: expected an integer >= 1, "
                              f"got {value!r}")
    found, cfg = method_config(method, data, config, overrides)
    if isinstance(space, dict):
        space = {key: _space_text(key, spec) for key, spec in space.items()}
    dimensions = parse_space(found.Config, space or dict(found.default_space))
    options, name = run_options(found.name, workers=workers, cpus_per_worker=cpus_per_worker,
                                gpus_per_worker=gpus_per_worker, storage=storage, name=name,
                                max_failures=max_failures, address=address, tuning=True)
    loaded = found.check(cfg, options, tune=True)
    options.storage = options.resolved_storage()
    ensure_ray(address, verbose=verbose)
    loaded = found.prepare(cfg, loaded, options)  # e.g. features every trial reuses
    print(f"raylab tune {found.name}: {trials} trials, experiment {name} "
          f"in {options.storage}", flush=True)
    spec, grid = tuner.run_search(found, cfg, options, dimensions, trials, options.storage,
                                  name, grace_period=grace_period,
                                  max_epochs=found.max_epochs(cfg, loaded))
    return TuneRun(f"{options.storage.rstrip('/')}/{name}", grid, spec["unfinished"])


def tune(method: str, data: str | os.PathLike | None = None, config: ConfigLike = None,
         overrides: Overrides = None, *, space: dict[str, Any] | list[str] | None = None,
         trials: int = 8, grace_period: int = 2, **run: Any) -> Any:
    """Search ``method``'s knobs as ``raylab tune`` does (OptunaSearch + ASHA, one Train
    run per trial, scored on validation rows held out of the training data).

    Args:
        space: Config key -> a list (choice), a ``(low, high)`` tuple (uniform; integers
            for an integer key) or ``--space`` text such as ``"log(1e-4, 1e-2)"``; default:
            the method's own space.
        trials: Trials to run.
        grace_period: Epochs before ASHA may stop a trial.
        run: ``workers``, ``storage``, ``name``, ... as for :func:`train`.

    Returns:
        Tune's ``ray.tune.ResultGrid`` (``grid.experiment_path`` is the experiment folder
        :func:`analyze` and :func:`resume` take).

    Raises:
        RaylabError: Bad config, space, data or options, or every trial failed.
    """
    return tune_search(method, data, config, overrides, space=space, trials=trials,
                       grace_period=grace_period, **run).grid


def resume_search(experiment: str | os.PathLike, *, address: str | None = None,
                  verbose: bool = False) -> TuneRun:
    """:func:`resume`, returning what is left to run as well."""
    from raylab.data import fs
    from raylab.runtime import tuner
    from raylab.runtime.cluster import ensure_ray

    folder = (os.fspath(experiment).rstrip("/") if fs.is_uri(experiment)
              else str(Path(experiment).resolve()))
    tuner.load_spec(folder)  # fails early, before Ray starts, if it is not one
    ensure_ray(address, verbose=verbose)
    print(f"resuming Tune experiment {folder}", flush=True)
    spec, grid = tuner.resume_search(folder)
    return TuneRun(folder, grid, spec["unfinished"])


def resume(experiment: str | os.PathLike, *, address: str | None = None,
           verbose: bool = False) -> Any:
    """Continue an interrupted search: finished trials are kept, the rest run. Returns
    Tune's ``ResultGrid`` of all the trials."""
    return resume_search(experiment, address=address, verbose=verbose).grid


def analyze(experiment: str | os.PathLike) -> dict[str, Any]:
    """A search's table as data, its report and plots written under
    ``<experiment>/analysis``: ``rows`` (one per trial), ``best``, ``best_config``,
    ``metric``, ``knobs`` and ``report`` (the ``report.md`` path)."""
    from raylab.data import fs
    from raylab.runtime.analysis import collect, write_report

    result = collect(experiment)
    return {**result, "report": fs.join(write_report(result), "report.md")}


__all__ = ["RaylabError", "RunResult", "TuneRun", "analyze", "method_config", "resume",
           "resume_search", "run_options", "train", "tune", "tune_search"]
