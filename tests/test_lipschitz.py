"""lipschitz_upper_bound: sound (>= exact norms and power-iteration estimates) and tight on single layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from painwatch.robust.lipschitz import UnsupportedLayerError, lipschitz_lower_estimate, lipschitz_upper_bound
from painwatch.robust.spectral import conv_operator_norm_bound


def exact_operator_norm(layer: nn.Module, shape: tuple[int, ...]) -> float:
    """Spectral norm of an affine layer, from its full matrix (float64) built on the standard basis."""
    layer = layer.double()
    size = math.prod(shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *shape)
    with torch.no_grad():
        matrix = (layer(basis) - layer(torch.zeros(1, *shape, dtype=torch.float64))).reshape(size, -1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


CONV_CASES = [
    # (kwargs, the bound may exceed the exact norm by at most this factor)
    (dict(kernel_size=3, padding=1), 1.25),
    (dict(kernel_size=3, padding=0), 1.25),
    (dict(kernel_size=3, padding="same"), 1.25),
    (dict(kernel_size=(3, 5), padding=(0, 2)), 1.25),
    (dict(kernel_size=3, padding=2, dilation=2), 1.3),
    (dict(kernel_size=3, padding=1, groups=2), 1.25),
    (dict(kernel_size=3, padding=1, stride=2), 1.25),
    (dict(kernel_size=4, padding=1, stride=2), 1.25),
    (dict(kernel_size=3, padding=1, stride=(2, 3), dilation=(1, 2)), 1.3),
    (dict(kernel_size=1, stride=2), 1.0 + 1e-5),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), 2.5),
    (dict(kernel_size=3, padding=1, padding_mode="replicate"), 2.5),
    (dict(kernel_size=4, padding=1, padding_mode="circular"), 1.25),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("kwargs", "max_ratio"), CONV_CASES)
def test_conv_bound_is_sound_and_close_to_exact_norm(kwargs, max_ratio, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, **kwargs)
    shape = (4, 7, 6)
    bound = lipschitz_upper_bound(conv, shape)
    exact = exact_operator_norm(conv, shape)
    assert bound >= exact * (1 - 1e-9)
    assert bound <= exact * max_ratio


@pytest.mark.parametrize("shape", [(4, 6, 6), (4, 3, 4)])
def test_fft_bound_is_exact_for_circular_convolution(shape):
    # circular padding with 2p = k - 1 is exactly a circular convolution (even when the kernel wraps)
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 5, 5, padding=2, padding_mode="circular", bias=False)
    bound = lipschitz_upper_bound(conv, shape)
    assert bound == pytest.approx(exact_operator_norm(conv, shape), rel=2e-6)


def test_fft_bound_is_exact_for_strided_circular_convolution():
    # stride 2 on a grid divisible by 2: the polyphase symbol gives the exact norm
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2, padding_mode="circular", bias=False)
    bound = lipschitz_upper_bound(conv, (3, 6, 8))
    assert bound == pytest.approx(exact_operator_norm(conv, (3, 6, 8)), rel=2e-6)


def test_conv_bound_is_sound_on_random_configurations():
    generator = torch.Generator().manual_seed(7)

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    for _ in range(24):
        groups = draw(1, 2)
        kernel, dilation, stride = (
            (draw(1, 4), draw(1, 4)),
            (draw(1, 2), draw(1, 2)),
            (draw(1, 3), draw(1, 3)),
        )
        mode = ["zeros", "zeros", "circular", "reflect", "replicate"][draw(0, 4)]
        size = (draw(4, 7), draw(4, 7))
        padding = tuple(draw(0, min(2, size[dim] - 1)) for dim in range(2))
        conv = nn.Conv2d(
            2 * groups,
            2 * groups + 1 - (groups == 2),
            kernel,
            stride,
            padding,
            dilation,
            groups,
            padding_mode=mode,
        )
        shape = (2 * groups, *size)
        try:
            conv(torch.zeros(1, *shape))
        except RuntimeError:
            continue  # kernel larger than the padded input
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        description = f"{conv} on {shape}"
        assert lipschitz_upper_bound(conv, shape) >= exact_operator_norm(conv, shape) * (1 - 1e-9), (
            description
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1, output_padding=1),
        dict(kernel_size=4, stride=2, padding=1, groups=2),
        dict(kernel_size=3, stride=3, dilation=2),
    ],
)
def test_transposed_conv_bound_is_sound_and_close(kwargs):
    torch.manual_seed(5)
    layer = nn.ConvTranspose2d(4, 6, **kwargs)
    shape = (4, 4, 5)
    bound = lipschitz_upper_bound(layer, shape)
    exact = exact_operator_norm(layer, shape)
    assert exact * (1 - 1e-9) <= bound <= exact * 1.3


def test_conv1d_and_conv3d_bounds_are_sound():
    torch.manual_seed(0)
    conv1 = nn.Conv1d(3, 4, 5, padding=2, stride=2)
    conv3 = nn.Conv3d(2, 3, 3, padding=1)
    assert lipschitz_upper_bound(conv1, (3, 11)) >= exact_operator_norm(conv1, (3, 11))
    assert lipschitz_upper_bound(conv3, (2, 4, 4, 3)) >= exact_operator_norm(conv3, (2, 4, 4, 3))


def test_conv_operator_norm_bound_validates_its_inputs():
    weight = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="groups=3"):
        conv_operator_norm_bound(weight, input_size=(5, 5), padding=[(1, 1), (1, 1)], groups=3)
    with pytest.raises(ValueError, match="spatial sizes"):
        conv_operator_norm_bound(weight, input_size=(5,), padding=[(1, 1), (1, 1)])


def test_linear_bound_is_the_largest_singular_value():
    torch.manual_seed(0)
    linear = nn.Linear(30, 17)
    expected = float(torch.linalg.svdvals(linear.weight.detach().double())[0])
    assert lipschitz_upper_bound(linear, (30,)) == pytest.approx(expected, rel=1e-5)
    assert lipschitz_upper_bound(linear, (30,)) >= expected


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (nn.AvgPool2d(2), 0.5),  # non-overlapping k x k average: exactly 1 / k
        (nn.AdaptiveAvgPool2d(1), 1.0 / 6.0),  # global average over 36 pixels: 1 / sqrt(36)
        (nn.MaxPool2d(2), 1.0),
        (nn.MaxPool2d(3, stride=1, padding=1), 3.0),  # each pixel in 9 windows: sqrt(9), attained
        (nn.ReflectionPad2d(2), 2.0),  # corner pixels copied 2 x 2 times
        (nn.ZeroPad2d(1), 1.0),
    ],
)
def test_pooling_and_padding_constants(layer, expected):
    assert lipschitz_upper_bound(layer, (3, 6, 6)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "layer",
    [
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.AvgPool2d(3, stride=2, ceil_mode=True),
        nn.AdaptiveAvgPool2d(4),
    ],
)
def test_average_pooling_bound_is_sound(layer):
    assert lipschitz_upper_bound(layer, (2, 7, 7)) >= exact_operator_norm(layer, (2, 7, 7)) * (1 - 1e-9)


@pytest.mark.parametrize(
    "layer",
    [nn.MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(2, stride=1), nn.AdaptiveMaxPool2d(3)],
)
def test_max_pooling_bound_is_sound(layer, generator):
    bound = lipschitz_upper_bound(layer, (2, 7, 7))
    estimate = lipschitz_lower_estimate(layer, (2, 7, 7), num_points=16, iterations=30, generator=generator)
    assert bound >= estimate * (1 - 1e-6)


@pytest.mark.parametrize(
    ("layer", "constant"),
    [
        (nn.ReLU(), 1.0),
        (nn.LeakyReLU(0.2), 1.0),
        (nn.LeakyReLU(3.0), 3.0),
        (nn.ELU(0.5), 1.0),
        (nn.Tanh(), 1.0),
        (nn.Sigmoid(), 0.25),
        (nn.GELU(), None),
        (nn.GELU(approximate="tanh"), None),
        (nn.SiLU(), None),
        (nn.Mish(), None),
        (nn.SELU(), None),
        (nn.Softplus(beta=3.0), 1.0),
    ],
)
def test_activation_constants_bound_the_largest_derivative(layer, constant):
    bound = lipschitz_upper_bound(layer, (5,))
    if constant is not None:
        assert bound == pytest.approx(constant)
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(layer(grid).sum(), grid)
    largest = float(slope.abs().max())
    assert largest <= bound
    assert bound <= largest * 1.001


def test_batchnorm_in_eval_mode_is_its_largest_scale():
    norm = nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        norm.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    norm.eval()
    expected = max(
        0.5 / math.sqrt(1 + norm.eps), 2.0 / math.sqrt(4 + norm.eps), 1.0 / math.sqrt(0.25 + norm.eps)
    )
    assert lipschitz_upper_bound(norm, (3, 4, 4)) == pytest.approx(expected, rel=1e-5)
    assert lipschitz_upper_bound(norm, (3, 4, 4)) >= exact_operator_norm(norm, (3, 4, 4))


def test_batchnorm_in_training_mode_is_refused_and_left_untouched():
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3))
    before = model[1].running_mean.clone()
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(BatchNorm2d\).*eval"):
        lipschitz_upper_bound(model, (3, 6, 6))
    model.eval()
    lipschitz_upper_bound(model, (3, 6, 6))
    assert torch.equal(model[1].running_mean, before)


class Standardize(nn.Module):
    def __init__(self, mean, std, broken: bool = False, buffer_shape=(-1, 1, 1)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(buffer_shape))
        self.register_buffer("std", torch.tensor(std).view(buffer_shape))
        self.broken = broken

    def forward(self, x):
        return (x - self.mean) * self.std if self.broken else (x - self.mean) / self.std


@pytest.mark.parametrize("buffer_shape", [(-1, 1, 1), (1, -1, 1, 1), (-1,)])
def test_normalisation_layer_with_std_is_one_over_the_smallest_std(buffer_shape):
    layer = Standardize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], buffer_shape=buffer_shape)
    if buffer_shape == (-1,):  # per-channel vectors: the layer must broadcast them itself
        layer.forward = lambda x: (x - layer.mean.view(-1, 1, 1)) / layer.std.view(-1, 1, 1)
    assert lipschitz_upper_bound(layer, (3, 5, 5)) == pytest.approx(1 / 0.224, rel=1e-5)
    with pytest.raises(UnsupportedLayerError, match="does not compute"):
        lipschitz_upper_bound(Standardize([0.5] * 3, [0.2] * 3, broken=True), (3, 5, 5))


def random_networks() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return [
        (
            "mlp",
            nn.Sequential(
                nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
            ),
            (3, 4, 4),
        ),
        (
            "conv-stride-groups",
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                nn.LeakyReLU(0.1),
                nn.Conv2d(8, 6, 3, padding=0, dilation=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(6 * 2 * 2, 5),
            ),
            (3, 8, 8),
        ),
        (
            "conv-pool-bn",
            nn.Sequential(
                Standardize([0.5, 0.4, 0.3], [0.3, 0.25, 0.2]),
                nn.Conv2d(3, 6, 5, padding=2),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, stride=2), nn.ELU()),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Dropout(0.3),
                nn.Linear(6, 3),
            ),
            (3, 8, 8),
        ),
    ]


@pytest.mark.parametrize("index", range(3))
def test_network_bound_dominates_power_iteration(index, generator):
    name, network, shape = random_networks()[index]
    network.eval()
    bound = lipschitz_upper_bound(network, shape)
    estimate = lipschitz_lower_estimate(network, shape, num_points=6, iterations=30, generator=generator)
    assert estimate > 0, name
    assert bound >= estimate * (1 - 1e-5), name
    assert bound <= estimate * 200, name  # a product of layer norms, but not absurdly loose


def test_linear_network_bound_dominates_its_exact_norm():
    torch.manual_seed(1)
    network = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    bound = lipschitz_upper_bound(network, (2, 6, 6))
    exact = exact_operator_norm(network, (2, 6, 6))
    assert bound >= exact
    estimate = lipschitz_lower_estimate(network, (2, 6, 6), num_points=1, iterations=60)
    assert exact * 0.97 <= estimate <= exact * (1 + 1e-5)  # the lower estimate finds the norm of a linear map


class PlainSequential(nn.Sequential):
    """A subclass that keeps nn.Sequential's forward: composed like nn.Sequential."""


class ReversedSequential(nn.Sequential):
    def forward(self, x):
        for layer in reversed(self):
            x = layer(x)
        return x


def test_sequential_subclasses_are_composed_only_with_the_inherited_forward():
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)]
    assert lipschitz_upper_bound(PlainSequential(*layers), (4,)) == pytest.approx(
        lipschitz_upper_bound(nn.Sequential(*layers), (4,))
    )
    with pytest.raises(UnsupportedLayerError, match="ReversedSequential"):
        lipschitz_upper_bound(ReversedSequential(*layers), (4,))


def test_unsupported_layer_error_names_its_path_and_type():
    network = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.ReLU(), nn.LayerNorm(6)), nn.Linear(6, 2))
    with pytest.raises(UnsupportedLayerError, match=r"'1\.1' \(LayerNorm\)") as info:
        lipschitz_upper_bound(network, (6,))
    assert info.value.path == "1.1"
    assert info.value.layer_type == "LayerNorm"


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.body(x)


class DeclaresItsBound(Residual):
    def lipschitz_upper_bound(self, input_shape):
        return 1.0 + lipschitz_upper_bound(self.body, input_shape)


def test_custom_containers_must_declare_their_bound():
    with pytest.raises(UnsupportedLayerError, match=r"'<root>' \(Residual\).*composition"):
        lipschitz_upper_bound(Residual(), (4,))
    torch.manual_seed(0)
    block = DeclaresItsBound()
    bound = lipschitz_upper_bound(nn.Sequential(block, nn.ReLU()), (4,))
    body_norm = float(torch.linalg.svdvals(block.body.weight.detach().double())[0])
    assert bound == pytest.approx(1.0 + body_norm, rel=1e-5)
    assert bound >= lipschitz_lower_estimate(block, (4,), iterations=100)


@pytest.mark.parametrize("shape", [(), (3, 0, 4), (3, -1), "3x4", (3.0, 4)])
def test_bad_input_shape_is_rejected(shape):
    with pytest.raises(ValueError, match="input_shape"):
        lipschitz_upper_bound(nn.ReLU(), shape)


def test_shape_mismatch_names_the_layer():
    network = nn.Sequential(nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(Linear\) rejects an input of shape \(12,\)"):
        lipschitz_upper_bound(network, (3, 4))


def test_not_a_module_is_rejected():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        lipschitz_upper_bound(lambda x: x, (3,))
