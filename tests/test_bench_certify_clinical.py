"""The clinical certification benchmark on tiny settings: real certificates, real files, resume, limits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy.stats import norm

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_certify_clinical as bench  # noqa: E402

TINY = ["--toy", "--frames", "3", "--budget", "300", "--n0", "20", "--cohen-n", "3000", "--batch-size", "300"]


def test_toy_run_summary_and_black_box_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    summary, frames = result["summary"], result["frames"]
    sigma, alpha = summary["sigma"], summary["alpha"]
    assert len(frames) == summary["frames"] == 3
    assert summary["cohen_radius_cap"] == pytest.approx(sigma * norm.ppf(alpha ** (1 / 3000)))
    limit = norm.ppf(alpha ** (1 / 300)) / norm.ppf(alpha ** (1 / 3000))
    assert summary["black_box_limit_ratio"] == pytest.approx(limit)
    for frame in frames:
        for name in ("hard_fixed", "hard", "sharp", "soft", "cohen_budget"):
            entry = frame[name]
            assert entry["forward_passes"] <= 300
            if frame["cohen_at_cap"]:
                # No valid certificate from 300 draws can beat this on a frame Cohen certifies at his cap.
                assert entry["radius"] <= limit * frame["cohen"]["radius"] + 1e-9
        assert frame["cohen"]["forward_passes"] == 3100
    assert any(frame["cohen_at_cap"] for frame in frames)  # the toy's extreme frames saturate
    for name in ("hard_fixed", "hard", "sharp", "soft", "cohen_budget"):
        assert summary[name]["at_cohen_cap"]["frames"] + summary[name]["below_cohen_cap"]["frames"] == 3
        assert isinstance(summary[name]["target_met"], bool)
    printed = capsys.readouterr().out
    assert "| sharp | " in printed and "black-box limit" in printed
    assert (tmp_path / "bench.md").read_text().strip() in printed


def test_resume_keeps_frames_and_refuses_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--frames", "2", "--out", str(out)]) == 0
    first = json.loads(out.read_text())["frames"]
    partial = json.loads(out.read_text())
    partial["frames"] = first[:1]  # as if interrupted after the first frame
    del partial["summary"]
    out.write_text(json.dumps(partial))
    assert bench.main([*TINY, "--frames", "2", "--out", str(out), "--resume"]) == 0
    assert "resuming: 1 of 2 frames" in capsys.readouterr().out
    resumed = json.loads(out.read_text())["frames"]
    assert [f["frame"] for f in resumed] == [0, 1]
    assert resumed[1]["hard"]["radius"] == first[1]["hard"]["radius"]  # seeded per frame
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*TINY, "--frames", "2", "--alpha", "0.01", "--out", str(out), "--resume"])


def test_reused_reference_equals_a_fresh_one(tmp_path: Path) -> None:
    fresh, reused = tmp_path / "fresh.json", tmp_path / "reused.json"
    assert bench.main([*TINY, "--frames", "2", "--out", str(fresh)]) == 0
    assert bench.main([*TINY, "--frames", "2", "--out", str(reused), "--reuse-cohen", str(fresh)]) == 0
    first, second = json.loads(fresh.read_text()), json.loads(reused.read_text())
    assert second["settings"]["cohen_reused_from"] == str(fresh)
    for a, b in zip(first["frames"], second["frames"], strict=True):
        assert a["cohen"] == b["cohen"] and a["hard"]["radius"] == b["hard"]["radius"]
    other_alpha = [*TINY, "--frames", "2", "--alpha", "0.01", "--out", str(reused)]
    other_alpha += ["--reuse-cohen", str(fresh)]
    with pytest.raises(SystemExit, match="other alpha"):
        bench.main(other_alpha)


def test_bad_budget_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--toy", "--budget", "50", "--n0", "64", "--out", str(tmp_path / "x.json")])
    assert stopped.value.code == 2
