"""``raylab bench clear-table``: the CLEAR Table-1 layout on the synthetic drift stream.

Every strategy row, under both protocols, for several seeds, with a from-scratch timm
network and (given ``--features``, a DINO checkpoint) a linear classifier over frozen
features. Each run is the learner the TorchTrainer workers run (the same
:class:`~raylab.methods.clear.task.ClearTask` on the engine's loop, with a plain worker
context) against a :class:`~raylab.continual.stream.StreamService` in this process, not
through the Ray actor: the table measures the strategies, and 120 Ray runs would mostly
measure Ray's start-up on 2 cores (the actor and the workers are tested in
tests/integration/test_clear_ray.py). Images are decoded once and frozen features computed
once for all runs. Each run writes a ``summary.json`` in the method's format, so
``raylab clear-table OUT`` rebuilds the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from raylab import config as cfglib
from raylab.bench import BenchOptions, say_data, shared_data
from raylab.continual.rows import FeatureRows, FrozenEmbedding, ImageRows
from raylab.continual.stream import StreamService
from raylab.data.clear import convert_clear, is_stream, write_clear_sample
from raylab.data.imagefolder import write_image_sample
from raylab.engine.context import LocalContext
from raylab.engine.keys import TEST
from raylab.engine.loop import build_and_run
from raylab.methods.clear import ClearConfig, load_stream
from raylab.methods.clear.method import stream_kwargs, summarise, task_args
from raylab.methods.clear.table import build_table, find_summaries, format_markdown, load_summaries
from raylab.methods.clear.task import ROW_STORE, STREAM, ClearTask
from raylab.models.backbones import load_backbone

#: (Table-1 row, config overrides). Biased reservoir: each new bucket takes half of the
#: buffer (a recency bias distinct from the plain reservoir's uniform share).
ROWS: list[dict[str, Any]] = [
    {"strategy": "finetune"},
    {"strategy": "finetune", "buffer": "reservoir"},
    {"strategy": "finetune", "buffer": "biased_reservoir", "buffer_alpha": 0.5},
    {"strategy": "er"},
    {"strategy": "ewc"},
    {"strategy": "si"},
    {"strategy": "lwf"},
    {"strategy": "agem"},
    {"strategy": "gdumb"},
    {"strategy": "cwr"},
]


def stream_folder(data: str | None, tmp: Path) -> str:
    """A converted stream: ``data`` itself, or the synthetic drift stream (11 buckets x 400
    images) written from ``data`` or the CIFAR-10 subset."""
    if data and is_stream(data):
        say_data(f"stream {data}")
        return str(Path(data).resolve())
    src = Path(data) if data else shared_data() / "cifar10"
    if src.is_dir():
        say_data(f"a synthetic drift stream drawn from {src}")
    else:
        say_data(f"a synthetic drift stream drawn from SYNTHETIC shapes (no images at {src}; "
                 "set RAYLAB_DATA)")
        src = write_image_sample(tmp / "shapes", classes=10, train_per_class=300,
                                 test_per_class=100)
    write_clear_sample(src, tmp / "clear_raw", n_buckets=11, per_class_per_bucket=40, seed=0)
    convert_clear(tmp / "clear_raw", tmp / "clear_stream")
    return str(tmp / "clear_stream")


def _one_run(cfg: Any, info: Any, store: Any, out: Path, device: torch.device) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state = out / "stream_state.json"
    if state.exists():
        state.unlink()  # a bench run always starts afresh
    service = StreamService(state, **stream_kwargs(cfg, info))
    ctx = LocalContext(device=device, services={STREAM: service, ROW_STORE: store})
    args = dict(task_args(cfg, info), name="bench", split=TEST, run_dir=None)
    t0 = time.perf_counter()
    build_and_run(lambda c: ClearTask(cfg, args, c), ctx, cfg.seed)
    summary = summarise(cfg, info, service.metrics(), time.perf_counter() - t0)
    summary["bench"] = "in-process StreamService (raylab bench clear-table)"
    cfglib.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def bench_clear_table(opts: BenchOptions) -> dict[str, Any]:
    """Every row x protocol x seed (x backbone); returns the table and the wall times.

    ``--only`` keeps the rows of these strategies (e.g. to redo one row into ``--out``);
    the table then covers every run found in ``--out``.
    """
    data, epochs, tmp, features = opts.data, opts.epochs, opts.tmp, opts.features
    seeds, out, only = opts.seeds, opts.out, opts.only
    stream = stream_folder(data, tmp)
    root = Path(out) if out else tmp / "clear_table_runs"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbones = [("", None)] + ([(str(Path(features).resolve()), None)] if features else [])
    result: dict[str, Any] = {"bench": "clear-table", "stream": stream, "epochs": epochs,
                              "seeds": seeds, "device": str(device),
                              "torch_threads": torch.get_num_threads(), "wall_s": {}}
    summaries = []
    for feature_ckpt, _ in backbones:
        base = cfglib.apply_overrides(ClearConfig(), {
            "data": stream, "features": feature_ckpt, "optim.epochs": epochs})
        info = load_stream(base)
        images = ImageRows(stream, info.input_size)
        store: Any = images
        if feature_ckpt:
            store = FeatureRows(images, FrozenEmbedding(load_backbone(feature_ckpt), device))
        kind = "features" if feature_ckpt else "scratch"
        t0 = time.perf_counter()
        for row in ROWS:
            if only and row["strategy"] not in only:
                continue
            for protocol in ("iid", "streaming"):
                for seed in range(seeds):
                    cfg = cfglib.apply_overrides(base, {**row, "protocol": protocol,
                                                        "seed": seed})
                    name = f"{kind}/{cfg.strategy}-{row.get('buffer') or 'own'}/{protocol}-s{seed}"
                    s = _one_run(cfg, info, store, root / name, device)
                    summaries.append(s)
                    print(f"{kind:8s} {s['row']:30s} {protocol:9s} seed {seed}: next-domain "
                          f"{s['metrics']['next_domain']:.3f} ({s['seconds']:.0f} s)",
                          flush=True)
        result["wall_s"][kind] = round(time.perf_counter() - t0, 1)
    if only and out:
        summaries = load_summaries(find_summaries([root]))
    table = build_table(summaries)
    result["table"] = table
    result["markdown"] = format_markdown(table)
    result["runs"] = str(root)
    print(result["markdown"])
    return result


__all__ = ["ROWS", "bench_clear_table", "stream_folder"]
