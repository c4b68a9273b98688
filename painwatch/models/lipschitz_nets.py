"""Lipschitz networks for face crops: the architectures ``create_model(arch="lip-...")`` builds.

Each is a backbone of 1-Lipschitz layers of :mod:`painwatch.robust` (docs/design.md, "Lipschitz
networks for face crops") for 3-channel crops with pixels in [0, 1], normalised inside
:class:`painwatch.models.PainNet` as every model is:

- a stem that widens the colour channels to ``width`` (an AOL [Prach22] or BCOP [Li19] convolution);
- stages at halving resolutions, each ``depth`` layers: SLL residual convolutions [Araujo23]
  (``"sll"``), or an AOL / BCOP convolution followed by MaxMin [Anil19] (``"aol"``, ``"bcop"``);
- after each stage a 2x downsampling that loses nothing: the invertible pixel unshuffle (4x the
  channels, an orthogonal map) then a 1x1 AOL / BCOP convolution to twice the channels;
- a sum pool over ``pool x pool`` windows divided by ``pool`` (1-Lipschitz: the sum of ``pool^2``
  values has norm at most ``pool`` times theirs), flattened;
- ``dense`` dense layers (SLL residual, or AOL / orthogonal + MaxMin);
- the head: an orthogonal dense layer (Björck [Bjorck71; Anil19]) to the classes, so that the logit
  margin of two classes is exactly ``sqrt(2)``-Lipschitz in the features.

Every layer declares a sound bound, so :func:`painwatch.robust.lipschitz_upper_bound` bounds the whole
network (normalisation ``1 / min(std)`` included) and the Lipschitz-margin certificate [Tsuzuku18]
needs one forward pass. The ``"aol"`` and ``"bcop"`` networks have moment-propagation rules for every
layer (the MSCR loss [RC, Ch. 3]); the SLL ones train with cross-entropy or MCR.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from painwatch.robust.layers import InvertibleDownsampling, MaxMin, OrthogonalConv2d, OrthogonalLinear
from painwatch.robust.lipschitz_layers import AOLConv2d, AOLLinear, SLLConv2d, SLLLinear

__all__ = [
    "LIPSCHITZ_ARCHITECTURES",
    "LipschitzArchitecture",
    "LipschitzBackbone",
    "build_lipschitz_network",
    "is_lipschitz_architecture",
]

CONVOLUTIONS = ("sll", "aol", "bcop")


@dataclass(frozen=True, kw_only=True)
class LipschitzArchitecture:
    """A Lipschitz network: ``convolution`` one of :data:`CONVOLUTIONS`; ``width`` the channels of the
    first stage (doubled at each downsampling); ``depths`` the layers per stage; ``pool`` the final
    sum-pool window; ``dense`` the dense layers before the head."""

    name: str
    convolution: str
    width: int
    depths: tuple[int, ...]
    pool: int
    dense: int
    description: str

    @property
    def reduction(self) -> int:
        """How many times smaller (per side) the last feature map is than the input."""
        return 2 ** len(self.depths) * self.pool

    def num_features(self, input_size: int) -> int:
        """Features before the head for square inputs of ``input_size`` pixels."""
        side = input_size // self.reduction
        return self.width * 2 ** len(self.depths) * side * side


LIPSCHITZ_ARCHITECTURES: dict[str, LipschitzArchitecture] = {
    spec.name: spec
    for spec in (
        LipschitzArchitecture(
            name="lip-sll-small", convolution="sll", width=16, depths=(2, 2, 2), pool=4, dense=1,
            description="SLL residual network, 3 stages of 2 layers from 16 channels (64 px: 512 features)",
        ),
        LipschitzArchitecture(
            name="lip-sll-medium", convolution="sll", width=24, depths=(3, 3, 3), pool=4, dense=2,
            description="SLL residual network, 3 stages of 3 layers from 24 channels",
        ),
        LipschitzArchitecture(
            name="lip-aol-small", convolution="aol", width=16, depths=(2, 2, 2), pool=4, dense=1,
            description="AOL convolutions with MaxMin, 3 stages of 2 layers from 16 channels",
        ),
        LipschitzArchitecture(
            name="lip-bcop-small", convolution="bcop", width=16, depths=(1, 1, 1), pool=4, dense=1,
            description="BCOP orthogonal convolutions with MaxMin, 3 stages of 1 layer from 16 channels",
        ),
        LipschitzArchitecture(
            name="lip-sll-tiny", convolution="sll", width=4, depths=(1, 1), pool=2, dense=1,
            description="a tiny SLL network (tests and quick trials)",
        ),
        LipschitzArchitecture(
            name="lip-aol-tiny", convolution="aol", width=4, depths=(1, 1), pool=2, dense=1,
            description="a tiny AOL network (tests and quick trials)",
        ),
    )
}
"""The registered Lipschitz architectures, by name (what ``--arch`` accepts besides timm names)."""


def is_lipschitz_architecture(arch: str) -> bool:
    """True when ``arch`` names a registered Lipschitz network (:data:`LIPSCHITZ_ARCHITECTURES`)."""
    return isinstance(arch, str) and arch in LIPSCHITZ_ARCHITECTURES


class LipschitzBackbone(nn.Sequential):
    """The layers of a Lipschitz network up to the head, as a plain ``nn.Sequential`` (so that its
    bound is the product of its layers'). ``num_features`` is the width of its ``(B, F)`` output;
    ``feature_info`` names each convolutional stage and how many times smaller than the input its output
    is, deepest last, as timm backbones do (Grad-CAM and the in-distribution check read it)."""

    def __init__(self, layers: OrderedDict[str, nn.Module], *, num_features: int,
                 stages: Sequence[tuple[str, int]]) -> None:
        super().__init__(layers)
        self.num_features = int(num_features)
        self.feature_info = [{"module": name, "reduction": int(reduction)} for name, reduction in stages]


def _convolution(kind: str, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    if kind == "bcop":
        return OrthogonalConv2d(in_channels, out_channels, kernel_size)
    return AOLConv2d(in_channels, out_channels, kernel_size)


def _stage(kind: str, channels: int, depth: int) -> nn.Sequential:
    if kind == "sll":
        return nn.Sequential(*(SLLConv2d(channels) for _ in range(depth)))
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [_convolution(kind, channels, channels, 3), MaxMin()]
    return nn.Sequential(*layers)


def _dense(kind: str, features: int, count: int) -> list[nn.Module]:
    if kind == "sll":
        return [SLLLinear(features) for _ in range(count)]
    layers: list[nn.Module] = []
    for _ in range(count):
        if kind == "bcop":
            layers += [OrthogonalLinear(features, features, bias=True), MaxMin()]
        else:
            layers += [AOLLinear(features, features), MaxMin()]
    return layers


def build_lipschitz_network(
    arch: str, *, input_size: int, in_chans: int, num_classes: int
) -> tuple[LipschitzBackbone, nn.Module]:
    """The backbone and the orthogonal head of Lipschitz architecture ``arch`` for square inputs of
    ``input_size`` pixels with ``in_chans`` channels. Parameters are drawn from the global random
    state (``create_model(seed=...)`` fixes it). Raises ``ValueError`` for an unknown name or an input
    size the network's downsampling cannot divide."""
    if not is_lipschitz_architecture(arch):
        raise ValueError(
            f"unknown Lipschitz architecture {arch!r}; choose one of {', '.join(LIPSCHITZ_ARCHITECTURES)}"
        )
    spec = LIPSCHITZ_ARCHITECTURES[arch]
    if input_size % spec.reduction:
        raise ValueError(
            f"architecture {arch!r} halves the input {len(spec.depths)} times and sum-pools by {spec.pool}: "
            f"input_size must be a multiple of {spec.reduction} pixels, got {input_size}"
        )
    kind, channels = spec.convolution, spec.width
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["stem"] = _convolution(kind, in_chans, channels, 3)
    for index, depth in enumerate(spec.depths, start=1):
        layers[f"stage{index}"] = _stage(kind, channels, depth)
        layers[f"down{index}"] = nn.Sequential(
            InvertibleDownsampling(2), _convolution(kind, 4 * channels, 2 * channels, 1)
        )
        channels *= 2
    if spec.pool > 1:
        layers["pool"] = nn.AvgPool2d(spec.pool, divisor_override=spec.pool)
    layers["flatten"] = nn.Flatten()
    features = spec.num_features(input_size)
    dense = _dense(kind, features, spec.dense)
    if dense:
        layers["dense"] = nn.Sequential(*dense)
    stages = [(f"stage{index}", 2 ** (index - 1)) for index in range(1, len(spec.depths) + 1)]
    backbone = LipschitzBackbone(layers, num_features=features, stages=stages)
    head = OrthogonalLinear(features, num_classes, bias=True)
    return backbone, head
