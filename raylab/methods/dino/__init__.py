"""DINO self-distillation (Caron et al. 2021): student, EMA teacher, multi-crop, k-NN.

- :mod:`.config`: :class:`DINOConfig` (the reference's recipe as defaults);
- :mod:`.task`: the student/teacher step on a worker (the engine's hooks);
- :mod:`.method`: :class:`DINOMethod`, the datasets, the report and attention maps.

A trained teacher is a frozen feature extractor for other methods:
:func:`raylab.models.backbones.load_backbone`.
"""

from raylab.methods.dino.config import DINOConfig, DINOOptimConfig
from raylab.methods.dino.method import DINOMethod

__all__ = ["DINOConfig", "DINOMethod", "DINOOptimConfig"]
