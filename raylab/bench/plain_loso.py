"""The baseline of ``raylab bench loso``: a whole LOSO run as a user writes it without raylab.

Plain PyTorch and pyarrow, about 60 lines, reading the same shards: per fold, z-normalise
with the training trials' statistics, cut W/L windows with numpy, train the same network
(:class:`~raylab.models.skillnet.SkillNet`, so both sides do the same arithmetic) with AdamW
and a per-epoch cosine lr, and score the test windows after every epoch, as raylab does.
None of raylab's data, loop or engine code is used. Run it on its own with
``python -m raylab.bench.plain_loso SHARDS --task Suturing --epochs 15``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from raylab.models.skillnet import SkillNet

LABELS = {"N": 0, "I": 1, "E": 2}


def load(shards: str, task: str) -> list[dict]:
    import glob

    table = pq.read_table(sorted(glob.glob(f"{shards}/*.parquet")),
                          columns=["task", "name", "trial", "skill", "n_frames", "kinematics"])
    rows = [r for r in table.to_pylist() if r["task"] == task]
    for r in rows:
        r["kin"] = np.asarray(r["kinematics"], dtype=np.float32).reshape(r["n_frames"], 76)
    return rows


def windows(rows: list[dict], mean: np.ndarray, std: np.ndarray, w: int, step: int):
    xs, ys = [], []
    for r in rows:
        z = (r["kin"] - mean) / std
        starts = range(0, len(z) - w + 1, step)
        xs.append(np.stack([z[s:s + w] for s in starts]))
        ys += [LABELS[r["skill"]]] * len(starts)
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys)


def run_fold(train: list[dict], test: list[dict], epochs: int, w: int = 60, step: int = 30,
             batch: int = 64, lr: float = 1e-3) -> float:
    frames = np.concatenate([r["kin"] for r in train])
    mean, std = frames.mean(0), frames.std(0) + 1e-8
    x, y = windows(train, mean, std, w, step)
    xt, yt = windows(test, mean, std, w, step)
    torch.manual_seed(0)
    model = SkillNet(in_channels=76, window=w, num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs)))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(xt).argmax(1) == yt).float().mean().item()
    return accuracy


def loso(shards: str, task: str, epochs: int) -> dict:
    t0 = time.perf_counter()
    rows = load(shards, task)
    folds = {k: [r for r in rows if r["trial"] == k] for k in sorted({r["trial"] for r in rows})}
    accuracies = {f"supertrial{k}": run_fold([r for r in rows if r["trial"] != k], test, epochs)
                  for k, test in folds.items()}
    return {"accuracy": accuracies, "mean_accuracy": float(np.mean(list(accuracies.values()))),
            "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--task", default="Suturing")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps(loso(args.shards, args.task, args.epochs), indent=2))
