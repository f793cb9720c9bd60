"""Names shared between the driver, the workers and the reports.

A metric is reported as ``<split>_<name>``: ``test_accuracy`` in a training run's final
evaluation, ``val_accuracy`` in a Tune trial (validation rows held out of the training
data; the test rows never reach Tune), ``train_loss`` for the training steps.
"""

from __future__ import annotations

TRAIN = "train"
#: Held out of the training data for Tune's metric.
VAL = "val"
#: The final evaluation of ``raylab train``.
TEST = "test"
#: The run folder of a method with one Train run per experiment.
RUN = "run"
#: The Train run holding the checkpoints when one Train run trains several runs (e.g. the
#: folds of a cross-validation); each run's metrics and model stay in its own folder.
RUNS = "runs"
#: Dataset names: what the workers train on, and what they evaluate (the split's name).
TRAIN_DATASET = TRAIN


def metric_key(split: str, name: str) -> str:
    """``metric_key("val", "accuracy") == "val_accuracy"``."""
    return f"{split}_{name}"


#: Rows scored by an evaluation (``<split>_rows``): compared with the split's size, so a
#: row dropped or scored twice by the data split between workers is caught.
ROWS = "rows"
