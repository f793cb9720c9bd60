"""MiniViT: weight multiplexing and weight distillation, on the classification task.

Paper: J. Zhang et al., "MiniViT: Compressing Vision Transformers with Weight Multiplexing",
CVPR 2022 (microsoft/Cream, MiniViT). What this method adds to the classification task
(the same shards, Ray Data augmentation, step, EMA and evaluation as ConvNeXt's):

- the student: any timm ViT/DeiT/Swin, multiplexed (:func:`raylab.models.minivit.multiplex`:
  shared attention/MLP weights per group of layers, per-layer transforms), optionally
  started from an uncompressed run's weights (``init_from``);
- the teacher: a raylab classifier run or a timm model with local weights, evaluated in
  eval mode under ``no_grad`` on the same workers, with the prediction, attention-relation
  and hidden-relation losses (:mod:`raylab.losses.distill`) as the training loss;
- the report: parameters before and after multiplexing, compression, MACs, the teacher's
  and the student's top-1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from raylab import config as cfglib
from raylab.engine.keys import RUN, metric_key
from raylab.errors import ConfigError
from raylab.methods.base import PlanResult
from raylab.methods.convnext.method import ConvNeXtMethod, model_cost
from raylab.methods.minivit.config import MiniViTConfig
from raylab.methods.minivit.models import (
    build_student,
    load_teacher,
    plain_student,
    relation_shapes,
    uses_relations,
)
from raylab.methods.minivit.task import MiniViTTask
from raylab.models import count_params
from raylab.registry import register_method
from raylab.runtime.options import RunOptions
from raylab.tasks.classification.data import ImageData


def _shape_text(shape: tuple[int, int, int]) -> str:
    windows, tokens, hidden = shape
    return (f"{tokens} tokens" if windows == 1 and tokens == hidden
            else f"{windows} window(s) of {tokens} tokens")


@register_method
class MiniViTMethod(ConvNeXtMethod):
    name = "minivit"
    paper = ("Zhang et al. 2022, MiniViT: weight multiplexing + weight distillation "
             "(timm ViT/DeiT/Swin)")
    Config = MiniViTConfig
    Task = MiniViTTask
    main_metric = "top1"
    path_keys = ("data", "teacher", "teacher_weights", "init_from")
    default_space = {
        "sharing": "[none, every-2, all]",
        "distill.beta": "(0.0, 2.0)",
        "distill.gamma": "(0.0, 0.5)",
        "distill.temperature": "(1.0, 4.0)",
    }

    def build_model(self, cfg: MiniViTConfig, num_classes: int) -> nn.Module:
        return build_student(cfg, num_classes)

    def load(self, cfg: MiniViTConfig) -> ImageData:
        """The data, with the teacher checked against it on the driver (classes, token
        counts) before any worker starts; the costs the report needs are taken then."""
        data = super().load(cfg)
        self._costs = (cfg, self._measure(cfg, data))
        return data

    def costs(self, cfg: MiniViTConfig, data: ImageData) -> dict[str, Any]:
        """Parameters and MACs of the plain and the multiplexed student (and the teacher),
        measured once per config: the teacher is read from its checkpoint once."""
        cached = getattr(self, "_costs", None)
        if cached is None or cached[0] is not cfg:
            self._costs = (cfg, self._measure(cfg, data))
        return self._costs[1]

    def _measure(self, cfg: MiniViTConfig, data: ImageData) -> dict[str, Any]:
        n = len(data.class_names)
        plain = plain_student(cfg, n)
        plain_params, plain_macs = model_cost(plain, cfg.input_size)
        params, macs = model_cost(build_student(cfg, n), cfg.input_size)
        out = {"plain_params": plain_params, "params": params, "gmacs": macs / 1e9,
               "plain_gmacs": plain_macs / 1e9,
               "compression": plain_params / max(params, 1)}
        if cfg.teacher:
            teacher, what = load_teacher(cfg, data.class_names)
            relations = uses_relations(cfg, plain, teacher)
            if relations:
                mine, theirs = (relation_shapes(m, cfg.input_size) for m in (plain, teacher))
                if mine != theirs:
                    raise ConfigError(
                        f"config key 'teacher': its last block sees {_shape_text(theirs)}, "
                        f"the student's {_shape_text(mine)} at {cfg.input_size} px; the "
                        f"relation losses compare token by token (match patch and window "
                        f"sizes, or set distill.beta=0 distill.gamma=0)")
            out.update(teacher=what, teacher_params=count_params(teacher), relations=relations)
        return out

    def describe(self, cfg: MiniViTConfig, options: RunOptions, data: ImageData) -> None:
        c = self.costs(cfg, data)
        print(f"{cfg.model} at {cfg.input_size} px, sharing {cfg.sharing}"
              f"{' + transforms' if cfg.transform else ''}: {c['plain_params']:,} -> "
              f"{c['params']:,} params ({c['compression']:.2f}x), {c['gmacs']:.3f} GMACs",
              flush=True)
        if cfg.teacher:
            d = cfg.distill
            terms = [f"{d.pred:g} pred (T={d.temperature:g})"]
            if d.gt:
                terms.insert(0, f"{d.gt:g} CE")
            if c["relations"]:
                terms += [f"{d.beta:g} attn ({d.relation_heads} relation heads)",
                          f"{d.gamma:g} hidden"]
            elif d.beta or d.gamma:
                terms.append("no relation terms (teacher or student is neither a ViT nor a Swin)")
            print(f"teacher {c['teacher']}, {c['teacher_params']:,} params; loss "
                  f"{' + '.join(terms)}", flush=True)
        else:
            print("no teacher: trained on the labels alone (the ablation's "
                  "'without distillation' row)", flush=True)
        o = cfg.optim
        print(f"recipe: AdamW lr {o.lr:g} @ batch {o.reference_batch} -> "
              f"{o.effective_lr:.3g} @ global batch {o.batch_size}, wd {o.weight_decay:g}, "
              f"cosine over {o.epochs} epochs, drop-path {cfg.drop_path_rate}, {cfg.precision}",
              flush=True)

    def summarise(self, cfg: MiniViTConfig, data: ImageData, results: list[PlanResult]
                  ) -> dict[str, Any]:
        summary = super().summarise(cfg, data, results)
        m = results[0].metrics
        teacher_key = metric_key(results[0].plan.split, "teacher_top1")
        summary.update(self.costs(cfg, data))
        summary.update(method="minivit", sharing=cfg.sharing, transform=cfg.transform,
                       teacher_top1=float(m[teacher_key]) if teacher_key in m else None,
                       distill=cfglib.to_dict(cfg.distill) if cfg.teacher else None)
        return summary

    def write_report(self, cfg: MiniViTConfig, summary: dict[str, Any], folder: Path) -> None:
        from raylab.plots import plot_metric_history, read_metrics

        rows = read_metrics(folder / RUN / "metrics.jsonl")
        curves = plot_metric_history(rows, {"top-1": "test_top1", "EMA top-1": "test_ema_top1"},
                                     "top-1", folder / "top1.png")
        s = summary
        lines = [
            f"# MiniViT run: {cfg.model}, sharing {cfg.sharing}"
            f"{' with weight transformation' if cfg.transform else ''}",
            "",
            "| model | params | GMACs | top-1 |",
            "|---|---:|---:|---:|",
        ]
        if s.get("teacher"):
            top1 = "" if s["teacher_top1"] is None else f"{s['teacher_top1']:.4f}"
            lines.append(f"| teacher {s['teacher']} | {s['teacher_params']:,} | | {top1} |")
        lines += [
            f"| {cfg.model} unshared | {s['plain_params']:,} | {s['plain_gmacs']:.3f} | |",
            f"| multiplexed student | {s['params']:,} | {s['gmacs']:.3f} | {s['top1']:.4f} |",
            "",
            f"Compression {s['compression']:.2f}x; top-5 {s['top5']:.4f} on {s['eval_rows']} "
            f"{cfg.eval_split} images after {s['epochs']} epochs, "
            f"{s['train_img_per_s']:.1f} img/s, {s['seconds']:.0f} s.",
            "",
        ]
        if s.get("distill"):
            d = s["distill"]
            lines += [f"Loss: {d['gt']:g} CE + {d['pred']:g} pred (T={d['temperature']:g})"
                      + (f" + {d['beta']:g} attn + {d['gamma']:g} hidden" if s["relations"]
                         else " (prediction distillation only)"), ""]
        if curves:
            lines += ["![top-1 per epoch](top1.png)", ""]
        cfglib.atomic_write_text(folder / "report.md", "\n".join(lines))

    def print_summary(self, summary: dict[str, Any]) -> None:
        super().print_summary(summary)
        line = (f"multiplexed: {summary['plain_params']:,} -> {summary['params']:,} params "
                f"({summary['compression']:.2f}x)")
        if summary.get("teacher_top1") is not None:
            line += f"; teacher top-1 {summary['teacher_top1']:.4f}"
        print(line)
