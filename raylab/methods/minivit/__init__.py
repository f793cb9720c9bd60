"""MiniViT (Zhang et al. 2022): weight multiplexing + weight distillation on the
classification task.

- :mod:`.config`: :class:`MiniViTConfig` (student, sharing, teacher, loss weights);
- :mod:`.models`: the multiplexed student, teachers from checkpoints, relation hooks;
- :mod:`.task`: :class:`MiniViTTask`, the classification task's distillation hook;
- :mod:`.method`: :class:`MiniViTMethod`, the run and its report.
"""

from raylab.methods.minivit.config import DistillConfig, MiniViTConfig
from raylab.methods.minivit.method import MiniViTMethod

__all__ = ["DistillConfig", "MiniViTConfig", "MiniViTMethod"]
