"""Provenance: one answer to "are these frames synthetic?", the same in training, LOIO and certification."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from painwatch.cli import main
from painwatch.data import is_synthetic, load_records, make_demo_dataset
from painwatch.data.synthetic import README_MARKER
from painwatch.evaluation.certify import run_certification
from painwatch.evaluation.loio import run_loio
from painwatch.evaluation.settings import CertifySettings, LoioSettings
from painwatch.models import read_metadata
from painwatch.training import TrainConfig

ARCH, SIZE = "test_resnet", 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three data sources holding the same drawn frames, told apart only by their provenance marks."""
    root = tmp_path_factory.mktemp("provenance")
    demo = make_demo_dataset(root / "demo", individuals=3, frames_per_class=2, image_size=48).parent
    records = load_records(demo)

    marked = root / "marked"  # folder layout with the generator's README, no manifest
    shutil.copytree(demo, marked, ignore=shutil.ignore_patterns("manifest.csv"))
    assert README_MARKER in (marked / "README.md").read_text(encoding="utf-8")

    plain = root / "plain"  # folder layout, nothing says synthetic
    shutil.copytree(demo, plain, ignore=shutil.ignore_patterns("manifest.csv", "README.md"))

    later = root / "later" / "frames.csv"  # a manifest whose synthetic column is true only in the last row
    later.parent.mkdir()
    with open(later, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "individual", "label", " Synthetic "])
        for position, record in enumerate(records):
            flag = "TRUE" if position == len(records) - 1 else ("false" if position % 2 else "")
            writer.writerow([str(record.path), record.individual, record.label_name, flag])
    return {"marked": marked, "later": later, "plain": plain}


EXPECTED = {"marked": True, "later": True, "plain": False}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_is_synthetic_answers_by_readme_marker_or_any_manifest_row(
    sources: dict[str, Path], name: str
) -> None:
    source = sources[name]
    assert is_synthetic(source) is EXPECTED[name]
    if source.is_file():  # the manifest's folder gives the same answer only when it holds manifest.csv
        assert is_synthetic(source.parent) is False


def test_a_manifest_with_the_column_false_everywhere_is_not_synthetic(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,individual,label,synthetic\na.png,m1,pain,false\nb.png,m1,no_pain,0\n")
    assert is_synthetic(manifest) is False and is_synthetic(tmp_path) is False
    manifest.write_text("path,individual,label,synthetic\na.png,m1,pain,false\nb.png,m1,no_pain,yes\n")
    assert is_synthetic(manifest) is True and is_synthetic(tmp_path) is True


def test_a_missing_source_is_not_synthetic(tmp_path: Path) -> None:
    assert is_synthetic(tmp_path / "nowhere") is False


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_train_loio_and_certify_record_the_same_answer(
    sources: dict[str, Path], name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, expected = sources[name], EXPECTED[name]

    bundle = tmp_path / "bundle"
    train = ["train", str(source), "--out", str(bundle), "--arch", ARCH, "--input-size", str(SIZE)]
    assert main([*train, "--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--quiet"]) == 0
    assert read_metadata(bundle).training["synthetic_data"] is expected
    assert read_metadata(bundle).synthetic is expected

    settings = LoioSettings(
        data=str(source),
        out=str(tmp_path / "loio"),
        train=TrainConfig(arch=ARCH, input_size=SIZE, head_epochs=2, device="cpu"),
        cache_features=True,
        inner_val_individuals=1,
        bootstrap_reps=10,
        progress=False,
    )
    outcome = run_loio(settings, log=lambda _: None)
    assert outcome.complete and outcome.metrics["synthetic_data"] is expected

    run = run_certification(CertifySettings(
        bundle=bundle,
        data=source,
        out=tmp_path / "report",
        allow_overlap=True,
        n=100,
        noise_sigmas=(0.1,),
        noise_draws=2,
        bootstrap_reps=10,
        progress=False,
        write_bundle=False,
        main_method_only=True,
    ))
    assert run.report["data"]["synthetic"] is expected
    assert json.loads((tmp_path / "report" / "report.json").read_text())["data"]["synthetic"] is expected
    assert ("SYNTHETIC" in (tmp_path / "report" / "report.md").read_text()) is expected
    capsys.readouterr()
