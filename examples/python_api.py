"""raylab from Python: what a notebook does, as a script.

    python examples/python_api.py OUT [--data SHARDS] [--epochs 5] [--trials 4]

Writes a synthetic JIGSAWS-format sample (or takes your shard folder with --data), trains
the surgical-skill model, searches its window width with Ray Tune, and reads the search
back. Every call raises a ``raylab.errors.RaylabError`` on bad input, as the CLI would
print it. In a notebook, paste the body of ``main`` into cells.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import raylab
from raylab.data import jigsaws


def main(out: Path, data: Path | None = None, epochs: int = 5, trials: int = 4,
         workers: int = 1) -> dict:
    if data is None:  # the built-in sample: nothing to download
        jigsaws.write_sample(out / "raw", seed=0)
        jigsaws.convert_jigsaws(out / "raw", out / "shards", overwrite=True)
        data = out / "shards"

    # One training run: leave-one-supertrial-out cross-validation, evaluated on test rows.
    run = raylab.train("skill", data=data, overrides={"optim.epochs": epochs, "step": 10},
                       workers=workers, storage=out / "runs", name="skill")
    print(f"LOSO accuracy {run.summary['mean_accuracy']:.3f} +- {run.summary['std_accuracy']:.3f} "
          f"over {len(run.models)} folds")
    print(f"report {run.report}; models {sorted(run.models)}; "
          f"tensorboard --logdir {run.tensorboard}")

    # A search over the window width, scored on validation rows held out of training.
    grid = raylab.tune("skill", data=data, overrides={"optim.epochs": epochs, "step": 10},
                       space={"window": [30, 60]}, trials=trials, grace_period=1,
                       storage=out / "runs", name="skill-search")
    # scope="all": the trial with the best epoch, as `raylab analyze` ranks trials.
    best = grid.get_best_result(scope="all")
    print(f"best trial {best.metrics['trial_id']}: window={best.config['window']}, "
          f"last val_accuracy {best.metrics['val_accuracy']:.3f}")

    # The same table, report and plots `raylab analyze` gives.
    analysis = raylab.analyze(grid.experiment_path)
    print(f"{len(analysis['rows'])} trials; best window {analysis['best_config']['window']}; "
          f"report {analysis['report']}")
    return {"run": run, "grid": grid, "analysis": analysis}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1,
                        help="Train workers of the training run (0: in this process)")
    args = parser.parse_args()
    main(args.out, args.data, args.epochs, args.trials, args.workers)
