"""`painwatch validate` and `painwatch demo-data` through painwatch.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from painwatch.cli import main


def test_demo_data_then_validate_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    code = main(
        [
            "demo-data",
            str(out),
            "--individuals",
            "2",
            "--frames-per-class",
            "3",
            "--seed",
            "4",
            "--size",
            "64",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "12 SYNTHETIC frames" in printed and "manifest.csv" in printed
    assert len(list(out.rglob("*.jpg"))) == 12

    assert main(["validate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no problems found" in printed
    assert "syn-m01" in printed and "syn-m02" in printed
    assert "12 of 12 frames usable from 2 individual(s)" in printed

    assert main(["validate", str(out / "manifest.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["usable_frames"] == 12
    assert report["counts"]["syn-m02"] == {"no_pain": 3, "pain": 3}

    # A second run into the same folder is refused without --overwrite, with a clear message.
    assert main(["demo-data", str(out), "--individuals", "1", "--frames-per-class", "1"]) == 2  # usage
    assert "--overwrite" in capsys.readouterr().err


def test_validate_reports_problems_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    (tmp_path / "bad.png").write_bytes(b"")
    manifest = tmp_path / "frames.csv"
    manifest.write_text("path,individual,label\na.png,m1,pain\nbad.png,m1,no_pain\ngone.png,m2,maybe\n")
    assert main(["validate", str(manifest)]) == 1
    printed = capsys.readouterr().out
    assert "frames.csv, row 3" not in printed  # problems are named by the frame file and the row
    assert "bad.png, row 3" in printed and "file is empty" in printed
    assert "gone.png, row 4" in printed and "unknown label 'maybe'" in printed
    assert "single_class_individual" in printed
    assert "1 of 3 frames usable" in printed and "FAILED" in printed
    assert main(["validate", str(tmp_path / "nowhere")]) == 1
    assert "no such folder" in capsys.readouterr().out


def test_help_lists_the_data_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    printed = capsys.readouterr().out
    assert "validate" in printed and "demo-data" in printed
