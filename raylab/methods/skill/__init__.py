"""Surgical skill assessment on JIGSAWS kinematics (Wang & Majewicz Fey 2018).

- :mod:`.config`: :class:`SkillConfig` (the paper's recipe as defaults);
- :mod:`.data`: trials, folds, z-norm statistics and window datasets on the driver;
- :mod:`.task`: SkillNet training and evaluation on a worker (the engine's hooks);
- :mod:`.method`: :class:`SkillMethod`, folds -> runs -> the pooled report;
- :mod:`.assess`: ``raylab assess``, online assessment of one recording.
"""

from raylab.methods.skill.config import CLASS_NAMES, SkillConfig
from raylab.methods.skill.method import SkillMethod

__all__ = ["CLASS_NAMES", "SkillConfig", "SkillMethod"]
