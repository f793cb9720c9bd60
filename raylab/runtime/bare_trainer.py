"""The baseline of ``raylab bench startup``: the same first step with Ray Train alone.

It lives under ``runtime/`` because it talks to Ray directly (the house rule: only this
package imports Ray); it uses none of raylab's runtime, which is the point of a baseline.

What a user writes with Ray Train and no raylab: ``ray.init()``, the Suturing trials of
fold ``supertrial1`` read with Ray Data, z-normalised with the training trials' statistics
and cut into W=60/L=30 windows in ``map_batches``, and a 1-worker ``TorchTrainer`` whose
train function takes one AdamW step of the same network on the first batch of 64 windows
(local shuffle buffer 4096, as raylab's default). It prints the seconds from process start
to that step. ``python -m raylab.runtime.bare_trainer SHARDS STORAGE``.
"""

from __future__ import annotations

import time

STARTED = time.time()

import glob  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from raylab.models.skillnet import SkillNet  # noqa: E402

LABELS = {"N": 0, "I": 1, "E": 2}
WIDTH, STEP = 60, 30


def main(shards: str, storage: str) -> None:
    paths = sorted(glob.glob(f"{shards}/*.parquet"))
    meta = pq.read_table(paths, columns=["task", "name", "trial", "kinematics"]).to_pylist()
    train = [r for r in meta if r["task"] == "Suturing" and r["trial"] != 1]
    frames = np.concatenate([np.asarray(r["kinematics"], np.float32).reshape(-1, 76)
                             for r in train])
    mean, std = frames.mean(0), frames.std(0) + 1e-8
    names = {r["name"] for r in train}

    def windows(batch: dict) -> dict:
        xs, ys = [], []
        for name, skill, kin in zip(batch["name"], batch["skill"], batch["kinematics"]):
            if name not in names:
                continue
            z = (np.asarray(kin, np.float32).reshape(-1, 76) - mean) / std
            starts = range(0, len(z) - WIDTH + 1, STEP)
            xs.append(np.stack([z[s:s + WIDTH] for s in starts]))
            ys += [LABELS[skill]] * len(starts)
        if not xs:
            return {"x": np.zeros((0, WIDTH, 76), np.float32), "y": np.zeros(0, np.int64)}
        return {"x": np.concatenate(xs), "y": np.asarray(ys, np.int64)}

    ray.init()
    ds = ray.data.read_parquet(paths).select_columns(["name", "skill", "kinematics"])
    ds = ds.map_batches(windows, batch_format="numpy", batch_size=16)

    def train_fn(config: dict) -> float:
        shard = ray.train.get_dataset_shard("train")
        model = ray.train.torch.prepare_model(SkillNet(in_channels=76, window=WIDTH,
                                                       num_classes=3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
        for batch in shard.iter_torch_batches(batch_size=64, local_shuffle_buffer_size=4096):
            loss = F.cross_entropy(model(batch["x"]), batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            return time.time()  # comes back as the Result's return_value
        return float("nan")

    result = TorchTrainer(
        train_fn, datasets={"train": ds},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(storage_path=storage, name=f"bare-{time.time_ns()}"),
    ).fit()
    print(json.dumps({"first_step_s": result.return_value - STARTED}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
