"""The per-worker loop of a CLEAR run (Ray Train workers, or in-process with 0 workers).

Everything but the Ray plumbing is :func:`raylab.continual.runner.run_stream`; this module
builds the model and the row store, restores from the run's checkpoint, and turns each
finished bucket into a report + checkpoint (before the stream actor is told, so that a
restart never trains a bucket twice or skips one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def learner_model(cfg: Any, num_classes: int, feature_dim: int | None = None) -> nn.Module:
    """What trains: the timm network ``cfg.model`` from scratch, or (with ``cfg.features``)
    a linear classifier over ``feature_dim``-wide frozen features."""
    if cfg.features:
        return nn.Linear(int(feature_dim), num_classes)
    import timm

    return timm.create_model(cfg.model, pretrained=False, num_classes=num_classes)


def build_learner(cfg: Any, num_classes: int, input_size: int, device: torch.device
                  ) -> tuple[nn.Module, Any]:
    """The trainable model and the row store: a timm network over images, or a linear
    classifier over a frozen DINO teacher's cached features."""
    from raylab.continual.rows import FeatureRows, FrozenEmbedding, ImageRows

    images = ImageRows(cfg.data, input_size)
    if not cfg.features:
        return learner_model(cfg, num_classes), images
    from raylab.methods.dino import load_backbone

    embed = FrozenEmbedding(load_backbone(cfg.features), device)
    dim = int(embed(torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8)).shape[-1])
    return learner_model(cfg, num_classes, dim), FeatureRows(images, embed)


def bucket_metrics(result: dict[str, Any], finished_rows: list[list[float | None]]
                   ) -> dict[str, Any]:
    """Metrics of one finished bucket, with running means over the rows of R so far.

    ``finished_rows``: the rows of R of the buckets finished before this one.
    """
    i = result["index"]
    row = [result["accuracies"][b] for b in sorted(result["accuracies"])]
    rows = [list(r) for r in finished_rows] + [row]
    nexts = [r[k + 1] for k, r in enumerate(rows) if k + 1 < len(r)]
    seen = [r[j] for k, r in enumerate(rows) for j in range(k + 1)]
    out = {
        "epoch": i + 1,
        "bucket": result["bucket"],
        "train_loss": result["train"]["loss"],
        "train_samples": result["train"]["samples"],
        "replay_samples": result["train"]["replay_samples"],
        "seconds": result["seconds"],
        "in_domain_acc": row[i],
        "seen_acc": sum(seen) / len(seen),
    }
    out.update({f"acc_bucket_{b}": a for b, a in sorted(result["accuracies"].items())})
    if i + 1 < len(row):
        out["next_acc"] = row[i + 1]
    if nexts:
        out["next_domain"] = sum(nexts) / len(nexts)
    return out


def checkpoint_bucket(state: dict[str, Any] | None) -> int | None:
    """The bucket a checkpoint was taken after (None: no checkpoint)."""
    return None if state is None else int(state["extra"]["stream"]["bucket"])


def catch_up(stream: dict[str, Any], state: dict[str, Any] | None, run_dir: str,
             model: nn.Module) -> dict[str, Any] | None:
    """Reconcile the stream with the checkpoint a (re)started worker restored.

    Each bucket is checkpointed (rank 0 writes the folder synchronously) before the stream
    is told it is finished, but Ray Train registers a checkpoint only when its controller
    takes in the report, which a worker lost right after the report never sees. The stream
    may then be ahead of the checkpoint Ray Train hands back: training on from there would
    silently skip the buckets in between. So when the stream has finished a bucket later
    than ``state`` covers, the run folder's own checkpoint of that bucket (written, not
    registered) is loaded into ``model`` and returned; None when ``state`` is current.

    Raises:
        StreamError: The stream is ahead and no checkpoint of its last bucket exists.
    """
    from raylab.continual.stream import StreamError
    from raylab.errors import CheckpointError
    from raylab.runtime.checkpoint import check_compatible, load_checkpoint, restore_checkpoint
    from raylab.runtime.worker import list_checkpoints

    finished, order = stream["finished"], stream["buckets"]
    covered = checkpoint_bucket(state)
    done = 0 if covered is None else order.index(covered) + 1
    if len(finished) <= done:
        return None  # the checkpoint is as far as the stream, or one bucket further
    want = finished[-1]
    for path in list_checkpoints(run_dir):  # newest first
        try:
            candidate = load_checkpoint(path)
            check_compatible(candidate, where=path, model=model)
        except CheckpointError:
            continue
        if checkpoint_bucket(candidate) == want:
            restore_checkpoint(candidate, where=path, model=model)
            return candidate
    raise StreamError(f"the stream has finished buckets {finished} but the newest checkpoint "
                      f"of {run_dir} covers only {finished[:done]}; the checkpoint of bucket "
                      f"{want} is missing, so the run cannot continue exactly: start a new "
                      "run (another --name)")


def train_loop(loop_config: dict[str, Any]) -> None:
    from raylab.config import from_dict
    from raylab.continual.runner import run_stream
    from raylab.continual.stream import ActorClient, get_stream
    from raylab.methods.clear import ClearConfig, bucket_settings, build_strategy
    from raylab.runtime import worker as W

    cfg = from_dict(ClearConfig, loop_config["config"])
    info = W.worker_info()
    torch.manual_seed(cfg.seed)
    model, rows = build_learner(cfg, loop_config["num_classes"], loop_config["input_size"],
                                info.device)
    model = W.prepare_model(model)
    strategy = build_strategy(cfg)
    _, _, state = W.restore_latest(model=model)
    client = ActorClient(get_stream(loop_config["stream"], loop_config["namespace"]))
    meta = loop_config["checkpoint_meta"]
    adopted = catch_up(client.state(), state, loop_config["run_dir"], model)
    if adopted is not None:
        # Its report never reached Ray Train: report it now, which also registers it.
        state = adopted
        W.report(dict(state["extra"]["last_metrics"]),
                 {"model": model, "epoch": state["epoch"], "meta": meta,
                  "extra": {k: v for k, v in state["extra"].items() if k != "last_metrics"}})
    resume = None
    if state is not None:
        strategy.load_state_dict(state["extra"]["strategy"])
        resume = state["extra"]["stream"]
    settings = bucket_settings(cfg)

    def on_bucket(result: dict[str, Any]) -> None:
        finished = client.metrics()["matrix"][:result["index"]]
        extra = {"strategy": strategy.state_dict(),
                 "stream": {"bucket": result["bucket"],
                            "accuracies": {str(b): a for b, a in result["accuracies"].items()}}}
        W.report(bucket_metrics(result, finished),
                 {"model": model, "epoch": result["index"], "meta": meta, "extra": extra})

    done = run_stream(client, rows, model, strategy, settings, info.device, rank=info.rank,
                      world_size=info.world_size, reduce_sum=W.all_reduce_sum, resume=resume,
                      on_bucket=on_bucket)
    if not done and state is not None:
        # Restored from the last bucket's checkpoint: nothing left, repeat its report.
        W.finished_already(state, 1, 1)
