"""Metrics as standalone objects with ``update``/``result``/``reset`` (avalanche style).

``classification``: accuracy, per-class precision/recall/F1, confusion matrices and
per-trial majority votes. Counts are plain int64 arrays so that workers can sum them.
``knn``: DINO's weighted k-NN classifier and a linear probe on frozen features (torch;
loaded on first use, so that importing the numpy-only metrics stays free of torch).
``continual``: CLEAR's accuracy-matrix metrics and :class:`AccuracyMatrix` (numpy only).
"""

from typing import Any

_KNN = ("knn_accuracy", "knn_classify", "linear_probe")
_CONTINUAL = ("AccuracyMatrix", "clear_metrics")

__all__ = list(_KNN) + list(_CONTINUAL)


# Submodules load on first use (see above): the numpy-only metrics import without torch.
def __getattr__(name: str) -> Any:
    if name in _KNN:
        from raylab.metrics import knn

        return getattr(knn, name)
    if name in _CONTINUAL:
        from raylab.metrics import continual

        return getattr(continual, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
