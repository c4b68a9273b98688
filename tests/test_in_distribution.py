"""The in-distribution check: the conformal threshold and its coverage, the statistic on a real network's
descriptors, the bundle file (round trip, tampering), and the Predictor refusing frames unlike the
training frames without spending noise draws on them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.stats import binom

from painwatch.inference import ABSTAIN_REASONS, Predictor
from painwatch.models import (
    BundleError,
    InDistributionError,
    InDistributionSpec,
    conformal_threshold,
    create_model,
    default_certification,
    descriptor_pass,
    fit_in_distribution,
    load_bundle,
    read_metadata,
    save_bundle,
)
from painwatch.models.in_distribution import conformal_rank, default_layers, minimum_calibration_frames

SIZE = 32


# --------------------------------------------------------------------------- the conformal threshold


@pytest.mark.parametrize("n", [19, 20, 39, 57, 100, 333])
@pytest.mark.parametrize("ties", [False, True])
def test_threshold_refuses_at_most_n_minus_its_rank_of_the_calibration_frames(n: int, ties: bool) -> None:
    rng = np.random.default_rng(n)
    scores = rng.integers(0, 5, n).astype(float) if ties else rng.normal(size=n)
    rank = math.ceil((n + 1) * 0.95)
    threshold = conformal_threshold(scores, 0.05)
    refused = int(np.sum(scores > threshold))
    assert conformal_rank(n, 0.05) == rank and threshold == np.sort(scores)[rank - 1]
    assert refused <= n - rank <= 0.05 * (n + 1)
    if not ties:
        assert refused == n - rank


def test_threshold_needs_enough_calibration_frames() -> None:
    assert minimum_calibration_frames(0.05) == 19 and minimum_calibration_frames(0.1) == 9
    conformal_threshold(np.arange(19.0), 0.05)
    with pytest.raises(InDistributionError, match=r"18 calibration frames are too few.*at least 19"):
        conformal_threshold(np.arange(18.0), 0.05)
    with pytest.raises(InDistributionError, match="finite"):
        conformal_threshold([1.0, float("nan")] * 20)
    with pytest.raises(InDistributionError, match="level"):
        conformal_threshold(np.arange(50.0), 1.5)


def test_coverage_holds_over_many_exchangeable_draws() -> None:
    # n = 99 calibration scores: a fresh exchangeable score is refused with probability exactly
    # (n + 1 - k) / (n + 1) = 5 / 100. 4000 draws tell 5 % from 10 % (expected 200 against 400 refusals).
    rng = np.random.default_rng(0)
    trials, n = 4000, 99
    draws = rng.standard_t(df=3, size=(trials, n + 1))  # heavy tails: the guarantee needs no shape
    refused = sum(draws[t, n] > conformal_threshold(draws[t, :n]) for t in range(trials))
    assert binom.ppf(0.0005, trials, 0.05) <= refused <= binom.ppf(0.9995, trials, 0.05)
    assert refused < binom.ppf(0.0005, trials, 0.10)  # far from what a 10 % rule would refuse


def test_coverage_of_a_fitted_check_over_random_calibration_splits() -> None:
    # The fitted statistic is fixed; the validation and the new frames are exchangeable draws of one
    # population. Over many splits, a new frame is refused about 5 % of the time, never 10 %.
    rng = np.random.default_rng(1)
    layers = ("a:moments", "b:grid2")
    latent = rng.normal(size=(2600, 3))
    pool = {"a:moments": np.exp(latent @ rng.normal(size=(3, 8)) / 3),
            "b:grid2": np.abs(latent @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(2600, 12)))}
    fit = {name: values[:600] for name, values in pool.items()}
    groups = [f"m{i % 6}" for i in range(600)]
    rest = {name: values[600:] for name, values in pool.items()}
    check = fit_in_distribution(fit, groups, {k: v[:50] for k, v in rest.items()},
                                spec=InDistributionSpec(layers=layers))
    scores = check.scores(rest)
    trials, n, refused = 3000, 59, 0
    for _ in range(trials):
        order = rng.permutation(len(scores))
        refused += int(scores[order[n]] > conformal_threshold(scores[order[:n]]))
    assert binom.ppf(0.0005, trials, 0.05) <= refused <= binom.ppf(0.9995, trials, 0.05)
    assert refused < binom.ppf(0.0005, trials, 0.10)


# --------------------------------------------------------------------------- the statistic


def _structured(count: int, seed: int, size: int = 40) -> list[np.ndarray]:
    """Smooth striped frames with mild noise: what the tiny model's check learns as 'like training'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for _ in range(count):
        period, phase, tint = rng.uniform(5, 9), rng.uniform(0, 6), rng.uniform(0.6, 1.0, 3)
        base = np.sin(xx / period + phase) * 50 + np.cos(yy / 6) * 30 + 120
        picture = base[..., None] * tint + rng.normal(0, 4, (size, size, 3))
        frames.append(np.clip(picture, 0, 255).astype(np.uint8))
    return frames


def _tensors(frames: list[np.ndarray]) -> torch.Tensor:
    from painwatch.data import eval_transform

    transform = eval_transform(SIZE)
    return torch.stack([transform(frame) for frame in frames])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model("test_resnet", num_classes=2, input_size=SIZE, seed=0).eval()


@pytest.fixture(scope="module")
def check(model):
    spec = InDistributionSpec(layers=default_layers(model))
    _, fit = descriptor_pass(model, _tensors(_structured(60, 0)), spec.layers)
    _, validation = descriptor_pass(model, _tensors(_structured(40, 1)), spec.layers)
    return fit_in_distribution(fit, [f"m{i % 4}" for i in range(60)], validation, spec=spec)


def test_descriptors_come_from_one_pass_and_leave_no_hook_behind(model) -> None:
    x = _tensors(_structured(3, 2))
    layers = default_layers(model)
    assert layers == ("layer2:grid4", "layer3:grid4", "act1:moments", "layer1:moments", "layer2:moments",
                      "layer3:moments", "layer4:moments")
    logits, descriptors = descriptor_pass(model, x, (*layers, "pooled", "logits"))
    with torch.no_grad():
        assert torch.allclose(logits, model(x))
        assert np.allclose(descriptors["pooled"], model.features(x).double().numpy(), atol=1e-6)
    channels = {name: info["num_chs"] for name, info in
                ((i["module"], i) for i in model.backbone.feature_info)}
    assert descriptors["layer2:grid4"].shape == (3, channels["layer2"] * 16)
    assert descriptors["act1:moments"].shape == (3, channels["act1"] * 2)
    assert all(not module._forward_hooks for module in model.modules())
    with pytest.raises(InDistributionError, match="no stage 'nowhere'"):
        descriptor_pass(model, x, ("nowhere:moments",))
    assert all(not module._forward_hooks for module in model.modules())
    with pytest.raises(InDistributionError, match="unknown descriptor 'layer2:cubes'"):
        descriptor_pass(model, x, ("layer2:cubes",))


def test_the_check_refuses_noise_black_and_white_frames_but_not_like_frames(model, check) -> None:
    rng = np.random.default_rng(5)
    layers = check.spec.layers
    _, alike = descriptor_pass(model, _tensors(_structured(40, 3)), layers)
    noise = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(10)]
    blank = [np.full((40, 40, 3), value, np.uint8) for value in (0, 255)]  # black and white
    _, far = descriptor_pass(model, _tensors(noise + blank), layers)
    assert check.refuses(check.scores(far)).all()
    assert check.refuses(check.scores(alike)).mean() <= 0.15
    assert check.calibration_frames == 40 and check.fit_frames == 60
    assert check.validation_refused == 40 - conformal_rank(40, 0.05)
    assert "refused with probability at most 0.05" in check.guarantee and "39th smallest" in check.guarantee


@pytest.mark.parametrize("score", ["mahalanobis", "knn", "energy"])
def test_other_scores_fit_and_round_trip(model, score: str) -> None:
    spec = InDistributionSpec(layers=() if score == "energy" else ("pooled", "layer1:moments"), score=score)
    _, fit = descriptor_pass(model, _tensors(_structured(30, 0)), spec.descriptors)
    _, validation = descriptor_pass(model, _tensors(_structured(25, 1)), spec.descriptors)
    fitted = fit_in_distribution(fit, [f"m{i % 3}" for i in range(30)], validation, spec=spec)
    again = type(fitted).from_tensors(*fitted.to_tensors())
    assert np.allclose(again.scores(validation), fitted.scores(validation))
    assert again.threshold == fitted.threshold and again.spec == spec


def test_bad_specs_and_inputs_are_named() -> None:
    with pytest.raises(InDistributionError, match="score must be one of"):
        InDistributionSpec(layers=("pooled",), score="vibes")
    with pytest.raises(InDistributionError, match="variance"):
        InDistributionSpec(layers=("pooled",), variance=0)
    with pytest.raises(InDistributionError, match="at least one descriptor"):
        InDistributionSpec(layers=())
    spec = InDistributionSpec(layers=("pooled",))
    values = {"pooled": np.ones((30, 4))}
    with pytest.raises(InDistributionError, match=r"validation descriptors \['pooled'\] are missing"):
        fit_in_distribution(values, ["a"] * 30, {}, spec=spec)
    with pytest.raises(InDistributionError, match="one row per fit frame"):
        fit_in_distribution(values, ["a"] * 29, values, spec=spec)


# --------------------------------------------------------------------------- the bundle file


@pytest.fixture
def checked_bundle(tmp_path: Path, model, check) -> Path:
    certification = default_certification(sigma=0.25)
    certification.update({"n0": 16, "n": 100, "alpha": 0.01, "batch_size": 50})
    return save_bundle(tmp_path / "bundle", model, {"certification": certification}, in_distribution=check)


def test_the_check_survives_a_bundle_round_trip(checked_bundle: Path, model, check) -> None:
    described = read_metadata(checked_bundle).in_distribution
    assert described is not None and described.file == "in_distribution.safetensors"
    assert described.threshold == check.threshold and described.level == 0.05
    assert described.layers == check.spec.layers and described.calibration_frames == 40
    assert "exchangeable" in described.guarantee
    loaded = load_bundle(checked_bundle).in_distribution
    _, descriptors = descriptor_pass(model, _tensors(_structured(5, 7)), check.spec.layers)
    assert np.array_equal(loaded.scores(descriptors), check.scores(descriptors))
    with safe_open(str(checked_bundle / described.file), framework="pt") as handle:
        assert handle.metadata()["format"] == "painwatch-in-distribution-1"  # safetensors: no pickle


def test_a_tampered_or_missing_check_is_detected(checked_bundle: Path) -> None:
    path = checked_bundle / "in_distribution.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        strings = handle.metadata()
    tensors["threshold"] = tensors["threshold"] + 100.0  # a lenient check would accept anything
    save_file(tensors, str(path), metadata=strings)
    with pytest.raises(BundleError, match=r"SHA-256 .* does not match in_distribution.sha256"):
        load_bundle(checked_bundle)
    path.unlink()
    with pytest.raises(BundleError, match=r"in_distribution.safetensors' is missing"):
        load_bundle(checked_bundle)


def test_model_json_must_agree_with_the_check_file(checked_bundle: Path) -> None:
    path = checked_bundle / "model.json"
    content = json.loads(path.read_text())
    content["in_distribution"]["threshold"] += 1.0
    path.write_text(json.dumps(content))
    with pytest.raises(BundleError, match=r"'in_distribution.threshold'.*disagrees"):
        load_bundle(checked_bundle)
    content["in_distribution"]["sha256"] = "xyz"
    path.write_text(json.dumps(content))
    with pytest.raises(BundleError, match=r"in_distribution.sha256"):
        read_metadata(checked_bundle)


def test_an_old_bundle_without_a_check_loads_and_predicts(tmp_path: Path, model) -> None:
    folder = save_bundle(tmp_path / "old", model)
    content = json.loads((folder / "model.json").read_text())
    assert "in_distribution" not in content
    predictor = Predictor.load(folder, seed=0, n=100)
    assert predictor.in_distribution is None
    assert "made before painwatch fitted an in-distribution check" in predictor.in_distribution_note
    (result,) = predictor.predict(_structured(1, 9))
    assert result.in_distribution_score is None and result.in_distribution_threshold is None
    assert result.abstain_code != "not_like_training_frames"


# --------------------------------------------------------------------------- the Predictor


def test_predictor_refuses_far_frames_with_the_reason_and_no_noise_draws(checked_bundle: Path,
                                                                         monkeypatch) -> None:
    predictor = Predictor.load(checked_bundle, seed=0)
    assert predictor.in_distribution_note is None
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    alike = _structured(1, 3)[0]
    calls = []
    real_certify_frames = __import__("painwatch.inference.predict", fromlist=["x"]).certify_frames

    def counting_certify_frames(engine, frames, generators, **kwargs):
        calls.append(len(frames))
        return real_certify_frames(engine, frames, generators, **kwargs)

    monkeypatch.setattr("painwatch.inference.predict.certify_frames", counting_certify_frames)
    refused, answered = predictor.predict([noise, alike], names=["noise.png", "alike.png"])
    assert calls == [1]  # only the frame like the training frames was certified
    assert refused.abstained and refused.radius == 0.0 and refused.label == "abstain"
    assert refused.abstain_code == "not_like_training_frames"
    assert refused.abstain_reason == ABSTAIN_REASONS["not_like_training_frames"]
    # its answer: one clean pass of the engine, which also gave the check's descriptors
    assert refused.forward_passes == 1 and refused.n == 0 and refused.noise_seed is None
    assert refused.in_distribution_threshold == predictor.in_distribution.threshold
    assert refused.in_distribution_score > refused.in_distribution_threshold
    assert sum(refused.probabilities.values()) == pytest.approx(1.0)
    assert answered.abstain_code != "not_like_training_frames"
    assert answered.in_distribution_score <= answered.in_distribution_threshold
    record = refused.to_dict()
    assert record["in_distribution_score"] == refused.in_distribution_score
    # Reproducing a batch: a refused frame has no noise seed to give back.
    again = predictor.predict([noise, alike], noise_seeds=[None, answered.noise_seed])
    assert again[0].abstain_code == "not_like_training_frames" and again[1].radius == answered.radius


def test_warming_up_makes_the_answer_pass_with_the_check_s_descriptors_too(checked_bundle: Path,
                                                                            monkeypatch) -> None:
    predictor = Predictor.load(checked_bundle, seed=0)
    described = []
    real = predictor.engine.answer_described

    def recording(batch, layers):
        described.append((tuple(batch.shape), tuple(layers)))
        return real(batch, layers)

    monkeypatch.setattr(predictor.engine, "answer_described", recording)
    rate = predictor.warm_up()
    assert rate > 0 and math.isfinite(rate)
    assert described == [((1, *predictor.input_shape), tuple(predictor.in_distribution.spec.descriptors))]
