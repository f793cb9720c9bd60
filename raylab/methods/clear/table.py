"""The CLEAR paper's Table 1 from finished runs (``raylab clear-table EXP...``); json + numpy.

Rows are strategies (split by backbone: from scratch, or frozen features); columns are the
five metrics of the IID protocol (in-domain, next-domain, accuracy, backward and forward
transfer) and the streaming protocol's next-domain accuracy. Runs of the same row and
protocol with different seeds are averaged; the spread is the sample standard deviation
(``n - 1``), shown when there are several seeds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from raylab.errors import DataError

COLUMNS = (("iid", "in_domain", "IID in-domain"), ("iid", "next_domain", "IID next-domain"),
           ("iid", "accuracy", "IID accuracy"), ("iid", "backward_transfer", "IID BwT"),
           ("iid", "forward_transfer", "IID FwT"),
           ("streaming", "next_domain", "streaming next-domain"))
#: The paper's row order.
ROW_ORDER = ("Finetuning", "Finetuning (reservoir)", "Finetuning (biased reservoir)", "ER",
             "EWC", "SI", "LwF", "AGEM", "GDumb", "CWR*")


def find_summaries(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``summary.json`` files of CLEAR runs: each path is a run folder, or a folder whose
    sub-folders (any depth) hold runs.

    Raises:
        DataError: A path does not exist or holds no CLEAR run.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError("no such folder; expected a CLEAR run folder (with summary.json) "
                            "or a folder of runs", path=p)
        candidates = [p / "summary.json"] if (p / "summary.json").is_file() else sorted(
            p.rglob("summary.json"))
        runs = [c for c in candidates if _is_clear(c)]
        if not runs:
            raise DataError("holds no CLEAR run (no summary.json with method 'clear')", path=p)
        found += runs
    return found


def _is_clear(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("method") == "clear"
    except (OSError, ValueError, AttributeError):
        return False


def load_summaries(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The summaries, each checked for the keys the table needs."""
    out = []
    for path in paths:
        try:
            summary = json.loads(path.read_text())
            metrics = summary["metrics"]
            _ = summary["row"], summary["protocol"], summary["features"], summary["seed"]
            [float(metrics[key]) for _, key, _ in COLUMNS]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"not a finished CLEAR run summary ({exc!r})", path=path) from None
        out.append(dict(summary, source=str(path)))
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def build_table(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (row, backbone): ``{"row", "backbone", "cells": {column label:
    {"mean", "std", "n", "seeds"}}}``, in the paper's row order, from-scratch first."""
    groups: dict[tuple[str, bool], dict[str, list[tuple[int, float]]]] = {}
    for s in summaries:
        cells = groups.setdefault((s["row"], bool(s["features"])), {})
        for protocol, key, label in COLUMNS:
            if s["protocol"] == protocol:
                cells.setdefault(label, []).append((int(s["seed"]), float(s["metrics"][key])))
    order = {name: i for i, name in enumerate(ROW_ORDER)}
    table = []
    for (row, features), cells in sorted(groups.items(),
                                         key=lambda kv: (kv[0][1], order.get(kv[0][0], 99),
                                                         kv[0][0])):
        entry: dict[str, Any] = {"row": row,
                                 "backbone": "frozen features" if features else "from scratch",
                                 "cells": {}}
        for label, values in cells.items():
            mean, std = _mean_std([v for _, v in values])
            entry["cells"][label] = {"mean": mean, "std": std, "n": len(values),
                                     "seeds": sorted(seed for seed, _ in values)}
        table.append(entry)
    return table


def format_markdown(table: Sequence[dict[str, Any]], percent: bool = True) -> str:
    """The table as markdown: ``mean ± std`` per cell (percent by default), ``-`` if no run."""
    labels = [label for _, _, label in COLUMNS]
    lines = ["| strategy | backbone | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    scale = 100.0 if percent else 1.0
    for entry in table:
        cells = []
        for label in labels:
            cell = entry["cells"].get(label)
            if cell is None:
                cells.append("-")
                continue
            text = f"{scale * cell['mean']:.1f}" if percent else f"{cell['mean']:.4f}"
            if cell["std"] is not None:
                text += (f" ± {scale * cell['std']:.1f}" if percent else f" ± {cell['std']:.4f}")
            cells.append(text)
        lines.append(f"| {entry['row']} | {entry['backbone']} | " + " | ".join(cells) + " |")
    seeds = sorted({n for e in table for c in e["cells"].values() for n in [c["n"]]})
    lines.append("")
    lines.append(f"Mean ± sample std over seeds (runs per cell: {', '.join(map(str, seeds))})"
                 + (", in %." if percent else "."))
    return "\n".join(lines)


__all__ = ["COLUMNS", "build_table", "find_summaries", "format_markdown", "load_summaries"]
