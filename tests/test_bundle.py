"""Model bundles: round trip, atomic replacement, hash and schema checks with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from painwatch.models import (
    BundleError,
    GateVerdict,
    create_model,
    default_certification,
    load_bundle,
    read_metadata,
    record_gate_verdict,
    save_bundle,
    update_bundle_metadata,
)

ARCH = "test_resnet"
SIZE = 48



@pytest.fixture(scope="module")
def model():
    return create_model(ARCH, input_size=SIZE, seed=0).eval()


@pytest.fixture
def bundle(tmp_path: Path, model, bundle_factory) -> Path:
    training = {"individuals": ["ai", "bo"], "data_hash": "abc", "num_frames": 12, "loss": "ce",
                "noise_sigma": 0.25}
    return bundle_factory(tmp_path / "bundle", model=model, training=training, temperature=1.7)


def _edit_json(bundle: Path, edit) -> None:
    path = bundle / "model.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_round_trip_gives_identical_outputs(bundle: Path, model) -> None:
    loaded = load_bundle(bundle)
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.model(x), model(x))
    assert not loaded.model.training
    meta = loaded.metadata
    assert (meta.architecture, meta.num_classes, meta.input_size) == (ARCH, 2, SIZE)
    assert meta.classes == ("no_pain", "pain") and loaded.classes == ["no_pain", "pain"]
    assert meta.mean == pytest.approx([0.5] * 3) and meta.std == pytest.approx([0.5] * 3)
    assert loaded.temperature == pytest.approx(1.7)
    assert meta.training["individuals"] == ["ai", "bo"]
    assert meta.gates == {} and meta.latest_gate is None
    assert {"torch", "timm", "painwatch"} <= set(meta.versions)
    assert len(meta.weights_sha256) == 64
    assert meta.input_shape == (3, SIZE, SIZE)


def test_certification_defaults_follow_the_training_noise(bundle: Path) -> None:
    certification = read_metadata(bundle).certification
    # Cohen's votes, Clopper-Pearson over the whole budget (scripts/bench_certify_clinical.py)
    assert (certification.method, certification.bound) == ("randomized_smoothing", "fixed")
    assert certification.sigma == pytest.approx(0.25)  # the training noise_sigma
    assert (certification.alpha, certification.n0, certification.n) == (0.001, 64, 936)
    assert certification.score_temperature == 0.1  # sharpened soft scores, when soft is chosen
    assert certification.n0 + certification.n == 1000  # forward passes per frame at most
    assert set(certification.bounds) >= {"sigma", "alpha", "n"}
    assert default_certification()["sigma"] == pytest.approx(0.12)
    assert default_certification(2.0)["bounds"]["sigma"][1] >= 2.0


def test_tampered_weights_are_detected(bundle: Path) -> None:
    weights = bundle / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"weights\.safetensors.*SHA-256.*does not match"):
        load_bundle(bundle)


def test_missing_files_are_named(bundle: Path, tmp_path: Path) -> None:
    (bundle / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match=r"weights\.safetensors.*missing"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="not a painwatch model bundle"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_invalid_json_names_file_and_position(bundle: Path) -> None:
    (bundle / "model.json").write_text('{"format_version": 1,\n  "architecture": }')
    with pytest.raises(BundleError, match=r"model\.json.*not valid JSON \(line 2"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c.update(temperature="hot"), "'temperature'"),
        (lambda c: c.update(temperature=0), "'temperature'"),
        (lambda c: c.update(format_version=1), "'gate'"),  # format 1 needs its one gate entry
        (lambda c: c.update(format_version=99), "'format_version'"),
        (lambda c: c.update(classes=["no_pain"]), "'classes'"),
        (lambda c: c["certification"].update(sigma=-0.1), "'certification.sigma'"),
        (lambda c: c["certification"].update(sigma=5.0), "'certification.sigma'.*bounds"),
        (lambda c: c["certification"].update(method="magic"), "'certification.method'"),
        (lambda c: c["certification"].update(n=10.5), "'certification.n'"),
        (lambda c: c["certification"].update(bound="exact"), "'certification.bound'"),
        (lambda c: c["certification"].update(score_temperature=0), "'certification.score_temperature'"),
        (lambda c: c["certification"].update(score_temperature=3), "'certification.score_temperature'.*bou"),
        (lambda c: c["certification"]["bounds"].update(alpha=[0.1, 0.01]), "'certification.bounds.alpha'"),
        (lambda c: c["training"].update(individuals="ai"), "'training.individuals'"),
        (lambda c: c.update(gates={"default.toml": {"passed": "yes"}}), "'gates.default.toml.passed'"),
        (lambda c: c.update(gates=[]), "'gates'"),
        (lambda c: c.update(std=[0.5, 0.5]), "'std'"),
    ],
)
def test_schema_errors_name_the_file_and_key(bundle: Path, edit, key: str) -> None:
    _edit_json(bundle, edit)
    with pytest.raises(BundleError, match=rf"model\.json: key {key}"):
        load_bundle(bundle)


def test_json_normalisation_must_agree_with_the_weights(bundle: Path) -> None:
    _edit_json(bundle, lambda c: c.update(mean=[0.4, 0.5, 0.5]))
    with pytest.raises(BundleError, match=r"'mean'.*disagrees"):
        load_bundle(bundle)


def test_update_metadata_merges_and_validates(bundle: Path) -> None:
    merged = update_bundle_metadata(bundle, {"certification": {"sigma": 0.5}, "notes": {"site": "A"}})
    assert merged.certification.sigma == 0.5 and merged.certification.n == 936  # nested merge
    assert merged.extra == {"notes": {"site": "A"}}  # keys this version does not know are kept
    assert load_bundle(bundle).metadata.certification.sigma == 0.5  # hash still valid: weights untouched

    before = (bundle / "model.json").read_text()
    with pytest.raises(BundleError, match=r"'certification\.alpha'"):
        update_bundle_metadata(bundle, {"certification": {"alpha": 2.0}})
    with pytest.raises(BundleError, match="'architecture' describes the weights"):
        update_bundle_metadata(bundle, {"architecture": "resnet50"})
    assert (bundle / "model.json").read_text() == before, "a rejected update must leave model.json as it was"


def test_one_verdict_per_gate_file_is_kept(bundle: Path) -> None:
    strict = GateVerdict(gate_file="strict.toml", passed=False, date="2026-11-25T10:00:00+00:00",
                         results=({"name": "min_pain_recall", "passed": False, "value": 0.3},))
    default = GateVerdict(gate_file="default.toml", passed=True, date="2026-11-26T10:00:00+00:00")
    record_gate_verdict(bundle, strict)
    metadata = record_gate_verdict(bundle, default)
    assert set(metadata.gates) == {"strict.toml", "default.toml"}  # the later gate did not replace it
    assert metadata.gates["strict.toml"].passed is False and metadata.latest_gate.gate_file == "default.toml"
    again = record_gate_verdict(bundle, GateVerdict(gate_file="strict.toml", passed=True, date="2026-11-27"))
    assert again.gates["strict.toml"].passed is True and again.gates["default.toml"].passed is True
    assert load_bundle(bundle).metadata.gates == again.gates


def test_format_1_bundles_are_read_and_upgraded(bundle: Path) -> None:
    def to_format_1(content: dict) -> None:
        content["format_version"] = 1
        content.pop("gates")
        content["gate"] = {"passed": True, "thresholds": {"file": "/somewhere/strict.toml"}, "results": [],
                           "date": "2026-11-25", "held_out": True}
        content["certification"].pop("bound")
        content["certification"].pop("score_temperature")

    _edit_json(bundle, to_format_1)
    metadata = load_bundle(bundle).metadata
    assert list(metadata.gates) == ["strict.toml"] and metadata.gates["strict.toml"].held_out
    # Bundles written before these settings existed certify with the anytime bound and plain scores.
    assert (metadata.certification.bound, metadata.certification.score_temperature) == ("anytime", 1.0)
    assert metadata.to_dict()["format_version"] == 2 and "gate" not in metadata.to_dict()


def test_saving_over_a_bundle_replaces_it_and_leaves_no_temporaries(bundle: Path, model) -> None:
    other = create_model(ARCH, input_size=SIZE, seed=1)
    save_bundle(bundle, other, {"temperature": 2.0})
    loaded = load_bundle(bundle)
    assert torch.equal(loaded.model.head.weight, other.head.weight)
    assert loaded.temperature == 2.0
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]
    assert sorted(p.name for p in bundle.iterdir()) == ["model.json", "weights.safetensors"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(tmp_path: Path, model) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match=r"refusing to overwrite.*notes\.txt"):
        save_bundle(folder, model, {})
    assert (folder / "notes.txt").read_text() == "keep me"


def test_metadata_contradicting_the_model_is_rejected(tmp_path: Path, model) -> None:
    with pytest.raises(BundleError, match="'input_size'"):
        save_bundle(tmp_path / "b", model, {"input_size": 224})
    assert not (tmp_path / "b").exists()


def test_more_than_two_classes_need_class_names(tmp_path: Path) -> None:
    three = create_model(ARCH, num_classes=3, input_size=SIZE, seed=0)
    with pytest.raises(BundleError, match="'classes' is required"):
        save_bundle(tmp_path / "b", three, {})
    save_bundle(tmp_path / "b", three, {"classes": ["a", "b", "c"]})
    assert load_bundle(tmp_path / "b").model.num_classes == 3
