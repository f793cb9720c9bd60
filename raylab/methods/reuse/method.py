"""Frozen-backbone reuse: one saved raylab backbone, a new task on top of it.

Papers: R. Vasconcelos et al., "Proper Reuse of Image Classification Features Improves
Object Detection", CVPR 2022 (a frozen backbone plus enough head capacity matches
fine-tuning, and one backbone serves many tasks); S.-A. Rebuffi et al., residual adapters
(NeurIPS 2017, CVPR 2018). What this method adds to the classification task:

- the network of a raylab ``dino``, ``convnext`` or ``minivit`` run, rebuilt from that
  run's own config and weights (or its random init: ``from_scratch``), with a new head;
- ``freeze``: ``none`` / ``backbone`` / ``backbone+norms``; frozen parameters get no
  gradient, no optimizer state and no place in DDP's all-reduce;
- ``adapters.every`` / ``adapters.dim``: zero-initialised residual adapters beside the
  frozen blocks (:mod:`raylab.models.adapters`), trained with the head;
- the report: trainable and frozen parameters, the memory of training state (weights,
  gradients, AdamW moments) and top-1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from raylab import config as cfglib
from raylab.errors import CheckpointError
from raylab.methods.base import PlanResult
from raylab.methods.convnext.method import ConvNeXtMethod
from raylab.methods.reuse.config import ReuseConfig
from raylab.methods.reuse.models import backbone_meta, build_reuse_model
from raylab.methods.reuse.task import ReuseTask
from raylab.models import count_macs
from raylab.models.freeze import freeze_summary
from raylab.registry import register_method
from raylab.runtime.options import RunOptions
from raylab.tasks.classification.data import ImageData

#: Bytes per trainable parameter that training keeps besides the weight: its gradient and
#: AdamW's two moments (fp32).
TRAIN_STATE_BYTES = 3 * 4


def training_state_mb(total: int, trainable: int) -> float:
    """MB of weights (fp32) plus the gradient and AdamW moments of the trainable ones."""
    return (4 * total + TRAIN_STATE_BYTES * trainable) / 2**20


@register_method
class ReuseMethod(ConvNeXtMethod):
    name = "reuse"
    paper = ("Vasconcelos et al. 2022, frozen backbone reuse + Rebuffi et al. residual "
             "adapters (a raylab dino/convnext/minivit backbone)")
    Config = ReuseConfig
    Task = ReuseTask
    default_space = {
        "optim.lr": "log(1e-4, 1e-2)",
        "freeze": "[none, backbone, backbone+norms]",
        "adapters.every": "[0, 1, 2]",
        "adapters.dim": "[16, 64]",
    }
    path_keys = ("data", "backbone_checkpoint")

    def load(self, cfg: ReuseConfig) -> ImageData:
        """The data, and the backbone checked on the driver before any worker starts."""
        data = super().load(cfg)
        self._acc = (cfg, self._accounting(cfg, len(data.class_names)))
        return data

    def build_model(self, cfg: ReuseConfig, num_classes: int) -> nn.Module:
        return build_reuse_model(cfg, num_classes)[0]

    def checkpoint_meta(self, cfg: ReuseConfig, class_names: list[str]) -> dict[str, Any]:
        """Besides the run's config, the backbone's own meta: the run's model rebuilds
        without the backbone's folder (:meth:`model_from_meta`)."""
        return {"method": self.name, "config": cfglib.to_dict(cfg),
                "class_names": class_names, "input_size": cfg.input_size,
                "backbone_meta": backbone_meta(cfg.backbone_checkpoint)}

    def model_from_meta(self, meta: dict[str, Any]) -> nn.Module:
        if not isinstance(meta.get("backbone_meta"), dict):
            raise CheckpointError("a reuse checkpoint without its backbone's meta (written "
                                  "before raylab kept it); retrain it to export it")
        cfg = cfglib.from_dict(ReuseConfig, meta["config"])
        return build_reuse_model(cfg, len(meta["class_names"]), meta["backbone_meta"])[0]

    def _accounting(self, cfg: ReuseConfig, num_classes: int) -> dict[str, Any]:
        model, saved = build_reuse_model(cfg, num_classes)
        counts = freeze_summary(model)
        return {"backbone": f"{saved.arch} ({saved.method} run, "
                            f"{'random init' if cfg.from_scratch else saved.which + ' weights'})",
                "params": counts.total, "trainable_params": counts.trainable,
                "frozen_params": counts.frozen,
                "adapter_params": sum(p.numel() for n, p in model.named_parameters()
                                      if ".adapter." in n),
                "gmacs": count_macs(model, (3, cfg.input_size, cfg.input_size)) / 1e9,
                "train_state_mb": round(training_state_mb(counts.total, counts.trainable), 2)}

    def _cached(self, cfg: ReuseConfig, data: ImageData) -> dict[str, Any]:
        cached = getattr(self, "_acc", None)
        if not (cached and cached[0] is cfg):
            self._acc = (cfg, self._accounting(cfg, len(data.class_names)))
        return self._acc[1]

    def describe(self, cfg: ReuseConfig, options: RunOptions, data: ImageData) -> None:
        acc = self._cached(cfg, data)
        print(f"reuse {acc['backbone']}: freeze {cfg.freeze}, adapters every "
              f"{cfg.adapters.every} dim {cfg.adapters.dim}; {acc['trainable_params']:,} of "
              f"{acc['params']:,} params train", flush=True)

    def summarise(self, cfg: ReuseConfig, data: ImageData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        summary = super().summarise(cfg, data, results)
        acc = self._cached(cfg, data)
        summary.update(acc, method=self.name, model=acc["backbone"], freeze=cfg.freeze,
                       adapters={"every": cfg.adapters.every, "dim": cfg.adapters.dim},
                       from_scratch=cfg.from_scratch)
        return summary

    def write_report(self, cfg: ReuseConfig, summary: dict[str, Any], folder: Path) -> None:
        lines = [
            f"# Reuse run: {summary['model']}",
            "",
            f"top-1 {summary['top1']:.4f} | top-5 {summary['top5']:.4f} on "
            f"{summary['eval_rows']} {cfg.eval_split} images after {summary['epochs']} epochs.",
            "",
            "| freeze | adapters (every, dim) | trainable params | frozen params | "
            "adapter params | training state MB | img/s |",
            "|---|---|---|---|---|---|---|",
            f"| {cfg.freeze} | {cfg.adapters.every}, {cfg.adapters.dim} | "
            f"{summary['trainable_params']:,} | {summary['frozen_params']:,} | "
            f"{summary['adapter_params']:,} | {summary['train_state_mb']:.1f} | "
            f"{summary['train_img_per_s']:.1f} |",
            "",
            f"Training state = fp32 weights + gradient and AdamW moments of the trainable "
            f"parameters. Wall time {summary['seconds']:.0f} s.",
            "",
        ]
        cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))

    def print_summary(self, summary: dict[str, Any]) -> None:
        print(f"\n{summary['model']} ({summary['freeze']}, adapters "
              f"{summary['adapters']['every']}/{summary['adapters']['dim']}) on "
              f"{summary['eval_rows']} {summary['eval_split']} images after "
              f"{summary['epochs']} epochs: top-1 {summary['top1']:.4f}")
        print(f"trainable {summary['trainable_params']:,} of {summary['params']:,} params, "
              f"train {summary['train_img_per_s']:.1f} img/s ({summary['seconds']:.0f} s)")
