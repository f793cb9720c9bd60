"""Platform benchmarks on JIGSAWS (the skill method), each against a baseline in the same run.

- ``train-overhead``: steady-state samples/s of the skill model in a 1-worker TorchTrainer
  (streaming its windows from Ray Data) vs a plain PyTorch loop over the same windows held
  in memory, with the same thread count; and the time from command start to the first
  optimizer step.
- ``ingest``: windows/s of the Ray Data pipeline (read shards, z-normalise, window,
  iter_torch_batches) vs a torch DataLoader doing the same work with as many processes.
- ``latency``: per-window inference latency of the skill model on one CPU thread.
- ``scaling``: samples/s with 2 Train workers vs 1, and plain torch DDP with 2 vs 1.
"""

from __future__ import annotations

import json
import queue
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from raylab import bench
from raylab import config as cfglib
from raylab.bench import BenchOptions
from raylab.data import jigsaws
from raylab.data.shards import iter_rows
from raylab.methods.skill import SkillConfig, SkillMethod
from raylab.methods.skill.data import channel_stats, window_dataset
from raylab.methods.skill.task import build_model, train_step
from raylab.runtime.cluster import ensure_ray
from raylab.runtime.options import RunOptions
from raylab.transforms.windows import ChannelStatsAccumulator, windows_from_trials


def _shards(data: str | None, tmp: Path) -> str:
    if data:
        return str(Path(data).resolve())
    jigsaws.write_sample(tmp / "raw", tasks=("Suturing",))
    jigsaws.convert_jigsaws(tmp / "raw", tmp / "shards")
    return str(tmp / "shards")


def _setup(shards: str, epochs: int) -> tuple[Any, Any, Any]:
    """The config, the trials and the first fold's run plan."""
    cfg = cfglib.apply_overrides(SkillConfig(), {"data": shards, "optim.epochs": epochs,
                                                 "checkpoint_every": 1000})
    method = SkillMethod()
    data = method.load(cfg)
    return cfg, data, method.plan(cfg, data, tune=False)[0]


def _fold_trials(plan: Any) -> tuple[list[Any], list[Any]]:
    return plan.data["train"], plan.data[plan.split]


def _in_memory_windows(cfg: Any, trials: list[Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    """The fold's training windows built on the driver, as a plain loop would have them."""
    wanted = {t.name: t for t in trials}
    rows = [r for r in iter_rows(cfg.data, columns=["name", "n_frames", "kinematics"])
            if r["name"] in wanted]
    acc = ChannelStatsAccumulator()
    arrays = [np.asarray(r["kinematics"], dtype=np.float32) for r in rows]
    for a in arrays:
        acc.update(a.reshape(-1, 76))
    stats = acc.result()
    kin = np.empty(len(arrays), dtype=object)
    kin[:] = arrays
    batch = {"kinematics": kin, "n_frames": np.array([r["n_frames"] for r in rows]),
             "label": np.array([wanted[r["name"]].label for r in rows]),
             "trial_idx": np.arange(len(rows))}
    out = windows_from_trials(batch, width=cfg.window, step=cfg.step, stats=stats)
    return out["x"], out["y"], stats


def _epoch_rates(cfg: Any, model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                 all_reduce: Any, rank: int = 0, world: int = 1,
                 before_epoch: Any = lambda: None) -> list[float]:
    """Global samples/s of each epoch of ``train_epoch`` over windows held in memory.

    Each of the ``world`` ranks takes every ``world``-th window of a shared permutation
    and ``batch_size // world`` of them per step, as Train workers share a global batch.
    The step is the task's own (``raylab.methods.skill.task.train_step``), so the ratio
    measures what the platform adds around it.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    per_rank = max(1, cfg.optim.batch_size // world)
    generator = torch.Generator().manual_seed(cfg.seed)
    rates = []
    for _ in range(cfg.optim.epochs):
        perm = torch.randperm(len(yt), generator=generator)[rank::world]
        batches = ({"x": xt[perm[i:i + per_rank]], "y": yt[perm[i:i + per_rank]]}
                   for i in range(0, len(perm), per_rank))
        before_epoch()
        t0 = time.perf_counter()
        model.train()
        samples = torch.zeros(1, dtype=torch.float64)
        for batch in batches:
            samples += train_step(model, opt, batch, torch.device("cpu"), cfg.precision)[
                "samples"]
        samples = all_reduce(samples)
        rates.append(samples.item() / (time.perf_counter() - t0))
    return rates


def _plain_loop_samples_per_s(cfg: Any, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    """The same step code (``train_step``) over the windows in memory, without Ray.

    Both sides run the identical per-batch work (forward, backward, AdamW, loss/accuracy
    bookkeeping), so the ratio measures what the platform adds and nothing else.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    rates = _epoch_rates(cfg, build_model(cfg), x, y, lambda t: t)
    return statistics.median(rates[1:] or rates)


def _ray_run(cfg: Any, data: Any, plan: Any, workers: int, storage: Path, name: str
             ) -> list[dict[str, Any]]:
    """One fold through the method's own fit (Ray Train, the engine's loop)."""
    SkillMethod().fit(cfg, RunOptions(workers=workers), data, [replace(plan, name=name)],
                      str(storage))
    return [json.loads(line) for line in (storage / name / "metrics.jsonl").open()]


def _steady(rows: list[dict[str, Any]]) -> float:
    rates = [r["samples_per_s"] for r in rows]
    return statistics.median(rates[1:] or rates)


def bench_train_overhead(opts: BenchOptions) -> dict[str, Any]:
    """``--workers 1``: a 1-worker TorchTrainer; 0: the same trainer in-process, its loop
    in this process, limited to 1 thread like the baseline."""
    epochs, workers, tmp = max(opts.epochs, 2), opts.workers, opts.tmp
    cfg, data, plan = _setup(_shards(opts.data, tmp), epochs)
    train, _ = _fold_trials(plan)
    ensure_ray()
    if workers == 0:
        torch.set_num_threads(1)
    rows = _ray_run(cfg, data, plan, workers, tmp / "runs", "overhead")
    ray_rate = _steady(rows)
    to_first_step = rows[0]["first_step_unix_time"] - bench.COMMAND_START
    x, y, _ = _in_memory_windows(cfg, train)
    plain_rate = _plain_loop_samples_per_s(cfg, x, y, threads=1)
    return {"bench": "train-overhead", "train_workers": workers,
            "windows_per_epoch": int(len(y)), "epochs": epochs,
            "ray_train_samples_per_s": round(ray_rate, 1),
            "plain_loop_samples_per_s": round(plain_rate, 1),
            "ratio": round(ray_rate / plain_rate, 3),
            "command_start_to_first_step_s": round(to_first_step, 2)}


class _DataLoaderWindows(torch.utils.data.IterableDataset):
    """IterableDataset over shard files: each DataLoader worker reads, windows and
    z-normalises its own files (the usual hand-written baseline)."""

    def __init__(self, paths: list[str], assign: dict[str, int], cfg: Any, stats: Any,
                 batch: int) -> None:
        super().__init__()
        self.paths, self.assign, self.cfg, self.stats, self.batch = paths, assign, cfg, stats, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.paths[info.id::info.num_workers] if info else self.paths
        for path in mine:
            table = pq.read_table(path, columns=["name", "n_frames", "kinematics"])
            names = table.column("name").to_pylist()
            keep = [i for i, n in enumerate(names) if n in self.assign]
            if not keep:
                continue
            table = table.take(keep)
            kin = np.empty(len(keep), dtype=object)
            kin[:] = [np.asarray(k, dtype=np.float32)
                      for k in table.column("kinematics").to_numpy(zero_copy_only=False)]
            out = windows_from_trials(
                {"kinematics": kin, "n_frames": table.column("n_frames").to_numpy(),
                 "label": np.array([self.assign[names[i]] for i in keep]),
                 "trial_idx": np.arange(len(keep))},
                width=self.cfg.window, step=self.cfg.step, stats=self.stats)
            order = np.random.permutation(len(out["y"]))
            for i in range(0, len(order), self.batch):
                idx = order[i:i + self.batch]
                yield torch.from_numpy(out["x"][idx]), torch.from_numpy(out["y"][idx])


def bench_ingest(opts: BenchOptions, processes: int = 2) -> dict[str, Any]:
    epochs, tmp = max(opts.epochs, 2), opts.tmp
    processes = opts.processes or processes
    cfg, data, plan = _setup(_shards(opts.data, tmp), epochs)
    train, _ = _fold_trials(plan)
    paths = data.paths
    ensure_ray()
    rows = data.rows(cfg)
    stats = channel_stats(rows, {t.name for t in train})
    # The windowing as Ray Data tasks (materialize_mb 0), the path of a shard set too large
    # to hold: small sets are windowed once on the driver, which a loader that windows
    # every epoch would not be a baseline for.
    ds = window_dataset(rows, train, replace(cfg, materialize_mb=0), stats)
    ray_rates, dl_rates = [], []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in ds.iter_torch_batches(batch_size=256, local_shuffle_buffer_size=4096):
            n += len(b["y"])
        ray_rates.append(n / (time.perf_counter() - t0))
    loader = torch.utils.data.DataLoader(
        _DataLoaderWindows(paths, {t.name: t.label for t in train}, cfg, stats, 256),
        batch_size=None, num_workers=processes, persistent_workers=False)
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for _x, y in loader:
            n += len(y)
        dl_rates.append(n / (time.perf_counter() - t0))
    ray_rate, dl_rate = statistics.median(ray_rates[1:]), statistics.median(dl_rates[1:])
    return {"bench": "ingest", "windows_per_epoch": n, "epochs": epochs,
            "ray_data_windows_per_s": round(ray_rate), "dataloader_windows_per_s": round(dl_rate),
            "dataloader_workers": processes, "ratio": round(ray_rate / dl_rate, 3)}


def bench_latency(opts: BenchOptions, n: int = 2000) -> dict[str, Any]:
    torch.set_num_threads(1)
    out: dict[str, Any] = {"bench": "latency", "threads": 1}
    for window in (30, 60, 90):
        cfg = cfglib.apply_overrides(SkillConfig(), {"window": window})
        model = build_model(cfg).eval()
        x = torch.randn(1, window, 76)
        times = []
        with torch.inference_mode():
            for _ in range(100):
                model(x)
            for _ in range(n):
                t0 = time.perf_counter()
                torch.softmax(model(x), 1)
                times.append((time.perf_counter() - t0) * 1e3)
        out[f"W{window}_median_ms"] = round(statistics.median(times), 4)
        out[f"W{window}_p95_ms"] = round(float(np.percentile(times, 95)), 4)
    return out


def _ddp_rank(rank: int, world: int, port: int, cfg: Any, x: np.ndarray, y: np.ndarray,
              rates: Any) -> None:
    """One process of the plain DDP baseline: gloo over loopback, 1 thread, its share of
    every global batch (as Train workers take it), the same ``train_epoch`` step code."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(cfg.seed)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    # Every rank must finish the epoch's all-reduces; only rank 0's clock is reported.
    for rate in _epoch_rates(cfg, DistributedDataParallel(build_model(cfg)), x, y,
                             all_reduce, rank, world, before_epoch=dist.barrier):
        if rank == 0:
            rates.put(rate)
    dist.destroy_process_group()


def _plain_ddp_samples_per_s(cfg: Any, x: np.ndarray, y: np.ndarray, world: int) -> float:
    """Steady-state samples/s of ``world`` plain torch DDP processes (no Ray at all)."""
    with socket.socket() as sock:  # a free port for the gloo rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    rates = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, world, port, cfg, x, y, rates))
             for r in range(world)]
    for proc in procs:
        proc.start()
    per_epoch: list[float] = []
    try:
        while len(per_epoch) < cfg.optim.epochs:
            try:
                per_epoch.append(rates.get(timeout=1.0))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(
                        f"plain DDP baseline: a process exited with {failed[0]}") from None
    except BaseException:
        for proc in procs:  # the others would wait for the lost rank's all-reduce
            proc.terminate()
        raise
    finally:
        for proc in procs:
            proc.join()
    return statistics.median(per_epoch[1:] or per_epoch)


def bench_scaling(opts: BenchOptions) -> dict[str, Any]:
    """2 Train workers vs 1, next to the same comparison for plain torch DDP processes
    without Ray: the baseline says what this machine allows the model at all."""
    epochs, tmp = max(opts.epochs, 2), opts.tmp
    cfg, data, plan = _setup(_shards(opts.data, tmp), epochs)
    train, _ = _fold_trials(plan)
    ensure_ray()
    one = _steady(_ray_run(cfg, data, plan, 1, tmp / "runs", "w1"))
    two = _steady(_ray_run(cfg, data, plan, 2, tmp / "runs", "w2"))
    x, y, _ = _in_memory_windows(cfg, train)
    plain_one = _plain_ddp_samples_per_s(cfg, x, y, world=1)
    plain_two = _plain_ddp_samples_per_s(cfg, x, y, world=2)
    return {"bench": "scaling", "epochs": epochs, "one_worker_samples_per_s": round(one, 1),
            "two_workers_samples_per_s": round(two, 1), "speedup": round(two / one, 3),
            "plain_ddp_one_process_samples_per_s": round(plain_one, 1),
            "plain_ddp_two_processes_samples_per_s": round(plain_two, 1),
            "plain_ddp_speedup": round(plain_two / plain_one, 3)}


def _first_step_of_raylab(shards: str, storage: Path, name: str) -> float:
    """Seconds from starting ``raylab train skill`` (one fold, one epoch, one 1-CPU worker)
    to its first optimizer step."""
    start = time.time()
    subprocess.run([sys.executable, "-m", "raylab.cli", "train", "skill", "--data", shards,
                    "--set", "folds=[supertrial1]", "--set", "optim.epochs=1",
                    "--workers", "1", "--cpus-per-worker", "1", "--storage", str(storage),
                    "--name", name], check=True, capture_output=True)
    rows = [json.loads(x) for x in (storage / name / "supertrial1" / "metrics.jsonl").open()]
    return rows[0]["first_step_unix_time"] - start


def _first_step_of_bare(shards: str, storage: Path) -> float:
    """Seconds from starting the bare Ray Train script (:mod:`raylab.runtime.bare_trainer`)
    to its first optimizer step."""
    out = subprocess.run([sys.executable, "-m", "raylab.runtime.bare_trainer", shards,
                          str(storage)], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["first_step_s"])


def bench_startup(opts: BenchOptions) -> dict[str, Any]:
    """Command start to first step: ``raylab train skill`` vs the same first step written
    with Ray Train alone, each a fresh process (a fresh local Ray), alternated
    ``--rounds`` times (default 3); medians and the difference."""
    shards = _shards(opts.data, opts.tmp)
    rounds = opts.rounds or 3
    ours, bare = [], []
    for i in range(rounds):
        ours.append(_first_step_of_raylab(shards, opts.tmp / "runs", f"s{i}"))
        bare.append(_first_step_of_bare(shards, opts.tmp / "bare"))
    med_ours, med_bare = statistics.median(ours), statistics.median(bare)
    return {"bench": "startup", "rounds": rounds,
            "raylab_first_step_s": [round(x, 1) for x in ours],
            "bare_trainer_first_step_s": [round(x, 1) for x in bare],
            "raylab_median_s": round(med_ours, 1), "bare_median_s": round(med_bare, 1),
            "added_s": round(med_ours - med_bare, 1)}


def bench_loso(opts: BenchOptions) -> dict[str, Any]:
    """A whole LOSO run of ``raylab train skill`` (its defaults but ``--epochs``) against
    the plain PyTorch script :mod:`raylab.bench.plain_loso` on the same shards, each a
    fresh process, alternated ``--rounds`` times (default 1: a run takes minutes)."""
    shards = _shards(opts.data, opts.tmp)
    epochs = opts.epochs
    rounds = opts.rounds or 1
    ours, plain, accuracy = [], [], {}
    for i in range(rounds):
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "raylab.cli", "train", "skill", "--data", shards,
               "--set", f"optim.epochs={epochs}", "--workers", str(opts.workers),
               "--storage", str(opts.tmp / "runs"), "--name", f"loso{i}"]
        subprocess.run(cmd, check=True, capture_output=True)
        ours.append(time.perf_counter() - t0)
        summary = json.loads((opts.tmp / "runs" / f"loso{i}" / "summary.json").read_text())
        accuracy["raylab"] = round(summary["mean_accuracy"], 4)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "raylab.bench.plain_loso", shards,
                              "--epochs", str(epochs)], check=True, capture_output=True,
                             text=True).stdout
        plain.append(time.perf_counter() - t0)
        accuracy["plain"] = round(json.loads(out)["mean_accuracy"], 4)
    med_ours, med_plain = statistics.median(ours), statistics.median(plain)
    return {"bench": "loso", "epochs": epochs, "workers": opts.workers, "rounds": rounds,
            "raylab_s": [round(x, 1) for x in ours], "plain_s": [round(x, 1) for x in plain],
            "ratio": round(med_ours / med_plain, 3), "mean_accuracy": accuracy}
