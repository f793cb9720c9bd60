"""What every method provides, and the driver-side flow they all share.

A method is a registered :class:`Method` subclass in its own package
(``raylab/methods/<name>/``): a config class with the paper's recipe as defaults, a
worker-side :class:`~raylab.engine.loop.Task`, and a few driver-side hooks. This module owns
the rest, the same for every method:

- ``check``: read what the runs need from the data (once; ``train`` reuses it) and check
  the global batch against the workers before Ray starts;
- ``train``: the runs the method plans (one, or one per cross-validation fold), each a Ray
  Train run under ``<storage>/<experiment>/<run>``, then the summary, the resolved config
  and the report;
- ``tune_trial``: one run that evaluates on validation rows held out of the training data
  and reports ``val_<metric>`` every epoch; the test rows never reach Tune.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from raylab import config as cfglib
from raylab.data import fs
from raylab.engine.batching import per_worker_batch
from raylab.engine.keys import ROWS, RUN, RUNS, TEST, VAL, metric_key
from raylab.engine.progress import ConsoleProgress, Progress
from raylab.errors import ConfigError, RaylabError
from raylab.runtime.options import RunOptions, local_path


def save_run_record(cfg: Any, summary: dict[str, Any], folder: Path) -> None:
    """The opening of every method's report: the folder, the resolved ``config.yaml`` and
    ``summary.json`` (each written atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, folder / "config.yaml")
    cfglib.atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2))


@dataclass
class RunPlan:
    """One Ray Train run of a method.

    Attributes:
        name: Its folder under the experiment (``run``, a fold name, Tune's trial id).
        split: The split its evaluation reports (``test`` in ``train``, ``val`` in Tune).
        eval_rows: Rows the evaluation must score (each exactly once), when known.
        data: The method's own description of the run (a fold's trials, ...).
    """

    name: str
    split: str
    eval_rows: int | None = None
    data: Any = None


@dataclass
class PlanResult:
    """A finished run: its final metrics, checkpoint and wall time; ``run_dir`` is its
    folder (a local path, or a store URI for remote storage)."""

    plan: RunPlan
    metrics: dict[str, Any]
    checkpoint: str | None
    seconds: float
    run_dir: str | None = None


class EvaluationIncomplete(RaylabError):
    """An evaluation scored another number of rows than its split holds."""


class Method:
    """A method: a config class, a worker-side task and the driver-side hooks.

    Subclasses set the class attributes and implement :meth:`load`, :meth:`inputs` and
    :meth:`summarise` (and :meth:`plan` for more than one run); they wire models, losses,
    transforms and metrics together and do not re-implement them.
    """

    #: The registry name (the package name under ``raylab/methods``).
    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type]
    #: The worker side: ``Task(cfg, run_args, ctx)``.
    Task: ClassVar[type]
    #: The metric that ranks runs, without its split: Tune optimises ``val_<main_metric>``
    #: and the summary reports ``test_<main_metric>``.
    main_metric: ClassVar[str]
    mode: ClassVar[str] = "max"
    #: Default search space: dotted config key -> spec text (see raylab.runtime.tuner).
    default_space: ClassVar[dict[str, str]] = {}
    #: Config keys holding file paths: made absolute before Ray starts (workers do not
    #: share the driver's working directory).
    path_keys: ClassVar[tuple[str, ...]] = ("data",)
    #: Datasets every worker reads whole (e.g. a k-NN bank rank 0 scores); the training
    #: dataset is split evenly, every other one exactly once (possibly unevenly).
    whole_datasets: ClassVar[tuple[str, ...]] = ()

    @property
    def metric(self) -> str:
        """What Tune optimises."""
        return metric_key(VAL, self.main_metric)

    # ------------------------------------------------------------------ the method's part

    def load(self, cfg: Any) -> Any:
        """What the runs need from the data, read on the driver before Ray starts (cheap
        reads only); raises on bad data or a config that does not fit it."""
        raise NotImplementedError

    def prepare(self, cfg: Any, data: Any, options: RunOptions) -> Any:
        """Work on the driver once Ray runs and before the first run (or Tune trial), such
        as a batch-inference job whose output every run reuses; returns ``data`` with what
        it made. The default does nothing."""
        return data

    def plan(self, cfg: Any, data: Any, tune: bool) -> list[RunPlan]:
        """The runs of ``raylab train`` (evaluated on test rows), or with ``tune`` the one
        run of a Tune trial (evaluated on validation rows held out of the training data)."""
        return [RunPlan(VAL if tune else RUN, VAL if tune else TEST)]

    def inputs(self, cfg: Any, data: Any, plan: RunPlan) -> tuple[dict[str, Any],
                                                                   dict[str, Any]]:
        """The run's Ray Datasets (``train`` and one named ``plan.split``, unless the task
        reads its data another way) and the plain data its task needs besides the config
        (``checkpoint_meta``, ...)."""
        raise NotImplementedError

    def eval_row_ids(self, cfg: Any, data: Any, plan: RunPlan) -> set[str]:
        """The identities of the rows ``plan``'s evaluation scores (what keeps Tune's rows
        apart from the test rows, and sets ``plan.eval_rows``); read on the driver."""
        raise NotImplementedError

    def summarise(self, cfg: Any, data: Any, results: list[PlanResult]) -> dict[str, Any]:
        """``summary.json`` from the finished runs."""
        raise NotImplementedError

    def write_report(self, cfg: Any, summary: dict[str, Any], folder: Path) -> None:
        """Plots and ``report.md`` in the experiment folder (may add to ``summary``)."""

    def model_from_meta(self, meta: dict[str, Any]) -> Any:
        """The network of one of this method's runs, random init, from its checkpoint's
        ``meta.json`` alone (the run's weights are loaded next): what ``raylab export``
        rebuilds models with.

        Raises:
            RaylabError: The method's models are not exported.
        """
        raise RaylabError(f"method {self.name!r}: its models cannot be exported (export "
                          "takes convnext, minivit, reuse and detection runs)")

    def describe(self, cfg: Any, options: RunOptions, data: Any) -> None:
        """Print what is about to train (model, recipe) before the first run."""

    def warnings(self, cfg: Any) -> list[str]:
        """Cautions about the config, printed after :meth:`describe` (none by default)."""
        return []

    def after_run(self, cfg: Any, result: PlanResult) -> None:
        """Called on the driver after each run of ``train``."""

    def print_summary(self, summary: dict[str, Any]) -> None:
        """Print the result of :meth:`train` for a person; the default is JSON."""
        print(json.dumps(summary, indent=2, default=str))

    def tune_config(self, cfg: Any) -> Any:
        """The config of a Tune trial (e.g. evaluating every epoch, for ASHA)."""
        return cfg

    def max_epochs(self, cfg: Any, data: Any = None) -> int:
        """The length of a run on Tune's time axis (the reported ``epoch``): ASHA's max_t."""
        return int(cfg.optim.epochs)

    def global_batch(self, cfg: Any) -> tuple[int, int]:
        """(global batch, gradient-accumulation steps) that each worker takes a share of."""
        return int(cfg.optim.batch_size), int(getattr(cfg, "grad_accum", 1))

    # ------------------------------------------------------------------ shared flow

    def check(self, cfg: Any, options: RunOptions | None = None, tune: bool = False) -> Any:
        """Check the config against the data and the workers before Ray starts; returns
        what :meth:`load` read, for :meth:`train` to reuse. With ``tune``, the config must
        hold validation rows out for Tune's metric."""
        if options is not None:
            batch, accum = self.global_batch(cfg)
            per_worker_batch(batch, max(options.peak_workers, 1), accum)
        if tune and getattr(cfg, "val_fraction", None) == 0:
            raise ConfigError("config key 'val_fraction': expected > 0 for raylab tune (Tune "
                              "scores validation rows held out of the training data; the "
                              "test rows never reach it), got 0")
        return self.load(cfg)

    def progress(self, split: str, show_run: bool = False) -> Progress:
        """The console lines of a run evaluated on ``split`` (``show_run``: name the run
        on each line, when an experiment has several)."""
        keys = ["train_loss", metric_key(split, self.main_metric)]
        throughput = self.Task.throughput_key
        return ConsoleProgress(keys, throughput_key=throughput, show_run=show_run,
                               unit="img" if throughput.startswith("img") else "samples")

    def fit(self, cfg: Any, options: RunOptions, data: Any, plans: list[RunPlan],
            storage: str, callbacks: list[Any] | None = None,
            progress: Progress | None = None, services: dict[str, str] | None = None
            ) -> list[PlanResult]:
        """Train ``plans`` in one Ray Train run (one start-up for all of them, e.g. the folds
        of a cross-validation); returns their results.

        The Train run is named after the plan when there is one (``<storage>/run``), else
        :data:`RUNS`; each plan's metrics and final model go to ``<storage>/<plan>/``.
        ``services``: service name -> the name of the actor providing it (see
        :meth:`raylab.engine.context.WorkerContext.service`).
        """
        # Ray only here: method modules import without Ray (raylab.bench.gpu runs on GPU
        # machines without it; `raylab assess` and `raylab clear-table` need none).
        from raylab.runtime.trainer import fit
        from raylab.runtime.worker import train_function

        several = len(plans) > 1
        name = RUNS if several else plans[0].name
        run_dir = local_path(storage, name)
        datasets: dict[str, Any] = {}
        whole: list[str] = []
        runs = []
        for plan in plans:
            run_datasets, args = self.inputs(cfg, data, plan)
            names = {key: f"{plan.name}.{key}" if several else key for key in run_datasets}
            datasets.update({names[key]: ds for key, ds in run_datasets.items()})
            whole += [names[key] for key in self.whole_datasets if key in names]
            runs.append({"name": plan.name, "split": plan.split, "datasets": names,
                         "run_dir": None if run_dir is None else str(run_dir), **args})
        loop_config = {"task": self.Task, "config_class": self.Config,
                       "config": cfglib.to_dict(cfg), "runs": runs, "storage": storage,
                       "services": dict(services or {})}
        t0 = time.perf_counter()
        result = fit(train_function, loop_config, datasets, options, storage=storage,
                     name=name, callbacks=callbacks, whole_datasets=whole, progress=progress)
        finals = result.return_value or {}
        results = []
        for plan in plans:
            final = dict(finals.get(plan.name) or (result.metrics if not several else {}))
            check_eval_rows(plan, final)
            results.append(PlanResult(plan, final, final.get("model"),
                                     float(final.get("seconds", time.perf_counter() - t0)),
                                     fs.join(storage, name)))
        return results

    def train(self, cfg: Any, options: RunOptions, storage: str, experiment: str,
              data: Any = None) -> dict[str, Any]:
        """Train and evaluate as the config says; returns the summary written to disk."""
        return self.run_experiment(cfg, options, storage, experiment, data)[0]

    def run_experiment(self, cfg: Any, options: RunOptions, storage: str, experiment: str,
                       data: Any = None) -> tuple[dict[str, Any], list[PlanResult]]:
        """:meth:`train`, also returning each run's result (its final model's folder)."""
        data = self.load(cfg) if data is None else data
        data = self.prepare(cfg, data, options)
        self.describe(cfg, options, data)
        for warning in self.warnings(cfg):
            print(warning, flush=True)
        plans = self.plan(cfg, data, tune=False)
        results = self.fit(cfg, options, data, plans, f"{storage.rstrip('/')}/{experiment}",
                           progress=self.progress(plans[0].split, show_run=len(plans) > 1))
        for result in results:
            self.after_run(cfg, result)
        summary = self.summarise(cfg, data, results)
        folder = local_path(storage, experiment)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            self.write_report(cfg, summary, folder)
            save_run_record(cfg, summary, folder)
        else:  # remote storage: the same files, made here and uploaded beside the runs
            with tempfile.TemporaryDirectory(prefix="raylab-report-") as tmp:
                self.write_report(cfg, summary, Path(tmp))
                save_run_record(cfg, summary, Path(tmp))
                fs.upload_tree(tmp, f"{storage.rstrip('/')}/{experiment}")
        return summary, results

    def tune_trial(self, cfg: Any, options: RunOptions, storage: str, run_name: str,
                   callbacks: list[Any]) -> None:
        """One Tune trial: a run that reports ``val_<main_metric>`` every epoch."""
        cfg = self.tune_config(cfg)
        data = self.prepare(cfg, self.load(cfg), options)
        plan = replace(self.plan(cfg, data, tune=True)[0], name=run_name)
        self.fit(cfg, options, data, [plan], storage, callbacks=callbacks)


def check_eval_rows(plan: RunPlan, metrics: dict[str, Any]) -> None:
    """The final evaluation scored each of the split's rows exactly once."""
    scored = metrics.get(metric_key(plan.split, ROWS))
    if plan.eval_rows is None or scored is None:
        return
    if int(scored) != plan.eval_rows:
        raise EvaluationIncomplete(
            f"run {plan.name!r}: the evaluation scored {int(scored)} rows of split "
            f"{plan.split!r}, which holds {plan.eval_rows}; rows were dropped or scored "
            "twice between workers")


__all__ = ["EvaluationIncomplete", "Method", "PlanResult", "RunPlan", "check_eval_rows",
           "save_run_record"]
