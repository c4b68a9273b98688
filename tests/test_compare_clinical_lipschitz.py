"""The clinical comparison script on a tiny synthetic set: the same held-out individuals for both models,
real Predictors, the summary's keys and the files it writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from painwatch.data import load_records, make_demo_dataset
from painwatch.models import read_metadata
from painwatch.training import TrainConfig
from painwatch.training.bundle import train_bundle

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import compare_clinical_lipschitz as compare  # noqa: E402

SIZE = 32


def test_tiny_comparison_writes_the_summary_for_both_models(tmp_path: Path) -> None:
    manifest = make_demo_dataset(tmp_path / "demo", individuals=5, frames_per_class=2, image_size=48)
    records = load_records(manifest.parent)
    held_out = {"syn-m04", "syn-m05"}
    resnet = tmp_path / "resnet"
    config = TrainConfig(arch="test_resnet", input_size=SIZE, epochs=1, batch_size=8, noise_sigma=0.06,
                         device="cpu", patience=None, augment=0.0)
    train_bundle([r for r in records if r.individual not in held_out], config, resnet, progress=False)
    out, lipschitz = tmp_path / "results", tmp_path / "lipschitz"
    arguments = ["--data", str(manifest.parent), "--resnet", str(resnet), "--lipschitz", str(lipschitz),
                 "--out", str(out), "--arch", "lip-sll-tiny", "--epochs", "1", "--batch-size", "8",
                 "--max-frames", "3"]
    summary = compare.main(arguments)
    assert read_metadata(lipschitz).training["individuals"] == read_metadata(resnet).training["individuals"]
    assert set(summary["setup"]["held_out_individuals"]) == held_out and summary["setup"]["frames"] == 3
    assert summary["setup"]["gate_radius"] == pytest.approx(0.1 / 255 * math.sqrt(3 * SIZE * SIZE))
    for key, passes in (("lipschitz", 1), ("smoothing", 1001)):
        entry = summary[key]
        for name in ("clean_accuracy", "certified_accuracy_at_gate_radius", "seconds_per_frame",
                     "forward_passes_per_frame"):
            assert name in entry
        assert 0 <= entry["certified_accuracy_at_gate_radius"] <= entry["answer_accuracy"] <= 1
        assert entry["forward_passes_per_frame"] <= passes and entry["seconds_per_frame"] > 0
    assert summary["lipschitz"]["forward_passes_per_frame"] == 1
    assert summary["lipschitz"]["method"] == "lipschitz" and summary["smoothing"]["method"] != "lipschitz"
    assert json.loads((out / "summary.json").read_text())["goal"] == summary["goal"]
    assert (out / "certified_accuracy.png").stat().st_size > 0
    assert "| lip-sll-tiny | lipschitz |" in (out / "table.md").read_text()
    assert len(json.loads((out / "frames.json").read_text())["smoothing"]) == 3
    # One validation individual's 4 frames are too few to fit a check: neither model refuses, and says why.
    for key in ("lipschitz", "smoothing"):
        assert "frames are too few" in summary[key]["in_distribution_check"]
        assert summary[key]["refused_by_check"] == 0.0
    unchecked = compare.main([*arguments, "--no-check"])
    assert unchecked["smoothing"]["in_distribution_check"] == "none (--no-check)"
    # The existing Lipschitz bundle is reused when it was trained on the same individuals...
    assert compare.main(arguments)["lipschitz"]["weights_sha256"] == summary["lipschitz"]["weights_sha256"]
    # ...and so are a model's frame results kept in --cache, e.g. by --smoothing-only.
    cache = ["--cache", str(tmp_path / "cache")]
    assert compare.main([*arguments, *cache, "--smoothing-only"])["smoothing"]["from_cache"] is None
    cached = compare.main([*arguments, *cache])
    assert cached["smoothing"]["from_cache"] and cached["lipschitz"]["from_cache"] is None
    for name in ("clean_accuracy", "certified_accuracy_at_gate_radius", "curve"):  # seeded noise
        assert cached["smoothing"][name] == summary["smoothing"][name], name
    # ...and refused when it was not.
    other = tmp_path / "other"
    train_bundle([r for r in records if r.individual != "syn-m01"],
                 TrainConfig(arch="lip-sll-tiny", input_size=SIZE, epochs=1, device="cpu", patience=None),
                 other, progress=False)
    with pytest.raises(ValueError, match="--retrain"):
        compare.main([*arguments[:4], "--lipschitz", str(other), *arguments[6:]])
