"""A trained detector on images: load a run's model, predict, draw (pure torch, no Ray).

Used by ``raylab predict detection`` (COCO results JSON + pictures) and by the run's
report (pictures of a few evaluation images). Predictions come back in the original
image's pixels, with masks as COCO RLE, exactly as the evaluation scores them.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from raylab import config as cfglib
from raylab.data.coco import decode_masks, encode_masks
from raylab.engine.checkpoint import load_checkpoint, load_meta, restore_checkpoint
from raylab.errors import CheckpointError, DataError
from raylab.tasks.detection.config import DetectionConfig
from raylab.tasks.detection.task import build_model
from raylab.transforms.detection import ResizePad, unscale_boxes, unscale_masks

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
#: Colours of the drawn instances, by label (repeated).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
#: The box colour of pasted objects (copy-paste's training samples in the report).
PASTED = (255, 255, 255)


def detection_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The meta of a detection run's model (``raylab predict``, pseudo-labels).

    Raises:
        CheckpointError: A checkpoint of another method (or none).
    """
    meta = load_meta(checkpoint)
    if meta.get("method") != "detection":
        raise CheckpointError(f"{checkpoint}: a checkpoint of method "
                              f"{meta.get('method')!r}, not of the detection method")
    return meta


class TrainedDetector:
    """A trained Mask R-CNN from a run's ``model`` folder (or any raylab checkpoint of
    the detection method), ready to predict on numpy images."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu") -> None:
        meta = detection_meta(checkpoint)
        # The run's own weights hold the backbone: its pretraining run's folder is not
        # needed (nor read) to predict.
        self.cfg = cfglib.apply_overrides(cfglib.from_dict(DetectionConfig, meta["config"]),
                                          {"backbone_checkpoint": ""})
        self.categories: list[dict[str, Any]] = meta["categories"]
        self.category_of = {i + 1: c["id"] for i, c in
                            enumerate(sorted(self.categories, key=lambda c: c["id"]))}
        self.names = {c["id"]: c["name"] for c in self.categories}
        self.device = torch.device(device)
        self.model = build_model(self.cfg, len(self.categories) + 1)
        restore_checkpoint(load_checkpoint(checkpoint), model=self.model, restore_rng=False)
        self.model.to(self.device).eval()
        self.resize = ResizePad(self.cfg.image_size)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, image_id: int = 0) -> list[dict[str, Any]]:
        """COCO result dicts (bbox xywh, score, category_id, RLE segmentation) of one
        ``H x W x 3`` uint8 image, in its own pixels."""
        sample = self.resize(image, rng=np.random.default_rng(0))
        x = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1)  # a writable copy
        out = self.model([x.float().div(255).to(self.device)])[0]
        size = image.shape[:2]
        scale = sample.geometry.scale
        boxes = unscale_boxes(out["boxes"].float().cpu(), scale, size).numpy()
        masks = unscale_masks(out["masks"].float().cpu(), scale, size)[:, 0] > 0.5
        rles = encode_masks(masks.numpy().astype(np.uint8))
        return [{"image_id": image_id, "category_id": self.category_of[int(label)],
                 "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                 "score": float(score),
                 "segmentation": {"size": [int(size[0]), int(size[1])],
                                  "counts": rle.decode("ascii")}}
                for (x0, y0, x1, y1), score, label, rle
                in zip(boxes, out["scores"].tolist(), out["labels"].tolist(), rles)]


def read_image(path: str | os.PathLike | bytes) -> np.ndarray:
    """An RGB uint8 image from a file or encoded bytes; DataError names a bad file."""
    try:
        source = io.BytesIO(path) if isinstance(path, bytes) else path
        with Image.open(source) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        where = "image bytes" if isinstance(path, bytes) else str(path)
        raise DataError(f"{where}: not a readable image ({exc})") from None


def draw_instances(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None,
                   labels: Any, pasted: np.ndarray | None = None, width: int = 1
                   ) -> Image.Image:
    """``image`` with each instance's mask tinted in its label's colour (PALETTE) and its
    ``xyxy`` box drawn ``width`` px wide (white and twice as wide for a pasted one)."""
    canvas = np.asarray(image, np.float32).copy()
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    pasted = np.zeros(len(boxes), bool) if pasted is None else np.asarray(pasted, bool)
    if masks is not None:
        for mask, label in zip(np.asarray(masks, bool), labels):
            colour = np.asarray(PALETTE[int(label) % len(PALETTE)], np.float32)
            canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for box, label, is_pasted in zip(boxes, labels, pasted):
        colour = PASTED if is_pasted else PALETTE[int(label) % len(PALETTE)]
        draw.rectangle([float(v) for v in box], outline=colour,
                       width=2 * width if is_pasted else width)
    return picture


def draw_detections(image: np.ndarray, detections: list[dict[str, Any]],
                    names: dict[int, str], min_score: float = 0.5) -> Image.Image:
    """The image with each detection above ``min_score`` drawn: its mask tinted, its box,
    and its class name and score."""
    kept = [d for d in detections if d["score"] >= min_score]
    labels = [d["category_id"] for d in kept]
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in kept)],
                     np.float32).reshape(-1, 4)
    masks = np.concatenate([decode_masks([d["segmentation"]["counts"]],
                                         *d["segmentation"]["size"]) for d in kept]) \
        if kept else None
    picture = draw_instances(image, boxes, masks, labels, width=2)
    draw = ImageDraw.Draw(picture)
    for d, (x, y, _, _) in zip(kept, boxes):
        draw.text((x + 2, y + 1), f"{names.get(d['category_id'], d['category_id'])} "
                                  f"{d['score']:.2f}",
                  fill=PALETTE[d["category_id"] % len(PALETTE)])
    return picture


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (not recursive), sorted; DataError when there are none."""
    root = Path(folder)
    if root.is_file():
        return [root]
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if root.is_dir() else []
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files


def predict_folder(checkpoint: str | os.PathLike, images: str | os.PathLike,
                   out: str | os.PathLike, min_score: float = 0.5) -> dict[str, Any]:
    """``raylab predict detection``: COCO results of every image of ``images`` in
    ``out/detections.json`` (image ids numbered in file order, listed in
    ``out/images.json``) and a picture per image in ``out/pictures/``."""
    detector = TrainedDetector(checkpoint)
    files = image_files(images)
    out = Path(out)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for image_id, path in enumerate(files, start=1):
        pixels = read_image(path)
        found = detector(pixels, image_id)
        results += found
        draw_detections(pixels, found, detector.names, min_score).save(
            out / "pictures" / f"{path.stem}.png")
    cfglib.atomic_write_text(out / "detections.json", json.dumps(results))
    cfglib.atomic_write_text(out / "images.json", json.dumps(
        [{"id": i, "file_name": p.name} for i, p in enumerate(files, start=1)], indent=1))
    return {"images": len(files), "detections": len(results), "out": str(out)}
