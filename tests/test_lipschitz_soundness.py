"""lipschitz_upper_bound is sound for every module: overridden forwards and hooks are refused (unless the
layer declares its bound), parametrized weights are bounded as computed, fused activations count."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.layers import activations as timm_activations
from timm.layers import norm_act
from timm.layers.linear import Linear as TimmLinear
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from painwatch.robust.layers import OrthogonalLinear
from painwatch.robust.lipschitz import UnsupportedLayerError, lipschitz_lower_estimate, lipschitz_upper_bound


def wide_points(shape: tuple[int, ...], count: int = 32, spread: float = 6.0) -> torch.Tensor:
    """Inputs uniform in [-spread, spread], so that activations reach their steepest slopes."""
    generator = torch.Generator().manual_seed(1)
    return spread * (2 * torch.rand((count, *shape), generator=generator) - 1)


def estimate(module: nn.Module, shape: tuple[int, ...], spread: float = 6.0) -> float:
    module.eval()
    return lipschitz_lower_estimate(
        module, shape, iterations=60, inputs=wide_points(shape, spread=spread),
        generator=torch.Generator().manual_seed(0),
    )


class TimesTen(nn.Linear):
    def forward(self, x):
        return 10 * super().forward(x)


class PlusIdentity(nn.Linear):
    def forward(self, x):
        return x + super().forward(x)


class PlusIdentityDeclared(PlusIdentity):
    def lipschitz_upper_bound(self, input_shape):
        return 1.0 + float(torch.linalg.matrix_norm(self.weight.detach().double(), ord=2))


def plain_copy(layer: nn.Linear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features)
    plain.load_state_dict(layer.state_dict())
    return plain


@pytest.mark.parametrize(("layer_class", "wrap"), [(TimesTen, True), (PlusIdentity, False)])
def test_linear_subclass_overriding_forward_is_refused(layer_class, wrap):
    torch.manual_seed(0)
    layer = layer_class(8, 8)
    network = nn.Sequential(layer) if wrap else layer
    # The parent's bound (the answer before the check) is below what the layer really does.
    assert lipschitz_upper_bound(plain_copy(layer), (8,)) < estimate(network, (8,)) * 0.9
    with pytest.raises(UnsupportedLayerError, match="overrides forward") as info:
        lipschitz_upper_bound(network, (8,))
    assert info.value.path == ("0" if wrap else "<root>")
    assert info.value.layer_type == layer_class.__name__


def test_overriding_subclass_that_declares_its_bound_is_trusted():
    torch.manual_seed(0)
    layer = PlusIdentityDeclared(8, 8)
    bound = lipschitz_upper_bound(nn.Sequential(layer, nn.ReLU()), (8,))
    assert bound == pytest.approx(layer.lipschitz_upper_bound((8,)))
    assert bound >= estimate(layer, (8,))


class ConvWithTwiceTheKernel(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


class TaggedLinear(nn.Linear):
    """Adds an attribute, keeps nn.Linear's computation."""

    def __init__(self, *args, tag: str = "head", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tag = tag


def test_overriding_a_helper_of_forward_or_the_instance_forward_is_refused():
    with pytest.raises(UnsupportedLayerError, match="overrides _conv_forward"):
        lipschitz_upper_bound(ConvWithTwiceTheKernel(2, 2, 3, padding=1), (2, 5, 5))
    layer = nn.Linear(4, 4)
    layer.forward = lambda x: 10 * F.linear(x, layer.weight, layer.bias)
    with pytest.raises(UnsupportedLayerError, match="replaces forward on the instance"):
        lipschitz_upper_bound(layer, (4,))


def test_subclass_keeping_the_parent_computation_keeps_its_bound():
    torch.manual_seed(0)
    layer = TaggedLinear(6, 5)
    assert lipschitz_upper_bound(layer, (6,)) == lipschitz_upper_bound(plain_copy(layer), (6,))


class ReorderedSequential(nn.Sequential):
    def __iter__(self):
        return reversed(list(self._modules.values()))


def test_sequential_subclass_changing_its_iteration_is_refused():
    with pytest.raises(UnsupportedLayerError, match="overrides __iter__"):
        lipschitz_upper_bound(ReorderedSequential(nn.Linear(4, 4), nn.ReLU()), (4,))


def test_l2_pooling_bound_counts_overlapping_windows():
    pool = nn.LPPool2d(2, 3, stride=1)
    bound = lipschitz_upper_bound(pool, (2, 6, 6))
    assert bound == pytest.approx(3.0, rel=1e-5)  # a centre pixel lies in 9 windows
    assert bound >= estimate(pool, (2, 6, 6), spread=1.0)
    with pytest.raises(UnsupportedLayerError, match="norm_type=3"):
        lipschitz_upper_bound(nn.LPPool2d(3, 2), (2, 6, 6))


# --- hooks -------------------------------------------------------------------------------------------------


def test_forward_hook_is_refused_until_removed():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    plain_bound = lipschitz_upper_bound(network, (6,))
    handle = network[2].register_forward_hook(lambda module, inputs, output: 10 * output)
    try:
        assert estimate(network, (6,)) > plain_bound
        with pytest.raises(UnsupportedLayerError, match=r"'2' \(Linear\): has a forward hook"):
            lipschitz_upper_bound(network, (6,))
    finally:
        handle.remove()
    assert lipschitz_upper_bound(network, (6,)) == plain_bound


def test_forward_pre_hook_is_refused():
    network = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    handle = network.register_forward_pre_hook(lambda module, inputs: (5 * inputs[0],))
    try:
        with pytest.raises(UnsupportedLayerError, match=r"'<root>' \(Sequential\): has a forward pre-hook"):
            lipschitz_upper_bound(network, (4,))
    finally:
        handle.remove()


def test_hook_based_weight_normalisation_is_refused_and_its_parametrization_bounded():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook-based version is deprecated upstream
        hooked = torch.nn.utils.spectral_norm(nn.Linear(5, 5))
    with pytest.raises(UnsupportedLayerError, match=r"forward pre-hook \(SpectralNorm\).*parametrizations"):
        lipschitz_upper_bound(hooked.eval(), (5,))
    parametrized = parametrizations.spectral_norm(nn.Linear(5, 5)).eval()
    assert lipschitz_upper_bound(parametrized, (5,)) >= estimate(parametrized, (5,)) * (1 - 1e-5)


def test_global_forward_hook_is_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        with pytest.raises(UnsupportedLayerError, match="global forward hook"):
            lipschitz_upper_bound(nn.Linear(3, 3), (3,))
    finally:
        handle.remove()
    lipschitz_upper_bound(nn.Linear(3, 3), (3,))


def test_a_declared_bound_answers_for_the_hooks_of_its_layer():
    layer = OrthogonalLinear(5, 5)
    seen = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    try:
        assert lipschitz_upper_bound(layer, (5,)) == pytest.approx(1.0, abs=1e-5)
    finally:
        handle.remove()


# --- parametrizations --------------------------------------------------------------------------------------


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, weight):
        return self.factor * weight


class Jitter(nn.Module):
    def forward(self, weight):
        return weight * (1 + 0.1 * torch.rand_like(weight))


def test_parametrized_weight_is_bounded_as_computed():
    torch.manual_seed(0)
    layer = nn.Linear(7, 5)
    raw_norm = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    parametrize.register_parametrization(layer, "weight", Scale(10.0))
    assert type(layer).__name__ == "ParametrizedLinear"
    bound = lipschitz_upper_bound(layer, (7,))
    assert bound == pytest.approx(10 * raw_norm, rel=1e-5)
    assert bound >= estimate(layer, (7,))

    conv = parametrizations.spectral_norm(nn.Conv2d(2, 3, 3, padding=1)).eval()
    conv_bound = lipschitz_upper_bound(conv, (2, 6, 6))
    assert conv_bound >= estimate(conv, (2, 6, 6)) * (1 - 1e-5)

    orthogonal = parametrizations.orthogonal(nn.Linear(6, 6))
    assert lipschitz_upper_bound(orthogonal, (6,)) == pytest.approx(1.0, abs=1e-5)


def test_training_mode_spectral_norm_is_bounded_for_the_next_forward_and_left_untouched():
    torch.manual_seed(0)
    layer = parametrizations.spectral_norm(nn.Linear(6, 6, bias=False))  # training mode
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(torch.linspace(0.2, 3.0, 6))
    state = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    bound = lipschitz_upper_bound(layer, (6,))
    assert all(torch.equal(state[name], tensor) for name, tensor in layer.state_dict().items())
    with torch.no_grad():
        applied = layer(torch.eye(6)).T  # the weight this forward pass (one more power step) used
    assert bound == pytest.approx(float(torch.linalg.matrix_norm(applied.double(), ord=2)), rel=1e-5)


def test_random_parametrization_is_refused():
    layer = nn.Linear(4, 4)
    parametrize.register_parametrization(layer, "weight", Jitter())
    with pytest.raises(UnsupportedLayerError, match="differs between two evaluations"):
        lipschitz_upper_bound(layer, (4,))


# --- fused activations (timm) ---------------------------------------------------------------------------


def batchnorm_act(act_layer) -> nn.Module:
    layer = norm_act.BatchNormAct2d(3, act_layer=act_layer)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        layer.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    return layer.eval()


@pytest.mark.parametrize(
    ("act_layer", "constant"), [(nn.GELU, 1.12899), (nn.SiLU, 1.09984), ("gelu", 1.12899), (nn.ReLU, 1.0)]
)
def test_batchnorm_act_bound_includes_the_activation(act_layer, constant):
    layer = batchnorm_act(act_layer)
    scale = 1.0 / math.sqrt(0.25 + layer.eps)  # the largest |weight| / sqrt(var + eps)
    bound = lipschitz_upper_bound(layer, (3, 4, 4))
    assert scale * constant <= bound <= scale * constant * 1.0002
    assert bound >= estimate(layer, (3, 4, 4)) * (1 - 1e-5)
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(layer.state_dict())
    if constant > 1:  # the batch norm's bound alone, the answer before the fix, is exceeded
        assert estimate(layer, (3, 4, 4)) > lipschitz_upper_bound(plain, (3, 4, 4)) * 1.05


class Unknown(nn.Module):
    def forward(self, x):
        return 3 * x


def test_batchnorm_act_in_training_mode_or_with_an_unknown_activation_is_refused():
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        lipschitz_upper_bound(batchnorm_act(nn.SiLU).train(), (3, 4, 4))
    layer = batchnorm_act(nn.SiLU)
    layer.act = Unknown()
    with pytest.raises(UnsupportedLayerError, match=r"'1\.act' \(Unknown\)"):
        lipschitz_upper_bound(nn.Sequential(nn.Identity(), layer), (3, 4, 4))


def test_frozen_batchnorm_act_bound():
    layer = norm_act.FrozenBatchNormAct2d(3, act_layer=nn.GELU)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 3.0, -0.5]))
        layer.running_var.copy_(torch.tensor([1.0, 4.0, 1.0]))
    bound = lipschitz_upper_bound(layer, (3, 4, 4))
    assert bound == pytest.approx(3.0 / math.sqrt(4.0 + layer.eps) * 1.1291, rel=1e-5)
    assert bound >= estimate(layer, (3, 4, 4), spread=2.0)


@pytest.mark.parametrize(
    "layer",
    [
        norm_act.GroupNormAct(4, num_groups=2, act_layer=nn.ReLU),
        norm_act.LayerNormAct2d(4, act_layer=nn.ReLU),
        norm_act.RmsNormAct2d(4, act_layer=nn.ReLU),
    ],
)
def test_normalisation_by_own_statistics_is_refused_with_or_without_activation(layer):
    with pytest.raises(UnsupportedLayerError, match="statistic of its own input"):
        lipschitz_upper_bound(layer.eval(), (4, 3, 3))


@pytest.mark.parametrize(
    "layer",
    [
        timm_activations.GELU(),
        timm_activations.GELUTanh(),
        timm_activations.QuickGELU(),
        timm_activations.Swish(),
        timm_activations.Mish(),
        timm_activations.Sigmoid(),
        timm_activations.Tanh(),
        timm_activations.HardSigmoid(),
        timm_activations.HardSwish(),
        timm_activations.HardMish(),
        timm_activations.PReLU(1, init=-1.5).double(),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_timm_activation_constants_bound_the_largest_derivative(layer):
    bound = lipschitz_upper_bound(layer, (1,))
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64).reshape(-1, 1).requires_grad_(True)
    (slope,) = torch.autograd.grad(layer(grid).sum(), grid)
    largest = float(slope.abs().max())
    assert largest <= bound <= largest * 1.001


def test_timm_linear_is_bounded_like_nn_linear():
    torch.manual_seed(0)
    layer = TimmLinear(6, 4)
    assert lipschitz_upper_bound(layer, (6,)) == lipschitz_upper_bound(plain_copy(layer), (6,))
