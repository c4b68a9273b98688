"""painwatch.models.network: PainNet's input contract, normalisation inside, weights loading."""

from __future__ import annotations

import re
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from painwatch.models import ModelWeightsError, PainNet, create_model, read_state_dict

ARCH = "test_resnet"  # timm's tiny ResNet (~0.4 M parameters): real code paths, fast tests
SIZE = 64



@pytest.fixture(scope="module")
def model() -> PainNet:
    return create_model(ARCH, input_size=SIZE, seed=0).eval()


def test_forward_returns_logits_of_the_right_shape(model: PainNet) -> None:
    x = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (3, 2)
    assert torch.isfinite(logits).all()
    assert (model.arch, model.num_classes, model.input_size) == (ARCH, 2, SIZE)


def test_normalisation_is_inside_the_model(model: PainNet) -> None:
    # test_resnet's pretrained config uses mean = std = 0.5: the model must apply it itself.
    assert model.mean == pytest.approx((0.5, 0.5, 0.5)) and model.std == pytest.approx((0.5, 0.5, 0.5))
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    by_hand = model.head(model.backbone((x - 0.5) / 0.5))
    torch.testing.assert_close(model(x), by_hand)
    # Feeding pre-normalised pixels gives a different answer: the [0, 1] contract matters.
    assert not torch.allclose(model(x), model.head(model.backbone(x)))


def test_resnet_gets_imagenet_statistics_and_custom_ones_are_kept() -> None:
    imagenet = create_model("resnet18", input_size=SIZE, seed=0)
    # Exact values (not float32-rounded), since they are written to model.json.
    assert imagenet.mean == (0.485, 0.456, 0.406)
    assert imagenet.std == (0.229, 0.224, 0.225)
    custom = create_model(ARCH, input_size=SIZE, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert custom.mean == pytest.approx((0.1, 0.2, 0.3)) and custom.std == pytest.approx((0.4, 0.5, 0.6))


def test_features_then_head_equals_forward(model: PainNet) -> None:
    x = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    features = model.features(x)
    assert features.shape == (4, model.num_features)
    torch.testing.assert_close(model.head(features), model(x))


def test_inputs_outside_unit_range_are_accepted_for_noisy_samples(model: PainNet) -> None:
    # Smoothing adds unclipped Gaussian noise, so values slightly outside [0, 1] must go through.
    x = torch.rand(1, 3, SIZE, SIZE) + 0.3 * torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator())
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize(
    ("bad", "error", "text"),
    [
        (torch.rand(3, SIZE, SIZE), ValueError, "(3, 64, 64)"),
        (torch.rand(1, 1, SIZE, SIZE), ValueError, "(1, 1, 64, 64)"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), TypeError, "uint8"),
    ],
)
def test_bad_inputs_are_named(model: PainNet, bad: torch.Tensor, error: type, text: str) -> None:
    with pytest.raises(error, match=re.escape(text)):
        model(bad)


def test_gradcam_layer_is_the_last_convolutional_block(model: PainNet) -> None:
    captured = {}
    handle = model.gradcam_layer.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        model(torch.rand(1, 3, SIZE, SIZE))
    finally:
        handle.remove()
    feature_map = captured["out"]
    # The last stage of a ResNet: stride 32 and the backbone's feature channels.
    assert feature_map.shape == (1, model.num_features, SIZE // 32, SIZE // 32)
    assert model.gradcam_layer is model.backbone.layer4[-1]


def test_seed_gives_identical_models_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = create_model(ARCH, input_size=SIZE, seed=7)
    after = torch.rand(1)
    second = create_model(ARCH, input_size=SIZE, seed=7)
    other = create_model(ARCH, input_size=SIZE, seed=8)
    assert torch.equal(before, after), "create_model(seed=...) must not consume the global generator"
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.head.weight, other.head.weight)


def test_num_classes_is_not_fixed_to_two() -> None:
    model = create_model(ARCH, num_classes=10, input_size=32, seed=0)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"arch": "resnet_does_not_exist"}, "resnet_does_not_exist"),
        ({"num_classes": 1}, "num_classes"),
        ({"input_size": 4}, "input_size"),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.0, 0.5)}, "std"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, text: str) -> None:
    arguments = {"arch": ARCH, "input_size": SIZE} | kwargs
    with pytest.raises(ValueError, match=text):
        create_model(**arguments)


def test_hub_weights_offline_fail_fast_with_instructions() -> None:
    started = time.perf_counter()
    with pytest.raises(ModelWeightsError, match="weights_path=PATH") as error:
        create_model(ARCH, pretrained=True, input_size=SIZE)
    assert time.perf_counter() - started < 10, "offline must not wait for network time-outs"
    assert "HF_HUB_OFFLINE" in str(error.value) and "--weights PATH" in str(error.value)


def test_unreachable_hub_fails_fast_when_not_offline(monkeypatch) -> None:
    from painwatch.models import network

    monkeypatch.setattr(network, "_hub_offline", lambda: False)
    monkeypatch.setattr(network, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ModelWeightsError, match=r"huggingface\.co is not reachable.*timm/test_resnet"):
        create_model(ARCH, pretrained=True, input_size=SIZE)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_imagenet_weights_are_loaded_exactly(tmp_path, suffix: str) -> None:
    # An "ImageNet" checkpoint: the full timm model with its 1000-class classifier.
    source = timm.create_model(ARCH, pretrained=False, num_classes=1000)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"imagenet{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model(ARCH, weights_path=path, input_size=SIZE, seed=0)
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert model.head.out_features == 2  # the ImageNet classifier is replaced


def test_weights_of_another_architecture_are_rejected_with_the_keys(tmp_path) -> None:
    path = tmp_path / "resnet18.safetensors"
    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(ModelWeightsError, match=r"does not fit architecture 'test_resnet'.*(missing|shape)"):
        create_model(ARCH, weights_path=path, input_size=SIZE)


class _NotAWeight:
    """Any object that is not a tensor: a weights-only load must refuse to unpickle it."""


def test_pickled_objects_are_never_unpickled(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"payload": _NotAWeight()}, path)
    with pytest.raises(ModelWeightsError, match="weights-only"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_weight_files_are_named(tmp_path, content: bytes) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelWeightsError, match=r"broken\.safetensors"):
        create_model(ARCH, weights_path=path, input_size=SIZE)
    with pytest.raises(ModelWeightsError, match="does not exist"):
        create_model(ARCH, weights_path=tmp_path / "missing.safetensors", input_size=SIZE)
