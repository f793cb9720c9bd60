"""CLEAR continual learning (Lin et al. 2021): a stream actor and eight strategies.

- :mod:`.config`: :class:`ClearConfig`, the strategy and its knobs, bucket settings;
- :mod:`.task`: one learner on a worker, a bucket per epoch of the engine's loop;
- :mod:`.method`: :class:`ClearMethod`, the stream actor beside the run, the report;
- :mod:`.table`: ``raylab clear-table``, the paper's Table 1 from finished runs.
"""

from raylab.methods.clear.config import ClearConfig, make_strategy, row_label
from raylab.methods.clear.method import ClearMethod, load_stream

__all__ = ["ClearConfig", "ClearMethod", "load_stream", "make_strategy", "row_label"]
