"""CLEAR continual learning: a stream actor owns the protocol, Train workers learn from it.

Paper: Z. Lin et al., "The CLEAR Benchmark: Continual LEArning on Real-World Imagery",
NeurIPS 2021 Datasets and Benchmarks (``METHODS.md`` section 3). The pieces:

- :mod:`raylab.continual.stream`: the protocol (IID 70/30 or streaming), cursor, replay
  buffer (row ids), validation rows and accuracy matrix, run as a named, restartable Ray
  actor that saves its state beside the run after every bucket;
- :mod:`.task`: what each TorchTrainer worker does per bucket (ask the stream, train with
  the strategy's hooks, evaluate, checkpoint, tell the stream), one bucket per epoch of the
  engine's loop;
- :mod:`raylab.continual.strategies`: Finetune, ER, EWC, SI, LwF, AGEM, GDumb, CWR*;
- backbone: a timm network trained from scratch (ResNet-18 by default), or, with
  ``features=CHECKPOINT``, a linear classifier over a frozen DINO teacher's features (the
  paper's "unsupervised representation" rows), computed once per bucket.

A Tune trial runs a *validating* stream: it trains without ``val_fraction`` of each
bucket's training rows and its accuracy matrix (and Tune's ``val_next_domain``) is
measured on those rows, which the final run never scores.

The run folder holds ``stream_state.json`` (the actor's state), ``summary.json`` (R and
the five metrics), ``accuracy_matrix.png`` and ``report.md``; ``raylab clear-table`` lays
several runs out as the paper's Table 1.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from raylab import config as cfglib
from raylab.continual.rows import stream_rows
from raylab.continual.stream import StreamProtocol, StreamService, strategy_flags
from raylab.data import fs
from raylab.data.clear import bucket_paths, read_stream_manifest
from raylab.engine.checkpoint import load_meta
from raylab.engine.keys import RUN, TEST, VAL
from raylab.errors import ConfigError, DataError
from raylab.methods.base import Method, PlanResult, RunPlan
from raylab.methods.clear.config import ClearConfig, make_strategy, row_label
from raylab.methods.clear.task import STREAM, ClearTask
from raylab.registry import register_method
from raylab.runtime.options import RunOptions

STATE_FILE = "stream_state.json"


@dataclass
class StreamInfo:
    """What the driver reads from the stream folder before Ray starts (once)."""

    class_names: list[str]
    buckets: list[int]          # labelled buckets, in time order
    rows_per_bucket: int        # mean training rows of a labelled bucket
    input_size: int
    #: ``{bucket: (row ids, labels)}`` of the labelled buckets (what the stream is built of).
    bucket_rows: dict[int, Any] = field(default_factory=dict, repr=False)


def load_stream(cfg: ClearConfig) -> StreamInfo:
    """Check the stream folder and the feature checkpoint (cheap reads only)."""
    if not cfg.data:
        raise ConfigError("config key 'data': expected a CLEAR stream folder (--data DST)")
    manifest = read_stream_manifest(cfg.data)
    labelled = [b for b in manifest["buckets"] if b not in manifest["unlabeled_buckets"]
                and b != 0]
    if len(labelled) < 2:
        raise DataError(f"the stream has {len(labelled)} labelled bucket(s) besides bucket 0; "
                        "the protocol needs at least 2", path=cfg.data)
    rows = [manifest["bucket_rows"][str(b)] for b in labelled]
    share = cfg.train_fraction if cfg.protocol == "iid" else 1.0
    size = cfg.input_size
    if cfg.features:
        meta = load_meta(cfg.features)
        if meta.get("method") != "dino":
            raise ConfigError(f"config key 'features': {cfg.features} is a "
                              f"{meta.get('method')!r} checkpoint, expected a DINO one")
        size = int(meta["config"]["img_size"])
    elif size is None:
        first = pq.read_table(bucket_paths(cfg.data, labelled[0], manifest)[0],
                              columns=["height", "width"]).slice(0, 1).to_pylist()[0]
        size = min(int(first["height"]), int(first["width"]), 224)
    return StreamInfo(list(manifest["class_names"]), labelled,
                      max(1, round(share * sum(rows) / len(rows))), size,
                      stream_rows(cfg.data, labelled, manifest))


def buffer_config(cfg: ClearConfig, strategy: Any, rows_per_bucket: int) -> dict[str, Any]:
    """The stream's ``buffer``/``trains_on_buffer``/``from_scratch`` arguments."""
    kind = strategy.buffer_kind
    if cfg.buffer and kind is not None:
        kind = cfg.buffer
    capacity = cfg.buffer_size or rows_per_bucket
    flags = strategy_flags(strategy, capacity)
    if flags["buffer"] is not None:
        flags["buffer"]["kind"] = kind
        if kind == "biased_reservoir":
            flags["buffer"].update({"alpha": cfg.buffer_alpha,
                                    "dynamic": cfg.buffer_alpha is None})
    return flags


def stream_kwargs(cfg: ClearConfig, info: StreamInfo, validate: bool = False
                  ) -> dict[str, Any]:
    """The :class:`~raylab.continual.stream.StreamProtocol` arguments of a run
    (``validate``: a Tune trial's validating stream)."""
    flags = buffer_config(cfg, make_strategy(cfg), info.rows_per_bucket)
    return {"bucket_rows": info.bucket_rows, "protocol": cfg.protocol,
            "train_fraction": cfg.train_fraction, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "validate": validate, **flags}


def stream_actor_name(run_folder: str | Path) -> str:
    """The stream actor's name for a run folder (a path or a store URI): one per run."""
    # Symbolic links resolved: two paths to one folder (so to one state file) name the
    # same actor.
    where = fs.absolute(run_folder, resolve_links=True)
    return f"clear-stream-{zlib.crc32(where.encode()):08x}"


def task_args(cfg: ClearConfig, info: StreamInfo) -> dict[str, Any]:
    """The run arguments of :class:`~raylab.methods.clear.task.ClearTask` besides its
    ``name``, ``split`` and ``run_dir``."""
    return {"num_classes": len(info.class_names), "input_size": info.input_size,
            "buckets": len(info.buckets),
            "checkpoint_meta": {"method": "clear", "config": cfglib.to_dict(cfg),
                                "class_names": info.class_names,
                                "input_size": info.input_size}}


@register_method
class ClearMethod(Method):
    name = "clear"
    paper = "Lin et al. 2021, CLEAR: continual learning on a time-ordered stream (stream actor)"
    Config = ClearConfig
    Task = ClearTask
    #: The streaming score: accuracy on the next bucket before training on it (mean so far).
    main_metric = "next_domain"
    path_keys = ("data", "features")
    default_space = {
        "optim.lr": "log(0.005, 0.1)",
        "buffer_size": "[100, 280, 560]",
    }

    def load(self, cfg: ClearConfig) -> StreamInfo:
        return load_stream(cfg)

    def max_epochs(self, cfg: ClearConfig, data: StreamInfo | None = None) -> int:
        """Tune's time axis is the bucket count (``epoch`` = buckets finished)."""
        return len((data or load_stream(cfg)).buckets)

    def inputs(self, cfg: ClearConfig, data: StreamInfo, plan: RunPlan
               ) -> tuple[dict[str, Any], dict[str, Any]]:
        """No Ray Datasets: the learners fetch rows by id from the stream's buckets."""
        return {}, task_args(cfg, data)

    def plan(self, cfg: ClearConfig, data: StreamInfo, tune: bool) -> list[RunPlan]:
        """One run; a Tune trial's stream validates (module docstring). Every test row of
        every bucket is scored once per bucket finished."""
        plan = RunPlan(VAL, VAL) if tune else RunPlan(RUN, TEST)
        return [replace(plan, eval_rows=len(self.eval_row_ids(cfg, data, plan)))]

    def eval_row_ids(self, cfg: ClearConfig, data: StreamInfo, plan: RunPlan) -> set[str]:
        """The row ids the stream's accuracy matrix is measured on (each bucket's test
        rows; a validating stream's validation rows)."""
        protocol = StreamProtocol(**stream_kwargs(cfg, data, validate=plan.split == VAL))
        return {str(row) for b in data.buckets for row in protocol.test_ids(b)}

    def fit(self, cfg: ClearConfig, options: RunOptions, data: StreamInfo,
            plans: list[RunPlan], storage: str, callbacks: list[Any] | None = None,
            progress: Any = None, services: dict[str, str] | None = None
            ) -> list[PlanResult]:
        """Start the stream actor beside the run, train, kill the actor (its state, with R,
        stays in the run folder's ``stream_state.json``)."""
        # Imports Ray: this module must import without it (`raylab clear-table` and the
        # in-process bench import the package; raylab.bench.gpu runs where Ray is not).
        from raylab.runtime.actors import ActorProxy, start_stream

        (plan,) = plans
        folder = fs.join(storage, plan.name)  # the run folder: a path or a store URI
        if not fs.is_uri(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
        actor_name = stream_actor_name(folder)
        stream = ActorProxy(start_stream(actor_name, fs.join(folder, STATE_FILE),
                                         **stream_kwargs(cfg, data, plan.split == VAL)))
        try:
            return super().fit(cfg, options, data, plans, storage, callbacks, progress,
                               {**(services or {}), STREAM: actor_name})
        finally:
            stream.kill()

    def describe(self, cfg: ClearConfig, options: RunOptions, data: StreamInfo) -> None:
        backbone = ("frozen DINO features + linear" if cfg.features
                    else cfg.model + " from scratch")
        print(f"CLEAR {row_label(cfg)} on {len(data.buckets)} buckets ({cfg.protocol} "
              f"protocol), {backbone} at {data.input_size} px", flush=True)

    def summarise(self, cfg: ClearConfig, data: StreamInfo, results: list[PlanResult]
                  ) -> dict[str, Any]:
        result = results[0]
        stream = StreamService(fs.join(result.run_dir, STATE_FILE)).metrics()
        return summarise(cfg, data, stream, result.seconds, result.checkpoint)

    def write_report(self, cfg: ClearConfig, summary: dict[str, Any], folder: Path) -> None:
        write_report(cfg, summary, folder)

    def print_summary(self, summary: dict[str, Any]) -> None:
        m = summary["metrics"]
        print(f"\n{summary['row']} ({summary['protocol']}, {summary['backbone']}): "
              f"in-domain {m['in_domain']:.4f}  next-domain {m['next_domain']:.4f}  "
              f"accuracy {m['accuracy']:.4f}  BwT {m['backward_transfer']:.4f}  "
              f"FwT {m['forward_transfer']:.4f}  ({summary['seconds']:.0f} s)")


def summarise(cfg: ClearConfig, info: StreamInfo, stream: dict[str, Any], seconds: float,
              checkpoint: str | None = None) -> dict[str, Any]:
    """summary.json of a run: the row, R and its metrics (``stream``: the stream's
    ``metrics()``), the final checkpoint."""
    if not stream["complete"]:
        raise DataError(f"the stream finished {len(stream['finished'])} of "
                        f"{len(stream['buckets'])} buckets", path=cfg.data)
    return {
        "method": "clear",
        "row": row_label(cfg),
        "strategy": cfg.strategy,
        "protocol": cfg.protocol,
        "backbone": f"frozen {Path(cfg.features).name}" if cfg.features else cfg.model,
        "features": bool(cfg.features),
        "seed": cfg.seed,
        "buckets": stream["buckets"],
        "matrix": stream["matrix"],
        "metrics": stream["metrics"],
        "input_size": info.input_size,
        "checkpoint": checkpoint,
        "seconds": round(seconds, 1),
    }


def write_report(cfg: ClearConfig, summary: dict[str, Any], folder: Path) -> None:
    """accuracy_matrix.png and report.md."""
    # matplotlib (raylab.plots) only when figures are drawn: its import costs seconds.
    from raylab.plots import plot_accuracy_matrix

    plot_accuracy_matrix(summary["matrix"], summary["buckets"], folder / "accuracy_matrix.png",
                         f"{summary['row']}, {summary['protocol']} protocol")
    m = summary["metrics"]
    test_rows = ("(IID: the bucket's 30 % test split)." if cfg.protocol == "iid" else
                 "(streaming: all of bucket j but its validation rows; R[i][i+1] is "
                 "measured before training on i+1).")
    lines = [
        f"# CLEAR run: {summary['row']}, {summary['protocol']} protocol",
        "",
        f"Backbone: {summary['backbone']} at {summary['input_size']} px; seed {cfg.seed}; "
        f"{len(summary['buckets'])} buckets; {summary['seconds']:.0f} s.",
        "",
        "| in-domain | next-domain | accuracy | backward transfer | forward transfer |",
        "|---|---|---|---|---|",
        f"| {m['in_domain']:.4f} | {m['next_domain']:.4f} | {m['accuracy']:.4f} | "
        f"{m['backward_transfer']:.4f} | {m['forward_transfer']:.4f} |",
        "",
        "R[i][j] = accuracy on bucket j after training through bucket i " + test_rows,
        "",
        "![accuracy matrix](accuracy_matrix.png)",
        "",
    ]
    cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))
