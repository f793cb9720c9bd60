"""`raylab analyze EXP`: a Tune experiment as a table, its best config, plots and a report.

Reads the experiment with Ray Tune's own ``ExperimentAnalysis`` (so any Tune experiment
folder written by raylab works, local or copied from a cluster) plus ``raylab_tune.json``
for the method, metric and searched keys.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import ExperimentAnalysis

from raylab import config as cfglib
from raylab.data import fs
from raylab.errors import ConfigError
from raylab.runtime.tuner import load_spec


def _best(values: list[float], mode: str) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return float("nan")
    return max(clean) if mode == "max" else min(clean)


def collect(experiment_dir: str | Path) -> dict[str, Any]:
    """Per-trial rows (config knobs, best/last metric, epochs, checkpoint) and histories."""
    experiment_dir = (os.fspath(experiment_dir) if fs.is_uri(experiment_dir)
                      else Path(experiment_dir).resolve())
    spec = load_spec(experiment_dir)
    metric, mode = spec["metric"], spec["mode"]
    knobs = [d["key"] for d in spec["space"] if d["kind"] != "fixed"]
    try:
        analysis = ExperimentAnalysis(str(experiment_dir), default_metric=metric,
                                      default_mode=mode)
    except Exception as exc:  # Tune raises several types for a folder it cannot read
        raise ConfigError(f"{experiment_dir}: cannot read the Tune experiment ({exc})") from None
    frames = analysis.trial_dataframes
    rows, curves = [], {}
    for trial in analysis.trials:
        df = frames.get(trial.trial_id, frames.get(trial.path))
        history = [] if df is None or df.empty else df.to_dict("records")
        values = [h.get(metric) for h in history]
        checkpoints = [fs.as_uri(str(h["checkpoint_path"]), experiment_dir)
                       for h in history if h.get("checkpoint_path")]
        epochs = [h.get("epoch") for h in history]
        if history:
            curves[trial.trial_id] = (epochs, values)
        row = {"trial": trial.trial_id, "status": trial.status}
        row.update({k: trial.config.get(k) for k in knobs})
        row.update({
            metric: _best(values, mode),
            f"last_{metric}": values[-1] if values else float("nan"),
            "epochs": int(epochs[-1]) if epochs and epochs[-1] is not None else 0,
            "checkpoint": checkpoints[-1] if checkpoints else None,
        })
        rows.append(row)
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (math.isnan(r[metric]), sign * (0 if math.isnan(r[metric])
                                                           else r[metric])))
    best = rows[0] if rows and not math.isnan(rows[0][metric]) else None
    best_config = None
    if best is not None:
        overrides = {k: best[k] for k in knobs}
        best_config = cfglib.flatten(spec["base_config"]) | overrides
    return {"spec": spec, "metric": metric, "mode": mode, "knobs": knobs, "rows": rows,
            "curves": curves, "best": best, "best_config": best_config,
            "experiment": str(experiment_dir)}


def format_table(result: dict[str, Any]) -> str:
    metric, knobs = result["metric"], result["knobs"]
    headers = ["trial", "status", *knobs, metric, "epochs"]
    lines = [headers]
    for r in result["rows"]:
        lines.append([str(r["trial"]), str(r["status"]), *(_fmt(r[k]) for k in knobs),
                      _fmt(r[metric]), str(r["epochs"])])
    widths = [max(len(row[i]) for row in lines) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_report(result: dict[str, Any], out: Path | None = None) -> Path | str:
    """Plots (metric vs each knob, learning curves), analysis.json and report.md in
    ``out`` (default ``<experiment>/analysis``, uploaded there when the experiment is in
    object storage); returns that folder."""
    # matplotlib (raylab.plots) only when figures are drawn: its import costs seconds.
    from raylab.plots import plot_learning_curves, plot_metric_vs_knobs

    if out is None and fs.is_uri(result["experiment"]):
        remote = fs.join(result["experiment"], "analysis")
        with tempfile.TemporaryDirectory(prefix="raylab-analysis-") as tmp:
            write_report(result, Path(tmp))
            fs.upload_tree(tmp, remote)
        return remote
    out = Path(out or Path(result["experiment"]) / "analysis")
    out.mkdir(parents=True, exist_ok=True)
    metric, knobs = result["metric"], result["knobs"]
    finite = [r for r in result["rows"] if not math.isnan(r[metric])]
    if finite and knobs:
        plot_metric_vs_knobs(finite, knobs, metric, out / "metric_vs_knobs.png")
    if result["curves"]:
        plot_learning_curves(result["curves"], metric, out / "learning_curves.png")
    clean = {k: v for k, v in result.items() if k != "curves"}
    cfglib.atomic_write_text(out / "analysis.json", json.dumps(clean, indent=2, default=str))
    spec = result["spec"]
    best = result["best"]
    lines = [
        f"# Tune experiment `{spec['experiment']}` ({spec['method']})",
        "",
        f"{len(result['rows'])} trials; metric `{metric}` ({result['mode']}); "
        f"search: " + ", ".join(f"`{d['key']}` {d['kind']} {d['values']}"
                                for d in spec["space"]),
        "",
        "```",
        format_table(result),
        "```",
        "",
    ]
    if best is not None:
        lines += [f"**Best trial** `{best['trial']}`: {metric} = {best[metric]:.4f}",
                  "", "Re-run it as a plain training run:", "", "```",
                  f"raylab train {spec['method']} "
                  + " ".join(f"--set {k}={json.dumps(best[k])}" for k in result["knobs"]),
                  "```", "", f"Best checkpoint: `{best['checkpoint']}`", ""]
    if (out / "metric_vs_knobs.png").exists():
        lines += ["![metric vs knobs](metric_vs_knobs.png)", ""]
    if (out / "learning_curves.png").exists():
        lines += ["![learning curves](learning_curves.png)", ""]
    cfglib.atomic_write_text(out / "report.md", "\n".join(lines))
    return out
