"""The SYNTHETIC demo set: layout, determinism, labelling, and that the pain cues are really drawn."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from painwatch.data import load_records, make_demo_dataset, read_image, validate_source
from painwatch.data.synthetic import CUES, README_MARKER, _individual_style, render_face


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(
        tmp_path_factory.mktemp("demo") / "out", individuals=3, frames_per_class=4, seed=11, image_size=96
    )


def test_layout_manifest_and_labelling(demo: Path) -> None:
    root = demo.parent
    assert demo.name == "manifest.csv"
    readme = (root / "README.md").read_text()
    assert readme.startswith(README_MARKER) and "SYNTHETIC" in readme and "not real macaques" in readme
    rows = list(csv.DictReader(demo.open()))
    assert len(rows) == 3 * 2 * 4
    assert {r["individual"] for r in rows} == {"syn-m01", "syn-m02", "syn-m03"}
    assert all(r["synthetic"] == "true" and Path(r["path"]).name.startswith("synthetic_") for r in rows)
    assert set(rows[0]) >= {"path", "individual", "label", "x0", "y0", "x1", "y1", "pain_intensity", *CUES}
    for row in rows:
        image = read_image(root / row["path"])
        assert image.shape == (96, 96, 3)
        assert Path(row["path"]).parts[:2] == (row["individual"], row["label"])
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        assert (x1 - x0) * (y1 - y0) < 96 * 96  # the face is a box inside a larger frame
        intensity = float(row["pain_intensity"])
        assert (0.35 <= intensity <= 1.0) if row["label"] == "pain" else (0.0 <= intensity <= 0.5)
    # The set passes validation as it is, both as a folder and through its manifest.
    report = validate_source(root)
    assert report.ok and report.layout == "manifest" and report.usable_frames == 24, report.format()
    assert len(load_records(demo)) == 24


def test_deterministic_for_a_seed(demo: Path, tmp_path: Path) -> None:
    again = make_demo_dataset(tmp_path / "again", individuals=3, frames_per_class=4, seed=11, image_size=96)
    assert _files(again.parent) == _files(demo.parent)
    # Frame k depends only on (seed, individual, class, k): more frames keep the first ones.
    more = make_demo_dataset(tmp_path / "more", individuals=2, frames_per_class=5, seed=11, image_size=96)
    first = "syn-m02/pain/synthetic_pain_003.jpg"
    assert (more.parent / first).read_bytes() == (demo.parent / first).read_bytes()
    other = make_demo_dataset(tmp_path / "other", individuals=1, frames_per_class=1, seed=12, image_size=96)
    name = "syn-m01/pain/synthetic_pain_000.jpg"
    assert (other.parent / name).read_bytes() != (demo.parent / name).read_bytes()


def test_refuses_to_overwrite_other_data(tmp_path: Path) -> None:
    out = tmp_path / "set"
    make_demo_dataset(out, individuals=1, frames_per_class=1, image_size=64)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_demo_dataset(out, individuals=1, frames_per_class=1, image_size=64)
    manifest = make_demo_dataset(out, individuals=2, frames_per_class=1, image_size=64, overwrite=True)
    assert len(list(csv.DictReader(manifest.open()))) == 4
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a painwatch demo set"):
        make_demo_dataset(precious, individuals=1, frames_per_class=1, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="individuals"):
        make_demo_dataset(tmp_path / "x", individuals=0)
    with pytest.raises(ValueError, match="image_size"):
        make_demo_dataset(tmp_path / "x", image_size=8)


def test_pain_cues_change_the_drawn_face() -> None:
    style = _individual_style("syn-test", np.random.default_rng(5))
    relaxed, relaxed_alpha = render_face(style, dict.fromkeys(CUES, 0.0), np.random.default_rng(0))
    grimace, grimace_alpha = render_face(style, dict.fromkeys(CUES, 1.0), np.random.default_rng(0))
    eye_band = (slice(100, 132), slice(70, 186))
    dark = lambda image: int((image[eye_band].max(axis=2) < 45).sum())  # noqa: E731 - eye fill and pupils
    assert dark(grimace) < 0.6 * dark(relaxed)  # orbital tightening closes the eyes
    assert grimace_alpha.sum() < relaxed_alpha.sum()  # flattened ears show less of themselves
    brow_band = (slice(92, 112), slice(90, 166))
    assert np.abs(grimace[brow_band] - relaxed[brow_band]).mean() > 5  # brows lowered, furrows
    mouth_band = (slice(176, 200), slice(100, 156))
    assert np.abs(grimace[mouth_band] - relaxed[mouth_band]).mean() > 3  # tense lips
    # Each cue alone changes its own region.
    only_ears, _ = render_face(style, {**dict.fromkeys(CUES, 0.0), "ears": 1.0}, np.random.default_rng(0))
    np.testing.assert_array_equal(only_ears[eye_band], relaxed[eye_band])


def test_cues_survive_the_demo_models_64_px_input() -> None:
    """The demo model sees faces at 64 px: a full grimace must still change a sizeable part of the
    picture there (the earlier, smaller eyes and mouth changed ~350-420 pixels and a from-scratch
    network stayed at chance on held-out individuals)."""
    import cv2

    for seed in range(6):
        style = _individual_style("syn-test", np.random.default_rng(seed))
        relaxed, _ = render_face(style, dict.fromkeys(CUES, 0.0), np.random.default_rng(0))
        grimace, _ = render_face(style, dict.fromkeys(CUES, 1.0), np.random.default_rng(0))
        small = [cv2.resize(face, (64, 64), interpolation=cv2.INTER_AREA) for face in (relaxed, grimace)]
        changed = int((np.abs(small[1] - small[0]).max(axis=2) > 20).sum())
        assert changed > 450, f"style seed {seed}: only {changed} of 4096 pixels show the grimace at 64 px"


def test_classes_differ_by_cues_not_by_photography(demo: Path) -> None:
    """Brightness and colour, which lighting randomises for both classes alike, must not give the
    class away: the class means differ by well under one standard deviation."""
    big = make_demo_dataset(
        demo.parent.parent / "stats", individuals=4, frames_per_class=12, seed=2, image_size=64
    )
    rows = list(csv.DictReader(big.open()))
    means = {0: [], 1: []}
    for row in rows:
        means[int(row["label"] == "pain")].append(read_image(big.parent / row["path"]).mean(axis=(0, 1)))
    no_pain, pain = np.array(means[0]), np.array(means[1])
    pooled = np.sqrt((no_pain.var(axis=0) + pain.var(axis=0)) / 2)
    assert np.all(np.abs(no_pain.mean(axis=0) - pain.mean(axis=0)) < 0.5 * pooled)


@pytest.mark.slow
def test_demo_set_is_learnable_from_the_face_but_not_from_colour(tmp_path: Path) -> None:
    """Leave-one-individual-out on the demo set: a ridge classifier on HOG features of the face crop beats
    chance clearly, one on global colour statistics does not (the cues carry the label)."""
    cv2 = pytest.importorskip("cv2")
    feature = pytest.importorskip("skimage.feature")
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from painwatch.data import load_frame

    records = load_records(make_demo_dataset(tmp_path / "demo", individuals=10, frames_per_class=20, seed=3))
    shapes, colours, labels, groups = [], [], [], []
    for record in records:
        face = cv2.resize(load_frame(record, margin=0.05), (64, 64), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(face, cv2.COLOR_RGB2GRAY)
        shapes.append(feature.hog(grey, pixels_per_cell=(16, 16), cells_per_block=(2, 2)))
        pixels = face.reshape(-1, 3).astype(float)
        colours.append(np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)]))
        labels.append(record.label)
        groups.append(record.individual)
    labels = np.array(labels)

    def loio_accuracy(features: list[np.ndarray], alpha: float) -> float:
        model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=alpha))
        predicted = cross_val_predict(model, np.array(features), labels, groups=groups, cv=LeaveOneGroupOut())
        return float((predicted == labels).mean())

    assert loio_accuracy(shapes, 100.0) > 0.65
    assert loio_accuracy(colours, 1.0) < 0.6
