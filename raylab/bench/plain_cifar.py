"""The baseline of ``bench convnext-cifar``: what a user writes without raylab.

A short, self-contained PyTorch script for a small image set, written from the common
CIFAR practice and deliberately *not* from raylab's pieces (no raylab transform, config,
schedule or loss): pad-by-4 random crop + horizontal flip, label smoothing 0.1, AdamW,
a one-cycle learning-rate schedule stepped per batch, a ``timm.create_model`` network.
It reads the same shard files with pyarrow and decodes them with PIL, so both sides see
the same images; everything runs in this process on the CPU threads torch is given.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's own


def _load(shards: str, split: str) -> tuple[list[Image.Image], torch.Tensor]:
    images, labels = [], []
    for path in sorted(Path(shards).glob("*.parquet")):
        table = pq.read_table(path, columns=["image", "label", "split"])
        for data, label, name in zip(*(table.column(c).to_pylist()
                                       for c in ("image", "label", "split"))):
            if name == split:
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                labels.append(label)
    return images, torch.tensor(labels)


def train_plain(shards: str, model: str = "convnext_atto", epochs: int = 15,
                batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05,
                size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Train ``model`` on the ``train`` rows, return test top-1 and the wall time."""
    torch.manual_seed(seed)
    train_x, train_y = _load(shards, "train")
    test_x, test_y = _load(shards, "test")
    classes = int(max(train_y.max(), test_y.max())) + 1
    augment = transforms.Compose([
        transforms.Resize(size), transforms.RandomCrop(size, padding=size // 8),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(MEAN, STD)])
    plain = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    net = timm.create_model(model, num_classes=classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = len(train_y) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps)
    t0 = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(train_y))
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size].tolist()
            x = torch.stack([augment(train_x[j]) for j in idx])
            loss = F.cross_entropy(net(x), train_y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_y), 256):
            x = torch.stack([plain(img) for img in test_x[i:i + 256]])
            correct += int((net(x).argmax(1) == test_y[i:i + 256]).sum())
    return {"top1": round(correct / len(test_y), 4),
            "train_img_per_s": round(steps * batch_size * epochs / seconds, 1),
            "wall_s": round(seconds, 1)}
