"""`raylab data sample/convert/inspect` and `raylab methods` through the CLI (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from raylab.cli import main


def test_sample_convert_inspect_json(tmp_path: Path, capsys) -> None:
    assert main(["data", "sample", "jigsaws", str(tmp_path / "raw")]) == 0
    assert main(["data", "convert", "jigsaws", str(tmp_path / "raw"), str(tmp_path / "shards"),
                 "--tasks", "Suturing", "Knot_Tying"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "shards"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "jigsaws"
    # 8 subjects x 5 trials per task, one trial per task deliberately without a meta line.
    assert info["rows"] == 78
    assert set(info["counts"]) == {"Suturing", "Knot_Tying"}
    assert sum(sum(c.values()) for c in info["counts"].values()) == 78
    assert info["frames"] > 78 * 600 - 1
    assert main(["data", "inspect", str(tmp_path / "shards")]) == 0
    text = capsys.readouterr().out
    assert "Suturing" in text and "rows:" in text


def test_methods_lists_skill(capsys) -> None:
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.startswith("skill")
