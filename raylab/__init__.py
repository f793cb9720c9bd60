"""raylab: train, tune and evaluate 2022 computer-vision methods on a Ray cluster.

``raylab.train``, ``raylab.tune``, ``raylab.resume`` and ``raylab.analyze`` are the Python
API (:mod:`raylab.api`); they load on first use, so that ``import raylab`` (and the CLI's
start) stays free of torch and Ray.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("train", "tune", "resume", "analyze", "RunResult")


def __getattr__(name: str) -> Any:
    if name in _API:
        from raylab import api

        return getattr(api, name)
    raise AttributeError(f"module 'raylab' has no attribute {name!r}")


__all__ = ["__version__", *_API]
