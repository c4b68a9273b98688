"""Training: config validation, the fit loop (CE and expected-margin losses), heads on cached features,
the split by individual, and `painwatch train` end to end on a tiny folder of real PNG files."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import TensorDataset

from painwatch.cli import main
from painwatch.data import is_synthetic, load_records, make_demo_dataset, split_by_individual
from painwatch.models import create_model, load_bundle
from painwatch.training import TrainConfig
from painwatch.training.batches import extract_features, predict_logits
from painwatch.training.head import fit_head
from painwatch.training.loops import balanced_accuracy, class_weights, fit, make_scheduler, parameter_groups

ARCH = "test_resnet"
SIZE = 32


def _image(label: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A frame whose class is visible: pain frames carry a bright square in the middle."""
    image = rng.integers(30, 110, size=(size, size, 3), dtype=np.uint8)
    if label == 1:
        image[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4, 0] = 240
    return image


def _write_folder(root: Path, individuals: int = 4, per_class: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(individuals):
        for label, name in ((0, "no_pain"), (1, "pain")):
            folder = root / f"monkey{index}" / name
            folder.mkdir(parents=True)
            for frame in range(per_class):
                Image.fromarray(_image(label, rng)).save(folder / f"f{frame}.png")
    return root


def _tensor_dataset(n: int, seed: int) -> TensorDataset:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = np.stack([_image(int(y), rng, SIZE) for y in labels]).transpose(0, 3, 1, 2) / 255.0
    return TensorDataset(torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels))


def _config(**overrides) -> TrainConfig:
    settings = dict(
        arch=ARCH,
        input_size=SIZE,
        epochs=3,
        batch_size=8,
        lr=3e-3,
        warmup_epochs=0,
        device="cpu",
        patience=None,
        seed=0,
    )
    return TrainConfig(**(settings | overrides))



@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("frames") / "data")


@pytest.mark.parametrize(
    ("field", "value", "text"),
    [
        ("epochs", 0, "TrainConfig.epochs"),
        ("lr", -1.0, "TrainConfig.lr"),
        ("loss", "hinge", "TrainConfig.loss"),
        ("noise_sigma", float("nan"), "TrainConfig.noise_sigma"),
        ("device", "tpu", "TrainConfig.device"),
        ("patience", 0, "TrainConfig.patience"),
        ("class_balance", "oversample", "TrainConfig.class_balance"),
        ("augment", 1.5, "TrainConfig.augment"),
        ("validate_under_noise", "yes", "TrainConfig.validate_under_noise"),
    ],
)
def test_config_errors_name_the_field_and_value(field: str, value, text: str) -> None:
    with pytest.raises(ValueError, match=text):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"epochz": 3})


def test_class_weights_and_balanced_accuracy() -> None:
    weights = class_weights([0, 0, 0, 1], num_classes=2)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 4 / 2]))
    assert class_weights([0, 1, 0, 1], 2).tolist() == [1.0, 1.0]
    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert balanced_accuracy(predictions, labels) == pytest.approx(
        balanced_accuracy_score(labels, predictions)
    )


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_learning_rate_schedules_warm_up_then_follow_their_shape(schedule: str) -> None:
    config = _config(schedule=schedule, epochs=4, warmup_epochs=1.0, lr=0.1)
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW(parameter_groups(torch.nn.Linear(3, 2), 0.01), lr=config.lr)
    optimizer.add_param_group({"params": [parameter], "weight_decay": 0.0})
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] < 0.05 and max(rates) == pytest.approx(0.1, rel=1e-3)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(rates[:10])), "warm-up must rise"
    if schedule == "constant":
        assert rates[-1] == pytest.approx(0.1)
    else:
        assert rates[-1] < 0.01 and all(a >= b - 1e-12 for a, b in itertools.pairwise(rates[12:]))


def test_no_weight_decay_on_biases_and_norm_scales() -> None:
    model = create_model(ARCH, input_size=SIZE, seed=0)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_split_by_individual_never_puts_one_individual_on_both_sides(data_folder: Path) -> None:
    records = load_records(data_folder)
    train, val = split_by_individual(records, 0.25, seed=3)
    train_ids, val_ids = {r.individual for r in train}, {r.individual for r in val}
    assert train_ids.isdisjoint(val_ids) and len(val_ids) == 1 and len(train) + len(val) == len(records)
    assert split_by_individual(records, 0.25, seed=3) == (train, val)
    assert split_by_individual(records, 0.0, seed=3) == (records, [])
    with pytest.raises(ValueError, match="at least 2 individuals"):
        split_by_individual([r for r in records if r.individual == "monkey0"], 0.2, seed=0)


def test_fit_decreases_the_loss_and_restores_the_best_epoch() -> None:
    train, val = _tensor_dataset(32, seed=1), _tensor_dataset(16, seed=2)
    model = create_model(ARCH, input_size=SIZE, seed=0)
    result = fit(model, train, val, config=_config(epochs=4), progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert 1 <= result.best_epoch <= 4
    best = result.history[result.best_epoch - 1]["val_loss"]
    assert best == min(h["val_loss"] for h in result.history)
    # The returned model is the best epoch's: its validation logits are the recorded ones.
    torch.testing.assert_close(predict_logits(model, val), result.val_logits)
    assert result.val_labels.tolist() == val.tensors[1].tolist()


def test_expected_margin_loss_trains() -> None:
    # "ce+mc_margin" goes through the same code and is exercised by the `painwatch train` test.
    train = _tensor_dataset(24, seed=3)
    model = create_model(ARCH, input_size=SIZE, seed=0)
    config = _config(loss="mc_margin", noise_sigma=0.1, num_draws=2, margin=1.0, epochs=3)
    result = fit(model, train, None, config=config, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert result.best_epoch == 3 and result.val_logits is None


def test_noise_trained_models_are_validated_under_their_noise() -> None:
    train, val = _tensor_dataset(16, seed=5), _tensor_dataset(8, seed=6)
    model = create_model(ARCH, input_size=SIZE, seed=0)
    result = fit(model, train, val, config=_config(epochs=2, noise_sigma=0.2, seed=3), progress=False)
    assert all(h["val_noise_sigma"] == 0.2 for h in result.history)
    noisy = predict_logits(model, val, noise_sigma=0.2, noise_seed=3 + 2)
    torch.testing.assert_close(result.val_logits, noisy)
    clean = predict_logits(model, val)
    assert not torch.allclose(noisy, clean)
    torch.testing.assert_close(predict_logits(model, val, noise_sigma=0.2, noise_seed=5), noisy)
    assert not torch.allclose(predict_logits(model, val, noise_sigma=0.2, noise_seed=6), noisy)
    with pytest.raises(ValueError, match="noise_sigma"):
        predict_logits(model, val, noise_sigma=-1.0)
    clean_result = fit(
        create_model(ARCH, input_size=SIZE, seed=0),
        train,
        val,
        config=_config(epochs=1, noise_sigma=0.2, validate_under_noise=False),
        progress=False,
    )
    assert clean_result.history[0]["val_noise_sigma"] == 0.0


def test_same_seed_same_model() -> None:
    train = _tensor_dataset(16, seed=4)
    states = []
    for _ in range(2):
        model = create_model(ARCH, input_size=SIZE, seed=0)
        fit(model, train, None, config=_config(epochs=1, noise_sigma=0.05, class_balance="sampler"),
            progress=False)
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_fit_rejects_labels_outside_the_model() -> None:
    bad = TensorDataset(torch.rand(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"train labels \[2\]"):
        fit(create_model(ARCH, input_size=SIZE, seed=0), bad, None, config=_config(epochs=1), progress=False)


def test_fit_head_on_cached_features_matches_the_model_head(data_folder: Path) -> None:
    records = load_records(data_folder)
    model = create_model(ARCH, input_size=SIZE, seed=0)
    features, labels = extract_features(model, records)
    assert features.shape == (len(records), model.num_features)
    assert labels.tolist() == [r.label for r in records]
    torch.testing.assert_close(model.head(features), predict_logits(model, records), rtol=1e-4, atol=1e-5)


def test_fit_head_solves_class_weighted_logistic_regression() -> None:
    # Same objective as scikit-learn's multinomial L2 logistic regression on standardised features
    # with balanced class weights and C = 1 / (N * head_l2): the probabilities must agree.
    rng = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    x = torch.randn(60, 6, generator=rng, dtype=torch.float64) + 1.2 * torch.nn.functional.one_hot(y, 6) + 5.0
    config = _config(head_l2=0.05, patience=None)
    result = fit_head(x, y, config=config, num_classes=3)
    reference = make_pipeline(
        StandardScaler(), LogisticRegression(C=1 / (60 * 0.05), class_weight="balanced", tol=1e-10)
    ).fit(x.numpy(), y.numpy())
    ours = torch.softmax(result.model(x.float()), dim=1).detach().numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(x.numpy()), atol=2e-3)


def test_fit_head_validation_and_errors() -> None:
    rng = torch.Generator().manual_seed(1)
    y = torch.arange(60) % 2
    x = torch.randn(60, 8, generator=rng) + 3.0 * y[:, None].float()
    result = fit_head(x[:40], y[:40], val_features=x[40:], val_labels=y[40:], config=_config(patience=2),
                      num_classes=2)
    assert result.model.out_features == 2 and result.history[result.best_epoch - 1]["val_accuracy"] >= 0.95
    torch.testing.assert_close(result.model(x[40:]).detach(), result.val_logits)
    with pytest.raises(ValueError, match="pixel-space noise"):
        fit_head(x, y, config=_config(noise_sigma=0.1))
    with pytest.raises(ValueError, match="shape"):
        fit_head(x, y[:10], config=_config())


def test_painwatch_train_writes_a_loadable_bundle(data_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    code = main(
        [
            "train",
            str(data_folder),
            "--out",
            str(out),
            "--arch",
            ARCH,
            "--input-size",
            str(SIZE),
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--noise-sigma",
            "0.1",
            "--loss",
            "ce+mc_margin",
            "--num-draws",
            "2",
            "--val-fraction",
            "0.25",
            "--device",
            "cpu",
            "--quiet",
            "--augment",
            "0.5",
        ]
    )
    assert code == 0, capsys.readouterr().err
    bundle = load_bundle(out)
    training = bundle.metadata.training
    assert training["individuals"] == ["monkey0", "monkey1", "monkey2", "monkey3"]
    assert len(training["validation_individuals"]) == 1
    assert set(training["fit_individuals"]).isdisjoint(training["validation_individuals"])
    assert (training["loss"], training["noise_sigma"], training["num_frames"]) == ("ce+mc_margin", 0.1, 32)
    assert training["synthetic_data"] is False and not is_synthetic(data_folder)
    assert training["augment"] == 0.5 and training["validation_noise_sigma"] == 0.1
    assert len(training["data_hash"]) == 64
    assert bundle.metadata.certification.sigma == pytest.approx(0.1)
    assert bundle.temperature > 0
    assert bundle.model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 2)
    assert "training on 32 frames from 4 individuals" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        (["--individuals", "monkey0,ghost"], "ghost"),
        (["--loss", "mc_margin"], "--noise-sigma > 0"),
        (["--epochs", "0"], "TrainConfig.epochs"),
    ],
)
def test_painwatch_train_usage_errors(data_folder: Path, tmp_path: Path, capsys, extra, text: str) -> None:
    code = main(["train", str(data_folder), "--out", str(tmp_path / "b"), "--arch", ARCH, "--quiet", *extra])
    assert code == 2
    assert text in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_training_on_the_demo_set_is_marked_synthetic(tmp_path: Path) -> None:
    manifest = make_demo_dataset(tmp_path / "demo", individuals=2, frames_per_class=2, image_size=48)
    assert is_synthetic(manifest) and is_synthetic(manifest.parent)
    out = tmp_path / "bundle"
    arguments = ["train", str(manifest.parent), "--out", str(out), "--arch", ARCH, "--input-size", str(SIZE)]
    assert main([*arguments, "--epochs", "1", "--val-fraction", "0", "--device", "cpu", "--quiet"]) == 0
    training = load_bundle(out).metadata.training
    assert training["synthetic_data"] is True and training["validation_individuals"] == []
    assert load_bundle(out).temperature == 1.0  # nothing held out to calibrate on
    # Nor to set an in-distribution threshold on: no check, and the bundle says why.
    assert load_bundle(out).in_distribution is None
    assert "val_fraction 0" in load_bundle(out).metadata.in_distribution_note


def test_painwatch_train_reports_bad_data(tmp_path: Path, capsys) -> None:
    root = _write_folder(tmp_path / "data", individuals=2, per_class=1)
    (root / "monkey1" / "pain" / "f0.png").write_bytes(b"not an image")
    code = main(["train", str(root), "--out", str(tmp_path / "b"), "--arch", ARCH, "--quiet"])
    assert code == 2
    assert "f0.png" in capsys.readouterr().err


def test_train_bundle_fits_the_check_on_fit_individuals_and_calibrates_it_on_validation(
    tmp_path: Path,
) -> None:
    from painwatch.training.bundle import train_bundle

    records = load_records(_write_folder(tmp_path / "data", individuals=4, per_class=10))
    messages: list[str] = []
    made = train_bundle(records, _config(epochs=1), tmp_path / "bundle", val_fraction=0.25, progress=False,
                        log=messages.append)
    bundle = load_bundle(made.path)
    check, described = bundle.in_distribution, bundle.metadata.in_distribution
    validation = bundle.metadata.training["validation_individuals"]
    assert check is not None and described is not None and len(validation) == 1
    assert (described.calibration_frames, described.fit_frames) == (20, 60)
    assert described.threshold == check.threshold == made.in_distribution.threshold
    assert any("in-distribution check" in message and "of 20 validation frames" in message
               for message in messages)
