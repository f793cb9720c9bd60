"""Continual learning on a stream of buckets (CLEAR, Lin et al. 2021): pure torch/numpy.

``buffers``: replay buffers of row ids (numpy only, for the stream actor).
``strategies``: Finetune, ER, EWC, SI, LwF, AGEM, GDumb, CWR* on a small hook interface.
``loop``: :func:`train_bucket` and :func:`evaluate`, the one loop every strategy runs on.
The metrics of the accuracy matrix are in :mod:`raylab.metrics.continual`.

Names are loaded on first use, so that the actor can import the buffers without torch.
"""

from typing import Any

_BUFFERS = ("BUFFERS", "BiasedReservoirBuffer", "ClassBalancedBuffer", "ReplayBuffer",
            "ReservoirBuffer", "buffer_from_state", "build_buffer")
_STRATEGIES = ("STRATEGIES", "Bucket", "Strategy", "build_strategy", "strategy_defaults")
_LOOP = ("count_correct", "evaluate", "train_bucket")

__all__ = list(_BUFFERS + _STRATEGIES + _LOOP)


# Submodules load on first use (see above): the stream actor imports buffers without torch.
def __getattr__(name: str) -> Any:
    if name in _BUFFERS:
        from raylab.continual import buffers

        return getattr(buffers, name)
    if name in _STRATEGIES:
        from raylab.continual import strategies

        return getattr(strategies, name)
    if name in _LOOP:
        from raylab.continual import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
