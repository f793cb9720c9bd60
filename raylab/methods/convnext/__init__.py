"""ConvNeXt with the paper's training recipe (Liu et al. 2022) on the classification task.

- :mod:`.config`: :class:`ConvNeXtConfig` (the paper's recipe as defaults);
- :mod:`.method`: :class:`ConvNeXtMethod`, the runs and the report.
"""

from raylab.methods.convnext.config import ConvNeXtConfig, default_drop_path
from raylab.methods.convnext.method import ConvNeXtMethod

__all__ = ["ConvNeXtConfig", "ConvNeXtMethod", "default_drop_path"]
