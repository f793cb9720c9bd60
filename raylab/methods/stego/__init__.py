"""STEGO (Hamilton et al. 2022): unsupervised semantic segmentation on a frozen DINO
backbone.

- :mod:`.config`: :class:`StegoConfig` (backbone, head, loss weights and shifts);
- :mod:`.features`: the frozen features and KNN lists, a cached Ray Data inference job;
- :mod:`.models`: head + probes on cached features, predictions, the k-means baseline;
- :mod:`.task`: :class:`StegoTask`, the worker side;
- :mod:`.method`: :class:`StegoMethod`, the run and its report.
"""

from raylab.methods.stego.config import StegoConfig, StegoLossConfig
from raylab.methods.stego.method import StegoMethod

__all__ = ["StegoConfig", "StegoLossConfig", "StegoMethod"]
