"""Detection and instance segmentation on COCO: Mask R-CNN with a ViTDet (Li et al. 2022)
or timm CNN + FPN backbone, on the shared detection task (:mod:`raylab.tasks.detection`).

- :class:`~raylab.tasks.detection.config.DetectionConfig`: ViTDet's recipe as defaults;
- :mod:`.method`: :class:`DetectionMethod`, the datasets, the AP report and pictures.
"""

from raylab.methods.detection.method import DetectionMethod
from raylab.tasks.detection.config import DetectionConfig

__all__ = ["DetectionConfig", "DetectionMethod"]
