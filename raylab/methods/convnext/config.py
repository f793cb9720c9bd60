"""ConvNeXt's config: the classification recipe with the paper's ImageNet values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raylab import config as cfglib
from raylab.tasks.classification.config import ClassificationConfig

#: Drop-path rate per ConvNeXt size in the paper (T 0.1, S 0.4, B/L 0.5). The paper has no
#: rate for the smaller atto..nano variants; they are small enough not to need one.
DROP_PATH_BY_SIZE = {"tiny": 0.1, "small": 0.4, "base": 0.5, "large": 0.5, "xlarge": 0.5}


def default_drop_path(model: str) -> float:
    for size, rate in DROP_PATH_BY_SIZE.items():
        if model.startswith("convnext_") and size in model.split("_")[1]:
            return rate
    return 0.0


@dataclass
class ConvNeXtConfig(ClassificationConfig):
    """Defaults are the paper's ImageNet recipe; scale epochs/batch down for small data.

    Any timm classifier name works for ``model`` (e.g. ``resnet18`` as a baseline);
    ConvNeXt-only arguments (layer scale) are passed only to ConvNeXt models.
    """

    model: str = "convnext_tiny"
    #: Stochastic depth; null picks the paper's rate for the model size.
    drop_path: float | None = None
    layer_scale_init: float = 1e-6

    def validate(self) -> None:
        super().validate()
        cfglib.require(self.layer_scale_init >= 0, "layer_scale_init", ">= 0",
                       self.layer_scale_init)

    @property
    def drop_path_rate(self) -> float:
        return default_drop_path(self.model) if self.drop_path is None else self.drop_path

    def model_kwargs(self) -> dict[str, Any]:
        return {"ls_init_value": self.layer_scale_init} if self.model.startswith(
            "convnext") else {}
