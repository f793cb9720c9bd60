"""STEGO on a worker: the segmentation head and its probes trained on cached features.

Each step takes a batch of training images' frozen feature maps, gives each image a KNN
partner (one of its ``knn_k`` nearest neighbours, drawn per epoch from a generator seeded
by the run's seed, the epoch and the rank, so a resumed run draws the same partners) whose
features come from the bank every worker holds, and a random partner within the batch
(inside the loss). Rank 0 scores the evaluation split: the cluster probe after Hungarian
matching, the linear probe, and after the last epoch the paper's baseline (cosine k-means
on the raw features, and a linear probe on them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raylab.engine.batching import per_worker_batch
from raylab.engine.context import WorkerContext
from raylab.engine.keys import ROWS, TRAIN, metric_key
from raylab.engine.loop import Task, TrainState
from raylab.engine.shards import EpochBatches, EvalBatches
from raylab.methods.stego.config import StegoConfig
from raylab.methods.stego.models import StegoModel, cosine_kmeans, feature_points, score

#: Every worker reads the training features whole: the KNN partners' features.
BANK = "bank"
#: The evaluation split's features and labels, which rank 0 reads whole.
EVAL = "eval"
#: Evaluation batches are upsampled to label resolution: keep them small.
EVAL_BATCH = 16
LOSS_KEYS = ("loss", "loss_self", "loss_knn", "loss_rand", "loss_cluster", "loss_linear")


def partner_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(
        [seed, epoch, rank]).generate_state(1)[0]))


class StegoTask(Task):
    """``run``: ``split`` (evaluation split name), ``num_classes``, ``feature_shape``
    (C, h, w), ``img_size`` (label resolution), ``knn`` ((rows, k) neighbour indices of
    the training rows) and ``checkpoint_meta``."""

    sum_keys = LOSS_KEYS[1:] + ("loss",)
    throughput_key = "img_per_s"

    def __init__(self, cfg: StegoConfig, run: dict[str, Any], ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.split: str = run["split"]
        self.n_classes: int = run["num_classes"]
        self.size: int = run["img_size"]
        self.knn = torch.as_tensor(np.asarray(run["knn"]), dtype=torch.long)
        self.epochs = cfg.optim.epochs
        self.checkpoint_every = cfg.checkpoint_every
        self.meta = run["checkpoint_meta"]
        feat_dim = int(run["feature_shape"][0])
        model = StegoModel(feat_dim, cfg.code_dim, cfg.dropout, self.n_classes)
        self.model = ctx.prepare_model(model)
        self.inner: StegoModel = getattr(self.model, "module", self.model)
        probes = [p for n, p in self.inner.named_parameters() if not n.startswith("head.")]
        self.optimizer = torch.optim.Adam([
            {"params": list(self.inner.head.parameters()), "lr": cfg.optim.lr},
            {"params": probes, "lr": cfg.optim.probe_lr}])
        cache = cfg.cache_mb << 20
        self.train = EpochBatches(ctx.shard(TRAIN),
                                  per_worker_batch(cfg.optim.batch_size, ctx.world_size),
                                  seed=cfg.seed, rank=ctx.rank,
                                  shuffle_buffer=cfg.shuffle_buffer, drop_last=True,
                                  cache_bytes=cache, agree=ctx.any_worker)
        self.bank_reader = EvalBatches(ctx.shard(BANK), 256)
        self.bank: torch.Tensor | None = None
        self.evals = EvalBatches(ctx.shard(EVAL), EVAL_BATCH, cache) \
            if ctx.is_chief else None
        self.partners: torch.Generator | None = None
        self.step_gen = torch.Generator()

    def state_objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer}

    def _load_bank(self) -> torch.Tensor:
        """The training rows' features by row index (float16, held once per worker)."""
        parts: dict[int, torch.Tensor] = {}
        for batch in self.bank_reader():
            for i, f in zip(batch["index"].tolist(), batch["feats"]):
                parts[int(i)] = f
        missing = len(self.knn) - len(parts)
        if missing:
            raise RuntimeError(f"STEGO's feature bank holds {len(parts)} of {len(self.knn)} "
                               "training rows")
        return torch.stack([parts[i] for i in range(len(self.knn))])

    def start_epoch(self, epoch: int) -> None:
        if self.bank is None:
            self.bank = self._load_bank()
        self.partners = partner_generator(self.cfg.seed, epoch, self.ctx.rank)
        self.step_gen.manual_seed(int(self.partners.initial_seed()) + 1)
        self.model.train()

    def batches(self, epoch: int) -> Any:
        return self.train.epoch(epoch)

    def train_step(self, batch: Any, state: TrainState, last: bool) -> dict[str, float]:
        cfg, device = self.cfg, self.ctx.device
        index = batch["index"].long()
        choice = torch.randint(self.knn.shape[1], (len(index),), generator=self.partners)
        partner = self.knn[index, choice]
        assert self.bank is not None
        feats = batch["feats"].to(device).float()
        feats_pos = self.bank[partner].to(device).float()
        labels = batch["label"].to(device).long()
        lc = cfg.loss
        loss, parts = self.model(
            feats, feats_pos, labels, weights=lc.weights(), shifts=lc.shifts(),
            samples=lc.feature_samples, generator=self.step_gen, pointwise=lc.pointwise,
            zero_clamp=lc.zero_clamp)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        state.step += 1
        n = len(index)
        values = torch.stack([parts[k] for k in LOSS_KEYS[1:]] + [loss.detach()]).tolist()
        out = {"samples": n}
        out.update({k: v * n for k, v in zip(LOSS_KEYS[1:] + ("loss",), values)})
        return out

    def evaluate(self, epoch: int, last: bool) -> dict[str, Any]:
        if not (last or (epoch + 1) % self.cfg.eval_every == 0) or not self.ctx.is_chief:
            return {}
        assert self.evals is not None
        cfg, key = self.cfg, lambda name: metric_key(self.split, name)  # noqa: E731
        centroids = None
        if last and cfg.kmeans_iters:
            centroids = self.kmeans_centroids()
        rows = [0]

        def batches() -> Any:
            for b in self.evals():
                rows[0] += len(b["label"])
                yield b["feats"].to(self.ctx.device).float(), b["label"].long()

        metrics = score(batches(), self.inner, self.n_classes, self.size, centroids)
        out: dict[str, Any] = {}
        for name, metric in metrics.items():
            result = metric.result()
            out[key(f"{name}_miou")] = float(result["miou"])
            out[key(f"{name}_accuracy")] = float(result["accuracy"])
        out[key(ROWS)] = rows[0]
        return out

    def kmeans_centroids(self) -> torch.Tensor:
        """The baseline: cosine k-means on a seeded sample of the raw training features."""
        assert self.bank is not None
        gen = torch.Generator().manual_seed(self.cfg.seed)
        points = feature_points(self.bank)
        take = torch.randperm(len(points), generator=gen)[:self.cfg.kmeans_points]
        return cosine_kmeans(points[take].float(), self.n_classes, self.cfg.kmeans_iters,
                             gen).to(self.ctx.device)
