"""Frozen-backbone reuse with residual adapters (Vasconcelos et al. 2022; Rebuffi et al.
2017/2018) on the classification task.

- :mod:`.config`: :class:`ReuseConfig` (the checkpoint, freeze mode, adapters, a transfer
  recipe);
- :mod:`.models`: the saved network rebuilt, its new head, adapters and freezing;
- :mod:`.task`: :class:`ReuseTask`, the classification task on that network;
- :mod:`.method`: :class:`ReuseMethod`, the run and its report.

Detection reuses a backbone through the detection method's own keys (``freeze``,
``adapters``, ``fpn_layers``, ``head_convs``; :mod:`raylab.models.detection`).
"""

from raylab.methods.reuse.config import ReuseConfig
from raylab.methods.reuse.method import ReuseMethod

__all__ = ["ReuseConfig", "ReuseMethod"]
