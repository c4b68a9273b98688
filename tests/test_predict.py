"""The Predictor (painwatch.predict): certificates, settings bounds, saliency, model card."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from painwatch.inference import ABSTAIN_LABEL, FrameResult, Predictor, SettingsError, frame_seed
from painwatch.models import (
    BundleError,
    GateVerdict,
    create_model,
    record_gate_verdict,
    save_bundle,
)
from painwatch.robust import (
    MonteCarloSurrogate,
    SmoothedClassifier,
    attack_certificates,
    monte_carlo_smoothed_classifier,
    sequential_certify,
    soft_smoothing_certify,
)

SIZE = 32


def _frames(level: float, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(level, 40, (36, 44, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def _centre(images: list[np.ndarray]) -> torch.Tensor:
    crops = [torch.from_numpy(i[2:34, 6:38].transpose(2, 0, 1).copy()) for i in images]
    return torch.stack(crops).float() / 255


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Path:
    """A tiny ResNet whose head separates dark (no_pain) from bright (pain) frames.

    The head is the class-mean difference of the backbone's features (no training loop needed), so
    predictions depend on the input and grey frames sit near the boundary.
    """
    model = create_model("test_resnet", num_classes=2, input_size=SIZE, seed=0).eval()
    with torch.no_grad():
        dark = model.features(_centre(_frames(70, 16, 0)))
        bright = model.features(_centre(_frames(180, 16, 1)))
        direction = bright.mean(0) - dark.mean(0)
        middle = (bright.mean(0) + dark.mean(0)) / 2
        scale = 3.0 / float(direction @ (bright.mean(0) - middle))
        model.head.weight.copy_(torch.stack([-direction, direction]) * scale)
        model.head.bias.copy_(torch.stack([middle @ direction, -(middle @ direction)]) * scale)
    return bundle_factory(tmp_path_factory.mktemp("bundle") / "tiny", model=model,
                          training={"individuals": ["m01", "m02"], "noise_sigma": 0.25, "num_frames": 32,
                                    "loss": "ce", "epochs": 0})


@pytest.mark.parametrize("method", [None, "soft_smoothing"])
def test_sequential_results_equal_the_robust_certificate(bundle: Path, method: str | None) -> None:
    predictor = Predictor.load(bundle, method=method, n=200, seed=3)
    images = _frames(70, 1, 5) + _frames(180, 1, 6) + _frames(125, 1, 7)
    results = predictor.predict(images, names=["a.png", "b.png", "c.png"])
    s = predictor.settings
    assert s.sequential
    if method is None:  # the bundle's default: Cohen's votes, Clopper-Pearson over the budget
        assert (s.method, s.bound) == ("randomized_smoothing", "fixed")
        options, name = {"scores": "hard", "bound": "fixed"}, "randomized_smoothing"
    else:  # sharpened soft scores with the anytime bound
        assert (s.score_temperature, s.bound) == (0.1, "anytime")
        options, name = {"score_temperature": 0.1}, "soft_smoothing_sequential"
    for image, result in zip(images, results, strict=True):
        x = predictor.preprocess(image)
        # The certificate is about the engine that answers (its runtime and precision), exactly.
        expected = sequential_certify(
            predictor.engine, x, sigma=s.sigma, alpha=s.alpha, n0=s.n0, max_n=200, batch_size=s.batch_size,
            rel_tol=s.rel_tol, min_radius=s.min_radius, **options,
            generator=torch.Generator().manual_seed(frame_seed(3, x)),
        )
        certificate = expected.certificate
        assert result.class_index == certificate.prediction
        assert result.radius == certificate.radius and result.bound == certificate.bound
        # + the clean pass of the first answer
        assert result.n == certificate.n and result.forward_passes == expected.forward_passes + 1
        assert result.method == name and result.stop_reason == expected.stop_reason
        assert result.forward_passes <= s.n0 + 200 + 1
        assert (result.runtime, result.precision) == (predictor.runtime, predictor.precision)
        assert result.noise_survival == (None if result.abstained else expected.vote_lower_bound)
    assert [r.label for r in results[:2]] == ["no_pain", "pain"]
    assert all(r.radius > 0.2 for r in results[:2])


@pytest.mark.parametrize("method", ["soft_smoothing", "randomized_smoothing"])
def test_fixed_n_results_equal_the_robust_certificate(bundle: Path, method: str) -> None:
    predictor = Predictor.load(bundle, method=method, n=100, sequential=False, seed=11)
    image = _frames(180, 1, 8)[0]
    (result,) = predictor.predict([image])
    x = predictor.preprocess(image)
    generator = torch.Generator().manual_seed(frame_seed(11, x))
    s = predictor.settings
    if method == "soft_smoothing":
        def sharpened(z: torch.Tensor) -> torch.Tensor:  # the bundle's score temperature, 0.1
            return predictor.engine(z) / 0.1

        expected = soft_smoothing_certify(sharpened, x, sigma=s.sigma, n0=s.n0, n=100, alpha=s.alpha,
                                          batch_size=s.batch_size, generator=generator)
    else:
        expected = SmoothedClassifier(predictor.engine, 2, s.sigma).certify(
            x, n0=s.n0, n=100, alpha=s.alpha, batch_size=s.batch_size, generator=generator)
    assert (result.class_index, result.radius, result.bound) == (expected.prediction, expected.radius,
                                                                 expected.bound)
    assert result.method == method and result.stop_reason is None
    assert result.forward_passes == s.n0 + 100 + 1  # + the clean pass for the probabilities


def test_score_temperature_override_and_bundles_without_it(bundle: Path) -> None:
    image = _frames(125, 1, 12)[0]
    plain = Predictor.load(bundle, method="soft_smoothing", n=200, seed=4, score_temperature=1.0)
    assert plain.settings.score_temperature == 1.0 and "mean softmax over" in plain.classifier_description
    x = plain.preprocess(image)
    expected = sequential_certify(
        plain.engine, x, sigma=plain.settings.sigma, alpha=plain.settings.alpha, n0=plain.settings.n0,
        max_n=200, batch_size=plain.settings.batch_size, rel_tol=plain.settings.rel_tol,
        min_radius=plain.settings.min_radius, generator=torch.Generator().manual_seed(frame_seed(4, x)),
    )
    (result,) = plain.predict([image])
    assert (result.radius, result.bound) == (expected.certificate.radius, expected.certificate.bound)
    with pytest.raises(SettingsError, match=r"score_temperature=5 is outside .*\[0.01, 1\]"):
        Predictor.load(bundle, score_temperature=5.0)
    # A bundle written before score_temperature existed certifies plain soft scores.
    metadata = json.loads((bundle / "model.json").read_text())
    del metadata["certification"]["score_temperature"]
    del metadata["certification"]["bounds"]["score_temperature"]
    old = bundle.parent / "old-bundle"
    shutil.copytree(bundle, old)
    (old / "model.json").write_text(json.dumps(metadata))
    assert Predictor.load(old).settings.score_temperature == 1.0
    metadata["certification"]["score_temperature"] = 0.0
    (old / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(BundleError, match=r"certification\.score_temperature"):
        Predictor.load(old)


def test_result_fields_units_and_determinism(bundle: Path) -> None:
    predictor = Predictor.load(bundle, n=100, seed=0)
    images = _frames(180, 2, 9)
    calls: list[tuple[int, int]] = []
    first = predictor.predict(images, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    again = predictor.predict(images[::-1])[::-1]  # same frame, same certificate, whatever the order
    assert [r.radius for r in again] == [r.radius for r in first]
    numel = 3 * SIZE * SIZE
    for result in first:
        assert isinstance(result, FrameResult)
        assert result.radius_rms == pytest.approx(result.radius / math.sqrt(numel))
        assert result.radius_grey_levels == pytest.approx(255 * result.radius / math.sqrt(numel))
        assert sum(result.probabilities.values()) == pytest.approx(1.0)
        assert result.confidence == pytest.approx(result.probabilities[result.label])
        assert result.sigma == 0.25 and result.alpha == 0.001
        assert "smoothed classifier" in result.classifier
        assert result.to_dict()["name"] == result.name
    assert first[0].name == "frame-0"


def test_abstention_is_an_answer(bundle: Path) -> None:
    model = create_model("test_resnet", num_classes=2, input_size=SIZE, seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()  # every class equally likely: nothing can be certified
    folder = bundle.parent / "undecided"
    save_bundle(folder, model, {"training": {"individuals": ["m01"]}})
    # Soft scores of tied logits are exactly 1/2 (hard votes would break the tie towards class 0).
    (result,) = Predictor.load(folder, method="soft_smoothing", n=100).predict(_frames(125, 1, 1))
    assert result.label == ABSTAIN_LABEL and result.class_index == -1 and result.radius == 0.0
    assert result.confidence == pytest.approx(0.5)


def test_overrides_are_checked_against_the_bundle_bounds(bundle: Path) -> None:
    with pytest.raises(SettingsError, match=r"sigma=5 is outside .*\[0\.01, 1\].*bounds\.sigma"):
        Predictor.load(bundle, sigma=5.0)
    with pytest.raises(SettingsError, match=r"alpha=0\.2 is outside"):
        Predictor.load(bundle, alpha=0.2)
    with pytest.raises(SettingsError, match=r"n=10 is outside .*\[100, 100000\]"):
        Predictor.load(bundle, n=10)
    with pytest.raises(SettingsError, match="n must be a whole number"):
        Predictor.load(bundle, n=500.5)
    with pytest.raises(SettingsError, match="method='magic' is not a certification method"):
        Predictor.load(bundle, method="magic")
    with pytest.raises(SettingsError, match="needs a sound Lipschitz bound"):
        Predictor.load(bundle, method="lipschitz")
    with pytest.raises(SettingsError, match="sequential certification applies to"):
        Predictor.load(bundle, method="smoothed_margin", sequential=True)
    inside = Predictor.load(bundle, sigma=0.5, alpha=0.01, n=400)
    assert (inside.settings.sigma, inside.settings.alpha, inside.settings.n) == (0.5, 0.01, 400)


def test_bad_images_are_named(bundle: Path) -> None:
    predictor = Predictor.load(bundle, n=100)
    with pytest.raises(ValueError, match=r"broken\.png"):
        predictor.predict([np.zeros((10, 10), dtype=np.uint8)], names=["broken.png"])
    with pytest.raises(ValueError, match="2 images but 1 names"):
        predictor.predict(_frames(100, 2, 0), names=["one"])


def test_saliency_is_a_map_on_the_frame(bundle: Path) -> None:
    predictor = Predictor.load(bundle, n=100)
    image = _frames(180, 1, 3)[0]
    heat = predictor.saliency(image)
    assert heat.shape == image.shape[:2] and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0 and heat.max() == pytest.approx(1.0)
    assert not heat[:, :4].any() and not heat[:, -4:].any()  # outside the centre square the model saw
    with pytest.raises(ValueError, match="class_index"):
        predictor.saliency(image, class_index=5)


def test_model_card_and_gate(bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    predictor = Predictor.load(copy)
    assert predictor.gate is None
    card = predictor.model_card()
    assert "never replaces" in card and "2 individuals" in card and "Not run" in card
    # which engine answers and certifies, and how often bf16's class was measured to differ from fp32's
    assert f"computed by {predictor.runtime} at {predictor.precision}" in card
    assert "bf16 class differed from its fp32 class on 0" in card
    # and how often the refusal from the engine's bf16 descriptors differed from the fp32 refusal
    assert "refusal differed from the float32 refusal on 0" in card
    assert "on 0" in predictor.model_card_dict()["engine"]["bf16_refusal_agreement"]
    record_gate_verdict(copy, GateVerdict(gate_file="default.toml", passed=False, date="2026-01-01",
                                          results=({"name": "min_pain_recall", "value": 0.5,
                                                    "threshold": 0.6, "passed": False},),
                                          details={"report": "r.html"}))
    reloaded = Predictor.load(copy)
    assert reloaded.gate.passed is False and list(reloaded.gates) == ["default.toml"]
    assert "FAILED" in reloaded.model_card() and "min_pain_recall" in reloaded.model_card()
    assert reloaded.model_card_dict()["training_data"]["num_individuals"] == 2


def test_pgd_does_not_break_certified_smoothed_predictions(bundle: Path) -> None:
    # Statistical check of the whole path: attack the smoothed classifier (through a Monte Carlo
    # surrogate) at 0.99 r and re-estimate its prediction with many fresh draws.
    predictor = Predictor.load(bundle, n=200, seed=0)
    images = _frames(70, 2, 20) + _frames(180, 2, 21)
    x = torch.stack([predictor.preprocess(image) for image in images])
    certificates = [predictor.certify_tensor(image)[0] for image in x]
    assert sum(not c.abstained for c in certificates) >= 4
    sigma = predictor.settings.sigma
    generator = torch.Generator().manual_seed(123)
    surrogate = MonteCarloSurrogate(predictor.model, sigma=sigma, input_shape=x.shape[1:], num_draws=16,
                                    kind="softmax", generator=generator)
    classify = monte_carlo_smoothed_classifier(predictor.model, sigma=sigma, kind="softmax", num=500,
                                               batch_size=250, generator=generator)
    report = attack_certificates(surrogate, classify, x, certificates, fraction=0.99, steps=8,
                                 generator=generator)
    assert report.num_attacked >= 4
    assert report.num_flipped == 0
    assert report.max_budget_used <= 0.99 + 1e-6


def test_deployed_noise_is_unpredictable_recorded_and_reproducible(bundle: Path, monkeypatch) -> None:
    import secrets

    import painwatch.inference.results as predict_module  # where the Predictor's noise seeds come from

    images = _frames(125, 3, 30)
    deployed = Predictor.load(bundle, n=200)  # no seed: as the page and bulk prediction run
    assert deployed.seed is None
    first, second = deployed.predict(images), deployed.predict(images)
    seeds = [r.noise_seed for r in first]
    assert all(isinstance(seed, int) and 0 <= seed < 2**63 for seed in seeds)
    assert seeds != [r.noise_seed for r in second]  # the same frames get fresh, unpredictable noise
    # Anyone can re-check a certificate later: the recorded seeds give the results again, exactly.
    assert deployed.predict(images, noise_seeds=seeds) == first
    assert Predictor.load(bundle, n=200, seed=7).predict(images, noise_seeds=seeds) == first
    with pytest.raises(ValueError, match="2 noise seeds"):
        deployed.predict(images, noise_seeds=seeds[:2])
    # The seeds come from the operating system's entropy (secrets), not from a public default.
    drawn = []
    monkeypatch.setattr(predict_module.secrets, "randbits", lambda bits: drawn.append(bits) or 12345)
    (result,) = deployed.predict(images[:1])
    assert drawn == [63] and result.noise_seed == 12345
    assert secrets.randbits is predict_module.secrets.randbits


def test_an_experiment_seed_fixes_every_frame_s_noise(bundle: Path) -> None:
    images = _frames(125, 2, 31)
    fixed = Predictor.load(bundle, n=200, seed=3)
    first = fixed.predict(images)
    reordered = fixed.predict(list(reversed(images)), names=["frame-1", "frame-0"])[::-1]
    assert first == reordered  # per frame, whatever else is in the batch
    assert [r.noise_seed for r in first] == [frame_seed(3, fixed.preprocess(i)) for i in images]


class _CoinFlip(torch.nn.Module):
    """Logits ``(s, -s)`` with ``s`` the summed deviation from mid-grey: under noise, a mid-grey frame
    gets each class half the time, so no smoothed answer is clear."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the Predictor reads the device off a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x - 128 / 255).flatten(1).sum(dim=1)
        return torch.stack([s, -s], dim=1)


def test_abstentions_say_why_in_words(bundle: Path) -> None:
    from painwatch.inference import resolve_settings
    from painwatch.models import read_metadata

    metadata = read_metadata(bundle)
    settings = resolve_settings(metadata.certification, method="randomized_smoothing", n=200)
    coin = Predictor(_CoinFlip(), metadata, bundle, settings, seed=0)
    grey = np.full((SIZE, SIZE, 3), 128, np.uint8)
    (refused,) = coin.predict([grey])
    assert refused.abstained and refused.abstain_code == "unclear_under_noise"
    assert "no clear majority under noise" in refused.abstain_reason
    answered = Predictor.load(bundle, n=200, seed=0).predict(_frames(180, 2, 33))
    assert all(not r.abstained and r.abstain_reason is None and r.abstain_code is None for r in answered)
