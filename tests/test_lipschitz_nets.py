"""Lipschitz networks for face crops end to end: the registry, sound bounds of whole PainNets, PGD
against their certificates, `painwatch train --arch lip-...` then one-pass certificates from the
Predictor, the margin losses, LOIO certified per fold, and what the bundle and the page say."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from painwatch.app import describe_cost, describe_radius
from painwatch.cli import main
from painwatch.inference import Predictor
from painwatch.models import (
    LIPSCHITZ_ARCHITECTURES,
    BundleError,
    BundleMetadata,
    create_model,
    default_certification,
    default_certification_method,
    load_bundle,
)
from painwatch.models.in_distribution import descriptor_pass
from painwatch.models.lipschitz_nets import build_lipschitz_network
from painwatch.robust import (
    Certificate,
    attack_certificates,
    certify_logits,
    lipschitz_certify,
    lipschitz_certify_batch,
    lipschitz_lower_estimate,
    lipschitz_upper_bound,
    network_classifier,
)
from painwatch.training import TrainConfig
from painwatch.training.config import LOSSES
from painwatch.training.loops import fit

SIZE = 32
SHAPE = (3, SIZE, SIZE)


def _images(count: int, seed: int) -> TensorDataset:
    """Frames whose class shows: pain frames carry a bright square in the middle."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = rng.uniform(0.1, 0.45, size=(count, *SHAPE))
    images[labels == 1, 0, 8:24, 8:24] = 0.95
    return TensorDataset(torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels))


def _config(**overrides) -> TrainConfig:
    settings = dict(arch="lip-sll-tiny", input_size=SIZE, epochs=4, batch_size=8, lr=5e-3, warmup_epochs=0,
                    device="cpu", patience=None, seed=0, augment=0.0, weight_decay=0.0)
    return TrainConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    model = create_model("lip-sll-tiny", input_size=SIZE, seed=0)
    return fit(model, _images(32, 0), None, config=_config(loss="mcr", margin=0.5), progress=False).model


def _write_folder(root: Path, individuals: int = 4, per_class: int = 3) -> Path:
    dataset = _images(individuals * 2 * per_class, 1)
    for index, (image, label) in enumerate(zip(dataset.tensors[0], dataset.tensors[1], strict=True)):
        folder = root / f"monkey{(index // 2) % individuals}" / ("pain" if int(label) else "no_pain")
        folder.mkdir(parents=True, exist_ok=True)
        array = (image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"f{index}.png")
    return root


# --- the registry and the networks -----------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(LIPSCHITZ_ARCHITECTURES))
def test_every_lipschitz_architecture_builds_and_is_soundly_bounded(arch: str) -> None:
    spec = LIPSCHITZ_ARCHITECTURES[arch]
    size = max(spec.reduction, 16)
    model = create_model(arch, input_size=size, seed=0).eval()
    assert model.is_lipschitz and model.num_features == spec.num_features(size)
    assert model(torch.rand(2, 3, size, size)).shape == (2, 2)
    stage = model.backbone.get_submodule(f"stage{len(spec.depths)}")
    assert model.gradcam_layer is stage[-1]
    bound = lipschitz_upper_bound(model, (3, size, size))
    # Normalisation by ImageNet's std (1 / 0.225) times layers that are all 1-Lipschitz.
    assert 0 < bound <= (1 / min(model.std)) * (1 + 1e-4)
    assert arch in TrainConfig.__dataclass_fields__["arch"].metadata["help"]


def test_the_bound_of_a_painnet_is_its_layers_product_and_holds(trained) -> None:
    model = trained.eval()
    bound = lipschitz_upper_bound(model, SHAPE)
    parts = [lipschitz_upper_bound(model.normalize, SHAPE),
             lipschitz_upper_bound(model.backbone, SHAPE),
             lipschitz_upper_bound(model.head, (model.num_features,))]
    assert parts[0] == pytest.approx(1 / min(model.std), rel=1e-5)
    assert bound == pytest.approx(math.prod(parts), rel=1e-9)
    assert lipschitz_lower_estimate(model, SHAPE, num_points=4, iterations=30) <= bound
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((16, *SHAPE), generator=generator)
    y = x + 0.05 * torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        moved = (model(x) - model(y)).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(moved.max()) <= bound
    x = torch.rand((3, *SHAPE), generator=generator)
    composed = model.head(model.backbone(model.normalize(x)))
    assert torch.allclose(model(x), composed)


def test_create_model_refuses_what_a_lipschitz_network_cannot_take(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="from scratch"):
        create_model("lip-sll-tiny", input_size=SIZE, pretrained=True)
    with pytest.raises(ValueError, match="from scratch"):
        create_model("lip-sll-tiny", input_size=SIZE, weights_path=tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="from scratch"):
        create_model("lip-sll-tiny", input_size=SIZE, drop_rate=0.1)
    with pytest.raises(ValueError, match="multiple of 8 pixels, got 36"):
        create_model("lip-sll-tiny", input_size=36)
    with pytest.raises(ValueError, match="lip-sll-small"):
        create_model("lip-sll-huge")
    with pytest.raises(ValueError, match="unknown Lipschitz architecture"):
        build_lipschitz_network("resnet50", input_size=64, in_chans=3, num_classes=2)


def test_pgd_at_099_r_never_flips_a_certified_frame(trained) -> None:
    model = trained.eval().requires_grad_(False)  # frozen: the derived weights are computed once
    bound = lipschitz_upper_bound(model, SHAPE)
    x = _images(12, 5).tensors[0]
    certificates = lipschitz_certify_batch(model, x, bound)
    attack = {"steps": 25, "restarts": 0, "generator": torch.Generator().manual_seed(0)}
    report = attack_certificates(model, network_classifier(model), x, certificates, **attack)
    assert report.num_attacked >= 10
    assert report.num_flipped == 0, f"certificates broken at {report.flipped}"
    inflated = [Certificate(c.prediction, 8 * c.radius, c.method, 0.0, 0, 0.0, c.bound) for c in certificates]
    control = attack_certificates(model, network_classifier(model), x, inflated, **attack)
    assert control.num_flipped > 0  # the attack does reach the boundary when allowed past the radius
    model.requires_grad_(True)


# --- training ---------------------------------------------------------------------------------------


def test_margin_losses_train_lipschitz_networks() -> None:
    data = _images(32, 2)
    for arch, loss in (("lip-sll-tiny", "mcr"), ("lip-sll-tiny", "offset_ce"), ("lip-aol-tiny", "mscr"),
                       ("lip-aol-tiny", "ce")):
        config = _config(arch=arch, loss=loss, noise_sigma=0.05 if loss == "mscr" else 0.0, epochs=5)
        result = fit(create_model(arch, input_size=SIZE, seed=0), data, None, config=config, progress=False)
        losses = [h["train_loss"] for h in result.history]
        assert losses[-1] < losses[0], (arch, loss, losses)
        assert result.history[-1]["train_accuracy"] >= 0.9, (arch, loss)


def test_mscr_needs_noise_and_moment_rules() -> None:
    assert {"mcr", "mscr"} <= set(LOSSES)
    with pytest.raises(ValueError, match="noise_sigma > 0"):
        TrainConfig(loss="mscr")
    with pytest.raises(ValueError, match=r"TrainConfig\.offset_temperature"):
        TrainConfig(loss="offset_ce", offset_temperature=0.0)
    TrainConfig(loss="mcr")  # the Lipschitz margin needs no noise
    model = create_model("lip-sll-tiny", input_size=SIZE, seed=0)
    with pytest.raises(TypeError, match="SLLConv2d"):
        fit(model, _images(8, 3), None, config=_config(loss="mscr", noise_sigma=0.05, epochs=1),
            progress=False)


# --- the bundle, the Predictor and the page -----------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lip")
    data = _write_folder(root / "data")
    out = root / "bundle"
    code = main(["train", str(data), "--out", str(out), "--arch", "lip-sll-tiny", "--input-size", str(SIZE),
                 "--epochs", "3", "--batch-size", "8", "--loss", "mcr", "--margin", "0.5", "--lr", "0.005",
                 "--val-fraction", "0.25", "--device", "cpu", "--quiet", "--augment", "0"])
    assert code == 0
    return out


def test_train_then_the_predictor_gives_one_pass_exact_certificates(bundle: Path) -> None:
    metadata = load_bundle(bundle).metadata
    assert metadata.architecture == "lip-sll-tiny" and metadata.training["loss"] == "mcr"
    assert metadata.certification.method == "lipschitz"
    predictor = Predictor.load(bundle)  # deployment: no seed, and none is needed
    recorded = metadata.certification.lipschitz_constant
    assert predictor.lipschitz_constant == pytest.approx(recorded, rel=1e-9)
    frames = [(image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
              for image in _images(4, 9).tensors[0]]
    results = predictor.predict(frames)
    for frame, result in zip(frames, results, strict=True):
        assert (result.method, result.forward_passes, result.alpha, result.sigma, result.n) == (
            "lipschitz", 1, 0.0, 0.0, 0)
        assert result.noise_seed is None and result.classifier.startswith("the network itself")
        x = predictor.preprocess(frame)
        # The certificate is the engine's (the fp32 network as it answers, in a pass of one row): equal to
        # the bound of model(x) up to float32 rounding of the batch layout.
        expected = lipschitz_certify(predictor.model, x, predictor.lipschitz_constant)
        assert result.class_index == expected.prediction
        assert result.radius == pytest.approx(expected.radius, rel=1e-6, abs=1e-9)
        assert sum(result.probabilities.values()) == pytest.approx(1.0)
    assert predictor.predict(frames) == results  # deterministic: no noise to draw
    saliency = predictor.saliency(frames[0])
    assert saliency.shape == frames[0].shape[:2] and float(saliency.max()) <= 1.0
    card = predictor.model_card()
    assert "exact (no noise, no error probability), from one forward pass" in card
    assert f"L = {recorded:.4g}" in card
    smoothed = Predictor.load(bundle, method="randomized_smoothing", n=100, seed=0)  # still possible
    assert smoothed.predict(frames[:1])[0].forward_passes > 100


def test_bundle_schema_records_the_lipschitz_bound() -> None:
    assert default_certification_method("lip-sll-small") == "lipschitz"
    assert default_certification_method("resnet50") == "randomized_smoothing"
    certification = default_certification(0.06, method="lipschitz") | {"lipschitz_constant": 4.5}
    content = {"format_version": 2, "architecture": "lip-sll-tiny", "num_classes": 2,
               "classes": ["no_pain", "pain"], "input_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
               "temperature": 1.0, "certification": certification, "training": {}, "versions": {},
               "weights_sha256": "0" * 64}
    metadata = BundleMetadata.from_dict(content)
    assert metadata.certification.lipschitz_constant == 4.5
    assert metadata.to_dict()["certification"]["lipschitz_constant"] == 4.5
    plain = BundleMetadata.from_dict(content | {"certification": default_certification(0.06)})
    assert "lipschitz_constant" not in plain.to_dict()["certification"]
    with pytest.raises(BundleError, match=r"certification\.lipschitz_constant"):
        BundleMetadata.from_dict(content | {"certification": certification | {"lipschitz_constant": -1}})


def test_the_page_says_what_a_one_pass_certificate_costs_and_guarantees(bundle: Path) -> None:
    result = Predictor.load(bundle).predict([np.full((40, 40, 3), 90, dtype=np.uint8)])[0]
    expected = "0.00 s for 1 frame(s): 0.004 s per frame (1 network evaluation each)."
    assert describe_cost([result], 0.004) == expected
    text = describe_radius(0.05, 0.1, method="lipschitz", alpha=0.0)
    assert "no sampling" in text and "one pass" in text and "0.05" in text
    assert describe_cost([], 0.0) == "No frame was analysed."


# --- LOIO ----------------------------------------------------------------------------------------------


def test_loio_with_a_lipschitz_network_reports_certified_accuracy_per_fold(tmp_path: Path) -> None:
    data = _write_folder(tmp_path / "data", individuals=3, per_class=2)
    out = tmp_path / "run"
    code = main(["loio", str(data), "--out", str(out), "--arch", "lip-sll-tiny", "--input-size", str(SIZE),
                 "--epochs", "2", "--batch-size", "4", "--loss", "mcr", "--inner-val-individuals", "1",
                 "--device", "cpu", "--quiet", "--bootstrap-reps", "20", "--augment", "0"])
    assert code == 0
    gate_radius = 0.1 / 255 * math.sqrt(3 * SIZE * SIZE)
    for fold in range(3):
        result = json.loads((out / "folds" / f"fold_{fold:02d}" / "result.json").read_text())
        certificates = result["lipschitz"]
        model = load_bundle(out / "folds" / f"fold_{fold:02d}" / "model").model
        assert certificates["lipschitz_constant"] == pytest.approx(lipschitz_upper_bound(model, SHAPE))
        assert certificates["gate_radii"] == [pytest.approx(gate_radius)]
        logits = torch.tensor(result["test_logits"])
        margins = logits.max(1).values - logits.min(1).values
        radii = margins / (math.sqrt(2) * certificates["lipschitz_constant"])
        assert certificates["radii"] == pytest.approx(radii.tolist(), rel=1e-5)
        assert certificates["forward_passes_per_frame"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["lipschitz_certified_accuracy"]) == {f"{gate_radius:.4g}"}
    assert "Lipschitz L" in metrics["folds"][0]
    report = (out / "report.md").read_text()
    assert "Certified accuracy (Lipschitz margin, one forward pass per frame" in report


# --- with an in-distribution check -------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lipschitz bundle whose inner-validation individual has enough frames (20) for a check."""
    root = tmp_path_factory.mktemp("lip-checked")
    data = _write_folder(root / "data", individuals=5, per_class=10)
    out = root / "bundle"
    code = main(["train", str(data), "--out", str(out), "--arch", "lip-sll-tiny", "--input-size", str(SIZE),
                 "--epochs", "2", "--batch-size", "16", "--loss", "mcr", "--margin", "0.5", "--lr", "0.005",
                 "--val-fraction", "0.2", "--device", "cpu", "--quiet", "--augment", "0"])
    assert code == 0
    return out


def test_a_checked_lipschitz_bundle_scores_refuses_and_certifies_in_one_pass(checked_bundle: Path,
                                                                            monkeypatch) -> None:
    predictor = Predictor.load(checked_bundle)
    check = predictor.in_distribution
    assert check is not None  # the stages of the Lipschitz backbone give the descriptors
    assert any(layer.startswith("stage") for layer in check.spec.descriptors)
    frames = [(image.numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
              for image in _images(6, 11).tensors[0]]
    calls = []  # batches through the head of the engine's network: every pass ends there
    head = predictor.engine.network.head
    forward = head.forward
    monkeypatch.setattr(head, "forward", lambda x: calls.append(len(x)) or forward(x))
    results = predictor.predict(frames)
    assert calls == [1] * len(frames)  # one pass a frame: the score and the certificate from it
    for frame, result in zip(frames, results, strict=True):
        x = predictor.preprocess(frame)
        descriptors = descriptor_pass(predictor.model, x.unsqueeze(0), check.spec.descriptors)[1]
        score = float(check.scores(descriptors)[0])
        # the engine's copy (fp32, channels_last) computes the bundle's network up to float rounding
        assert result.in_distribution_score == pytest.approx(score, rel=1e-4, abs=1e-6)
        assert result.forward_passes == 1 and result.alpha == 0.0 and result.method == "lipschitz"
        if result.abstain_code is None:
            expected = lipschitz_certify(predictor.model, x, predictor.lipschitz_constant)
            assert result.class_index == expected.prediction
            assert result.radius == pytest.approx(expected.radius, rel=1e-6, abs=1e-9)
    # A frame the check refuses is refused after that same pass, with no certificate.
    monkeypatch.setattr(predictor, "refuses", lambda score: True)
    calls.clear()
    refused = predictor.predict(frames[:2])
    assert calls == [1, 1]
    assert [(r.abstain_code, r.radius, r.forward_passes) for r in refused] == [
        ("not_like_training_frames", 0.0, 1)] * 2


def test_certify_logits_gives_the_lipschitz_certificate_of_the_same_pass(trained) -> None:
    x = _images(1, 5).tensors[0][0]
    constant = lipschitz_upper_bound(trained, SHAPE)
    with torch.no_grad():
        logits = trained.eval()(x.unsqueeze(0))
    outcome = certify_logits("lipschitz", logits[0], lipschitz_constant=constant)
    assert outcome.certificate == lipschitz_certify(trained, x, constant)
    assert outcome.certificate.forward_passes == 1
    with pytest.raises(ValueError, match="cannot certify from clean logits alone; these can: lipschitz"):
        certify_logits("randomized_smoothing", logits[0])
    with pytest.raises(ValueError, match="needs lipschitz_constant"):
        certify_logits("lipschitz", logits[0])
    with pytest.raises(ValueError, match="logits of one image"):
        certify_logits("lipschitz", torch.zeros(2, 2), lipschitz_constant=constant)
    with pytest.raises(ValueError, match="finite"):
        certify_logits("lipschitz", torch.tensor([0.0, float("nan")]), lipschitz_constant=constant)
