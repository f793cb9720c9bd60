"""What every method module provides to the CLI, the trainer and the tuner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from raylab.runtime.options import RunOptions


def save_run_record(cfg: Any, summary: dict[str, Any], folder: Path) -> None:
    """The opening of every method's report: the folder, the resolved ``config.yaml`` and
    ``summary.json`` (each written atomically), before the method's own plots and
    ``report.md``."""
    from raylab import config as cfglib

    folder.mkdir(parents=True, exist_ok=True)
    cfglib.save_yaml(cfg, folder / "config.yaml")
    cfglib.atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2))


class Method:
    """A method: a config class, a driver-side ``train``, a Tune trial and a search space.

    Subclasses set the class attributes and implement the methods; they wire models,
    losses, transforms and metrics together and do not re-implement them.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type]
    #: The metric Tune optimises and its direction.
    metric: ClassVar[str]
    mode: ClassVar[str]
    #: Default search space: dotted config key -> spec text (see raylab.runtime.tuner).
    default_space: ClassVar[dict[str, str]] = {}
    #: Config keys holding file paths: made absolute before Ray starts (workers do not
    #: share the driver's working directory).
    path_keys: ClassVar[tuple[str, ...]] = ("data",)

    def check(self, cfg: Any) -> None:
        """Validate the config against the data before Ray starts (cheap reads only)."""

    def max_epochs(self, cfg: Any) -> int:
        """The length of a run on Tune's time axis (the reported ``epoch``): ASHA's max_t."""
        return int(cfg.optim.epochs)

    def train(self, cfg: Any, options: RunOptions, storage: str, experiment: str
              ) -> dict[str, Any]:
        """Train and evaluate as the config says; returns the summary written to disk."""
        raise NotImplementedError

    def print_summary(self, summary: dict[str, Any]) -> None:
        """Print the result of :meth:`train` for a person; the default is JSON."""
        import json

        print(json.dumps(summary, indent=2, default=str))

    def tune_trial(self, cfg: Any, options: RunOptions, storage: str, run_name: str,
                   callbacks: list[Any]) -> None:
        """One Tune trial: fit a TorchTrainer that reports ``metric`` every epoch."""
        raise NotImplementedError
