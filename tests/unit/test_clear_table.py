"""raylab clear-table: grouping, mean and sample std over seeds, paper row order, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylab.cli import main
from raylab.methods.clear.table import build_table, find_summaries, format_markdown

KEYS = ("in_domain", "next_domain", "accuracy", "backward_transfer", "forward_transfer")


def _write(root: Path, name: str, row: str, protocol: str, seed: int, value: float,
           features: bool = False) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    summary = {"method": "clear", "row": row, "protocol": protocol, "features": features,
               "seed": seed, "metrics": {k: value + 0.01 * i for i, k in enumerate(KEYS)}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_table_groups_seeds_and_orders_rows(tmp_path: Path) -> None:
    _write(tmp_path, "er-iid-0", "ER", "iid", 0, 0.50)
    _write(tmp_path, "er-iid-1", "ER", "iid", 1, 0.60)
    _write(tmp_path, "er-str-0", "ER", "streaming", 0, 0.40)
    _write(tmp_path, "ft-iid-0", "Finetuning (reservoir)", "iid", 0, 0.30)
    _write(tmp_path, "er-feat", "ER", "iid", 0, 0.70, features=True)
    (tmp_path / "not-clear").mkdir()
    (tmp_path / "not-clear" / "summary.json").write_text('{"method": "skill"}')
    table = build_table([json.loads(p.read_text()) | {"source": str(p)}
                         for p in find_summaries([tmp_path])])
    assert [(e["row"], e["backbone"]) for e in table] == [
        ("Finetuning (reservoir)", "from scratch"), ("ER", "from scratch"),
        ("ER", "frozen features")]
    er = table[1]["cells"]
    assert er["IID in-domain"]["mean"] == pytest.approx(0.55)
    assert er["IID in-domain"]["std"] == pytest.approx(0.0707107, abs=1e-6)  # n-1
    assert er["IID in-domain"]["seeds"] == [0, 1]
    assert er["IID FwT"]["mean"] == pytest.approx(0.59)
    assert er["streaming next-domain"] == {"mean": pytest.approx(0.41), "std": None, "n": 1,
                                           "seeds": [0]}
    assert "streaming next-domain" not in table[0]["cells"]
    text = format_markdown(table)
    assert "| ER | from scratch | 55.0 ± 7.1 | 56.0 ± 7.1 |" in text
    assert "| Finetuning (reservoir) | from scratch | 30.0 |" in text
    assert text.splitlines()[2].endswith("| - |")  # no streaming run for that row


def test_cli_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "runs", "a", "GDumb", "iid", 0, 0.25)
    out = tmp_path / "table.md"
    assert main(["clear-table", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "| GDumb | from scratch | 25.0 |" in capsys.readouterr().out
    assert "| GDumb |" in out.read_text()


@pytest.mark.parametrize("layout", ["missing", "no-runs", "broken"])
def test_cli_errors_name_the_folder(layout: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "exp"
    if layout != "missing":
        target.mkdir()
    if layout == "broken":
        (target / "summary.json").write_text('{"method": "clear", "row": "ER"}')
    assert main(["clear-table", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err and "Traceback" not in err
