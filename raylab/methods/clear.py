"""CLEAR continual learning: a stream actor owns the protocol, Train workers learn from it.

Paper: Z. Lin et al., "The CLEAR Benchmark: Continual LEArning on Real-World Imagery",
NeurIPS 2021 Datasets and Benchmarks (``METHODS.md`` section 3). The pieces:

- :mod:`raylab.continual.stream`: the protocol (IID 70/30 or streaming), cursor, replay
  buffer (row ids) and accuracy matrix, run as a named, restartable Ray actor that saves its
  state beside the run after every bucket;
- :mod:`raylab.continual.runner`: what each TorchTrainer worker does per bucket (ask the
  actor, train with the strategy's hooks, evaluate, checkpoint, tell the actor);
- :mod:`raylab.continual.strategies`: Finetune, ER, EWC, SI, LwF, AGEM, GDumb, CWR*;
- backbone: a timm network trained from scratch (ResNet-18 by default), or, with
  ``features=CHECKPOINT``, a linear classifier over a frozen DINO teacher's features (the
  paper's "unsupervised representation" rows), computed once per bucket.

The run folder holds ``stream_state.json`` (the actor's state), ``summary.json`` (R and
the five metrics), ``accuracy_matrix.png`` and ``report.md``; ``raylab clear-table`` lays
several runs out as the paper's Table 1.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raylab import config as cfglib
from raylab.errors import ConfigError, DataError, StorageError
from raylab.methods.base import Method, save_run_record
from raylab.registry import register_method
from raylab.runtime.options import RunOptions, local_path

log = logging.getLogger("raylab")

STATE_FILE = "stream_state.json"
#: Config knob -> the strategy's keyword; only the chosen strategy's knobs are passed on.
STRATEGY_KNOBS = {
    "finetune": {"replay_ratio": "replay_ratio"},
    "er": {"replay_ratio": "replay_ratio"},
    "ewc": {"ewc_lambda": "ewc_lambda"},
    "si": {"si_c": "c"},
    "lwf": {"lwf_alpha": "alpha", "lwf_temperature": "temperature"},
    "agem": {"agem_sample_size": "sample_size"},
    "gdumb": {},
    "cwr": {},
}


@dataclass
class ClearOptimConfig:
    """SGD per bucket, a fresh optimizer each bucket (the CLEAR authors' avalanche runs)."""

    #: Passes over each bucket's training rows.
    epochs: int = 5
    #: Rows per step over all workers (replay rows come on top).
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5

    def validate(self) -> None:
        cfglib.require(self.epochs >= 1, "optim.epochs", "an integer >= 1", self.epochs)
        cfglib.require(self.batch_size >= 1, "optim.batch_size", "an integer >= 1",
                       self.batch_size)
        cfglib.require(self.lr > 0, "optim.lr", "a positive number", self.lr)
        cfglib.require(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        cfglib.require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)


@dataclass
class ClearConfig:
    #: A converted stream (``raylab data convert clear`` / ``data sample clear``).
    data: str = ""
    strategy: str = "er"
    protocol: Literal["iid", "streaming"] = "iid"
    #: Share of each bucket trained on under the IID protocol.
    train_fraction: float = 0.7
    #: timm network trained from scratch (ignored with ``features``).
    model: str = "resnet18"
    #: A DINO checkpoint: train a linear classifier on its frozen teacher's features.
    features: str = ""
    #: Side of the square images; null: the stream's image size, at most 224 (with
    #: ``features``: the DINO model's size).
    input_size: int | None = None
    #: Random-crop padding of training images (-1: no crop/flip augmentation).
    padding: int = 4
    #: Replay buffer kind ("" = the strategy's own: reservoir for Finetune/ER/AGEM,
    #: class_balanced for GDumb); "biased_reservoir" gives "Finetuning (biased reservoir)".
    buffer: str = ""
    #: Rows in the buffer; 0 = one bucket's training rows, as in the paper.
    buffer_size: int = 0
    #: Share of a biased reservoir for each new bucket; null: dynamic 1/t.
    buffer_alpha: float | None = None
    #: Strategy knobs (null keeps the strategy's default, the CLEAR authors' values).
    replay_ratio: float | None = None
    ewc_lambda: float | None = None
    si_c: float | None = None
    lwf_alpha: float | None = None
    lwf_temperature: float | None = None
    agem_sample_size: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    optim: ClearOptimConfig = field(default_factory=ClearOptimConfig)

    def validate(self) -> None:
        cfglib.require(0 < self.train_fraction < 1, "train_fraction", "in (0, 1)",
                       self.train_fraction)
        cfglib.require(self.input_size is None or self.input_size >= 8, "input_size",
                       "null or an integer >= 8", self.input_size)
        cfglib.require(self.padding >= -1, "padding", "an integer >= -1", self.padding)
        cfglib.require(self.buffer_size >= 0, "buffer_size", "an integer >= 0 (0: one bucket)",
                       self.buffer_size)
        cfglib.require(self.buffer_alpha is None or 0 < self.buffer_alpha <= 1,
                       "buffer_alpha", "null or in (0, 1]", self.buffer_alpha)
        if self.strategy not in STRATEGY_KNOBS:
            raise ConfigError(f"config key 'strategy': {self.strategy!r} is not one of "
                              f"{sorted(STRATEGY_KNOBS)}")
        from raylab.continual.buffers import BUFFERS

        if self.buffer and self.buffer not in BUFFERS:
            raise ConfigError(f"config key 'buffer': {self.buffer!r} is not one of "
                              f"{sorted(BUFFERS)} (or empty for the strategy's own)")
        build_strategy(self)  # range checks of the knobs, naming them
        if not self.features:
            import timm

            if not timm.is_model(self.model):
                raise ConfigError(f"config key 'model': {self.model!r} is not a timm model")


def strategy_kwargs(cfg: ClearConfig) -> dict[str, Any]:
    """The chosen strategy's keywords from the config knobs that are set."""
    return {kw: getattr(cfg, knob) for knob, kw in STRATEGY_KNOBS[cfg.strategy].items()
            if getattr(cfg, knob) is not None}


def build_strategy(cfg: ClearConfig) -> Any:
    from raylab.continual.strategies import build_strategy as build

    kwargs = strategy_kwargs(cfg)
    if cfg.strategy == "finetune" and cfg.buffer and "replay_ratio" not in kwargs:
        kwargs["replay_ratio"] = 1.0  # a buffer named for Finetune means: replay from it
    try:
        return build(cfg.strategy, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"strategy {cfg.strategy!r}: {exc}") from None


def buffer_config(cfg: ClearConfig, strategy: Any, rows_per_bucket: int) -> dict[str, Any]:
    """The stream's ``buffer``/``trains_on_buffer``/``from_scratch`` arguments."""
    from raylab.continual.stream import strategy_flags

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


def row_label(cfg: ClearConfig) -> str:
    """The Table-1 row name of a config, e.g. "Finetuning (biased reservoir)"."""
    names = {"finetune": "Finetuning", "er": "ER", "ewc": "EWC", "si": "SI", "lwf": "LwF",
             "agem": "AGEM", "gdumb": "GDumb", "cwr": "CWR*"}
    label = names[cfg.strategy]
    if cfg.strategy == "finetune" and (cfg.buffer or (cfg.replay_ratio or 0) > 0):
        label += f" ({(cfg.buffer or 'reservoir').replace('_', ' ')})"
    return label


@dataclass
class StreamInfo:
    """What the driver reads from the stream folder before Ray starts."""

    class_names: list[str]
    buckets: list[int]          # labelled buckets, in time order
    rows_per_bucket: int        # mean training rows of a labelled bucket
    input_size: int


def load_stream(cfg: ClearConfig) -> StreamInfo:
    """Check the stream folder and the feature checkpoint (cheap reads only)."""
    import pyarrow.parquet as pq

    from raylab.data.clear import bucket_paths, read_stream_manifest

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
        from raylab.runtime.checkpoint import load_meta

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
                      max(1, round(share * sum(rows) / len(rows))), size)


def stream_kwargs(cfg: ClearConfig, info: StreamInfo) -> dict[str, Any]:
    """The :class:`~raylab.continual.stream.StreamProtocol` arguments of a run."""
    from raylab.continual.rows import stream_rows

    flags = buffer_config(cfg, build_strategy(cfg), info.rows_per_bucket)
    return {"bucket_rows": stream_rows(cfg.data, info.buckets), "protocol": cfg.protocol,
            "train_fraction": cfg.train_fraction, "seed": cfg.seed, **flags}


def bucket_settings(cfg: ClearConfig) -> Any:
    """How each bucket is trained (:class:`~raylab.continual.runner.BucketSettings`)."""
    from raylab.continual.runner import BucketSettings

    o = cfg.optim
    return BucketSettings(epochs=o.epochs, batch_size=o.batch_size, lr=o.lr,
                          momentum=o.momentum, weight_decay=o.weight_decay,
                          precision=cfg.precision, padding=cfg.padding, seed=cfg.seed)


def start_stream_actor(cfg: ClearConfig, info: StreamInfo, state_path: Path, name: str
                       ) -> Any:
    """Start the stream actor (or reconnect to its saved state) for this run."""
    from raylab.continual.stream import start_stream

    return start_stream(name, state_path, namespace=NAMESPACE, **stream_kwargs(cfg, info))


NAMESPACE = "raylab"


def stream_actor_name(run_folder: Path) -> str:
    """The stream actor's name for a run folder (namespace ``NAMESPACE``): one per run."""
    return f"clear-stream-{zlib.crc32(str(Path(run_folder).resolve()).encode()):08x}"


def fit_run(cfg: ClearConfig, options: RunOptions, info: StreamInfo, storage: str,
            run_name: str, callbacks: list[Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Start the stream actor beside the run, fit the TorchTrainer, return (result, R)."""
    import ray

    from raylab.methods.clear_loop import train_loop
    from raylab.runtime.trainer import fit

    folder = local_path(storage, run_name)
    if folder is None:
        raise StorageError("the CLEAR stream keeps its state in the run folder: --storage "
                           "must be a local or shared file-system path (mount the bucket)")
    folder.mkdir(parents=True, exist_ok=True)
    actor_name = stream_actor_name(folder)
    actor = start_stream_actor(cfg, info, folder / STATE_FILE, actor_name)
    loop_config = {"config": cfglib.to_dict(cfg), "num_classes": len(info.class_names),
                   "input_size": info.input_size, "stream": actor_name,
                   "namespace": NAMESPACE, "run_dir": str(folder),
                   "checkpoint_meta": {"method": "clear", "config": cfglib.to_dict(cfg),
                                       "class_names": info.class_names,
                                       "input_size": info.input_size}}
    try:
        result = fit(train_loop, loop_config, {}, options, storage=storage, name=run_name,
                     callbacks=callbacks, keep_checkpoints=2)
        stream = ray.get(actor.metrics.remote())
    finally:
        ray.kill(actor, no_restart=True)
    return result, stream


@register_method("clear")
class ClearMethod(Method):
    name = "clear"
    paper = "Lin et al. 2021, CLEAR: continual learning on a time-ordered stream (stream actor)"
    Config = ClearConfig
    #: The streaming score: accuracy on the next bucket before training on it (mean so far).
    metric = "next_domain"
    mode = "max"
    path_keys = ("data", "features")
    default_space = {
        "optim.lr": "log(0.005, 0.1)",
        "buffer_size": "[100, 280, 560]",
    }

    def check(self, cfg: ClearConfig) -> None:
        load_stream(cfg)

    def max_epochs(self, cfg: ClearConfig) -> int:
        """Tune's time axis is the bucket count (``epoch`` = buckets finished)."""
        return len(load_stream(cfg).buckets)

    def train(self, cfg: ClearConfig, options: RunOptions, storage: str, experiment: str
              ) -> dict[str, Any]:
        info = load_stream(cfg)
        print(f"CLEAR {row_label(cfg)} on {len(info.buckets)} buckets "
              f"({cfg.protocol} protocol), "
              f"{'frozen DINO features + linear' if cfg.features else cfg.model + ' from scratch'}"
              f" at {info.input_size} px", flush=True)
        t0 = time.perf_counter()
        exp_storage = f"{storage.rstrip('/')}/{experiment}"
        result, stream = fit_run(cfg, options, info, exp_storage, "run")
        summary = summarise(cfg, info, stream, time.perf_counter() - t0,
                            result.checkpoint.path if result.checkpoint is not None else None)
        write_report(cfg, summary, local_path(storage, experiment))
        return summary

    def print_summary(self, summary: dict[str, Any]) -> None:
        m = summary["metrics"]
        print(f"\n{summary['row']} ({summary['protocol']}, {summary['backbone']}): "
              f"in-domain {m['in_domain']:.4f}  next-domain {m['next_domain']:.4f}  "
              f"accuracy {m['accuracy']:.4f}  BwT {m['backward_transfer']:.4f}  "
              f"FwT {m['forward_transfer']:.4f}  ({summary['seconds']:.0f} s)")

    def tune_trial(self, cfg: ClearConfig, options: RunOptions, storage: str, run_name: str,
                   callbacks: list[Any]) -> None:
        fit_run(cfg, options, load_stream(cfg), storage, run_name, callbacks=callbacks)


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


def write_report(cfg: ClearConfig, summary: dict[str, Any], folder: Path | None) -> None:
    """summary.json, config.yaml, accuracy_matrix.png and report.md."""
    if folder is None:
        return
    from raylab.plots import plot_accuracy_matrix

    save_run_record(cfg, summary, folder)
    plot_accuracy_matrix(summary["matrix"], summary["buckets"], folder / "accuracy_matrix.png",
                         f"{summary['row']}, {summary['protocol']} protocol")
    m = summary["metrics"]
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
        "R[i][j] = accuracy on bucket j after training through bucket i "
        + ("(IID: the bucket's 30 % test split)." if cfg.protocol == "iid" else
           "(streaming: all of bucket j; R[i][i+1] is measured before training on i+1)."),
        "",
        "![accuracy matrix](accuracy_matrix.png)",
        "",
    ]
    cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))
