"""Continual-learning strategies on one shared loop (pure torch, no Ray).

One small module per strategy; the hook interface is in :mod:`.base`. ``STRATEGIES`` maps
the config name to the class and :func:`build_strategy` builds one from config keywords.
The defaults are the CLEAR authors' settings (their ``train.py`` on avalanche) where they
ran the strategy, converted to the formulas documented in each module.
"""

from __future__ import annotations

import inspect
from typing import Any

from raylab.continual.strategies.agem import AGEM, project_gradient
from raylab.continual.strategies.base import Bucket, Strategy, unpack_batch
from raylab.continual.strategies.cwr import CWRStar, find_output_layer
from raylab.continual.strategies.ewc import EWC, fisher_diagonal
from raylab.continual.strategies.finetune import ER, Finetune
from raylab.continual.strategies.gdumb import GDumb
from raylab.continual.strategies.lwf import LwF, distillation_loss
from raylab.continual.strategies.si import SI
from raylab.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    "finetune": Finetune,
    "er": ER,
    "ewc": EWC,
    "si": SI,
    "lwf": LwF,
    "agem": AGEM,
    "gdumb": GDumb,
    "cwr": CWRStar,
}


def strategy_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters of strategy ``name`` with their default values.

    Raises:
        ConfigError: Unknown name.
    """
    cls = _lookup(name)
    return {p.name: p.default for p in inspect.signature(cls).parameters.values()}


def _lookup(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown continual-learning strategy {name!r}; choose one of "
                          f"{sorted(STRATEGIES)}")
    return STRATEGIES[name]


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """The strategy registered as ``name``, e.g. ``build_strategy("ewc", ewc_lambda=0.1)``.

    Raises:
        ConfigError: Unknown name, a keyword the strategy does not take (the accepted
            ones are listed), or a value out of range.
    """
    cls = _lookup(name)
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"strategy {name!r} does not take {unknown}; its parameters are "
                          f"{accepted or 'none'}")
    return cls(**kwargs)


__all__ = [
    "AGEM", "CWRStar", "ER", "EWC", "SI", "STRATEGIES", "Bucket", "Finetune", "GDumb", "LwF",
    "Strategy", "build_strategy", "distillation_loss", "find_output_layer", "fisher_diagonal",
    "project_gradient", "strategy_defaults", "unpack_batch",
]
