"""Lipschitz rules for the layers of timm and deel-torchlip, active once those libraries are loaded.

An instance of a library's class can only exist once the module defining it is imported, so the rules
are built from ``sys.modules`` and this module imports neither library. Each rule is keyed on the
library's class object and on the functions its forward pass runs (never on a class name; see
:mod:`painwatch.robust.lipschitz_rules`), and each bound is derived from what that code computes, not
from the Lipschitz coefficient a layer declares:

- timm: ``BatchNormAct2d`` and ``FrozenBatchNormAct2d`` (normalisation, then ``drop`` and ``act``,
  each bounded in turn), the activation layers of ``timm.layers.activations`` and timm's ``Linear``.
  timm's group, layer and RMS normalisations, with or without a fused activation, are refused (they
  divide by their input's own statistics).
- deel-torchlip: the padded convolutions behind ``SpectralConv1d/2d`` and ``FrobeniusConv2d`` (a
  symmetric padding, then a convolution: FFT bound [Sedghi19] of the parametrized kernel),
  ``MaxMin``, ``GroupSort`` (``GroupSort2``, ``FullSort``) [Anil19], ``LPReLU``, ``HouseHolder``, the
  scaled average and L2-norm poolings, ``LayerCentering`` and ``ScaleBiasLayer``. ``SpectralLinear``,
  ``FrobeniusLinear``, ``SpectralConvTranspose2d`` and the invertible down/up-sampling keep their torch
  parent's computation (parametrized weights) and need no rule; ``BatchLipNorm`` and ``BatchCentering``
  are refused (batch statistics, running sums updated inside forward).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import nn

from painwatch.robust.lipschitz_rules import (
    GELU_BOUND,
    MISH_BOUND,
    OWN_STATISTICS_REASON,
    SILU_BOUND,
    LayerContext,
    LayerRule,
    UnsupportedLayerError,
    affine_scale_bound,
    batchnorm_bound,
    constant_bound,
    copying_pad_bound,
    l2_pool_bound,
    linear_bound,
    nonnegative_linear_bound,
    prelu_bound,
)
from painwatch.robust.spectral import conv_layer_norm_bound

# Serves lipschitz_upper_bound only; nothing here is part of painwatch.robust's API.
__all__: list[str] = []


def _loaded(module_name: str, *class_names: str) -> list[type] | None:
    """The named classes of an already imported module, or None when it is not imported (or lacks one)."""
    module = sys.modules.get(module_name)
    if module is None:
        return None
    classes = [getattr(module, name, None) for name in class_names]
    if not all(isinstance(layer_class, type) for layer_class in classes):
        return None
    return classes


def _fused_tail_bound(module: nn.Module, context: LayerContext, value: float) -> float:
    """``value`` times the bounds of the ``drop`` and ``act`` sub-modules applied after it."""
    shape = context.output_shape
    for name in ("drop", "act"):
        child = getattr(module, name, None)
        if not isinstance(child, nn.Module):
            raise UnsupportedLayerError(context.path, module, f"its {name!r} is not a module")
        child_bound, child_shape = context.bound_child(child, name, shape)
        if child_shape != shape:
            raise UnsupportedLayerError(context.path, module, f"its {name!r} changes the sample shape")
        value *= child_bound
    return value


def _batchnorm_act_bound(module, context: LayerContext) -> float:
    """timm ``BatchNormAct2d``: eval-mode batch norm, then ``drop`` (identity in eval), then ``act``."""
    return _fused_tail_bound(module, context, batchnorm_bound(module, context))


def _frozen_batchnorm_act_bound(module, context: LayerContext) -> float:
    """timm ``FrozenBatchNormAct2d``: ``x * weight / sqrt(running_var + eps) + shift``, then drop, act."""
    return _fused_tail_bound(
        module, context, affine_scale_bound(module.weight, module.running_var, float(module.eps))
    )


def _timm_rules() -> list[LayerRule]:
    rules: list[LayerRule] = []
    norm_act = _loaded("timm.layers.norm_act", "BatchNormAct2d", "FrozenBatchNormAct2d")
    if norm_act is not None:
        batchnorm_act, frozen_act = norm_act
        rules += [
            LayerRule(batchnorm_act, _batchnorm_act_bound),
            LayerRule(frozen_act, _frozen_batchnorm_act_bound),
        ]
    constants = {
        "GELU": GELU_BOUND,
        "GELUTanh": GELU_BOUND,
        "QuickGELU": SILU_BOUND,  # x sigmoid(1.702 x): SiLU' evaluated at 1.702 x
        "Swish": SILU_BOUND,
        "Mish": MISH_BOUND,
        "Sigmoid": 0.25,
        "Tanh": 1.0,
        "HardSigmoid": 1.0 / 6.0,
        "HardSwish": 1.5,
        "HardMish": 1.0,  # slopes x + 1 on [-2, 0], 1 above, 0 below
    }
    activations = _loaded("timm.layers.activations", *constants, "PReLU")
    if activations is not None:
        *constant_classes, timm_prelu = activations
        rules += [
            LayerRule(layer_class, constant_bound(value))
            for layer_class, value in zip(constant_classes, constants.values(), strict=True)
        ]
        rules.append(LayerRule(timm_prelu, prelu_bound))  # F.prelu(x, weight), as nn.PReLU
    linear = _loaded("timm.layers.linear", "Linear")
    if linear is not None:  # F.linear(x, weight, bias), the weight cast to the input's dtype
        rules.append(LayerRule(linear[0], linear_bound))
    return rules


# --- deel-torchlip -------------------------------------------------------------------------------------


def _identity_lambda_code(layer_class: type) -> types.CodeType | None:
    """The code of the ``lambda x: x`` that ``layer_class.__init__`` creates (torchlip's padded
    convolutions pad with it unless symmetric), checked to be the identity's bytecode."""
    identity = (lambda x: x).__code__
    for constant in layer_class.__init__.__code__.co_consts:
        if (
            isinstance(constant, types.CodeType)
            and constant.co_name == "<lambda>"
            and constant.co_argcount == 1
            and constant.co_code == identity.co_code
        ):
            return constant
    return None


def _padded_conv_rule(layer_class: type, torch_parent: type) -> LayerRule:
    identity_code = _identity_lambda_code(layer_class)

    def bound(module, context: LayerContext) -> float:
        """``Conv.forward(pad(x))``: the padding's bound times the FFT bound of the convolution on the
        padded input (the parametrized kernel, as computed)."""
        if getattr(super(layer_class, module).forward, "__func__", None) is not torch_parent.forward:
            raise UnsupportedLayerError(
                context.path, module, f"its forward no longer reaches {torch_parent.__name__}.forward"
            )
        pad = module.pad
        if isinstance(pad, nn.Module):
            pad_bound, padded_shape = context.bound_child(pad, "pad", context.input_shape)
        elif identity_code is not None and getattr(pad, "__code__", None) is identity_code:
            pad_bound, padded_shape = 1.0, context.input_shape
        else:
            raise UnsupportedLayerError(
                context.path, module, f"its pad attribute {pad!r} is neither a module nor the identity"
            )
        return pad_bound * conv_layer_norm_bound(module, padded_shape, context.output_shape)

    return LayerRule(layer_class, bound, ("forward", "_conv_forward"))


def _coefficient_bound(module, context: LayerContext) -> float:
    """A 1-Lipschitz map (max-min, group sort: piecewise permutations) times ``_coefficient_lip``."""
    return abs(float(module._coefficient_lip))


def _lprelu_bound(module, context: LayerContext) -> float:
    """``prelu(x, clamp(weight, -k, k))``: slope 1 above 0, the clamped weight below."""
    k = module._coefficient_lip
    clamped = torch.clamp(module.weight.detach().to(torch.float64), -k, k)
    return max(1.0, float(clamped.abs().max()))


def _householder_bound(module, context: LayerContext) -> float:
    """Per channel pair, the identity on one side of a line and the reflection across that line on
    the other: a continuous piecewise isometry, hence 1-Lipschitz whatever ``theta``."""
    return 1.0


def _layer_centering_bound(module, context: LayerContext) -> float:
    """``x - mean(x over dim) + bias``: an orthogonal projection when the mean is over one sample."""
    dims = [module.dim] if isinstance(module.dim, int) else list(module.dim)
    rank = len(context.input_shape) + 1
    if any(int(dim) % rank == 0 for dim in dims):
        raise UnsupportedLayerError(
            context.path, module, f"dim={module.dim!r} averages over the batch (samples are not independent)"
        )
    return 1.0


def _scale_bias_bound(module, context: LayerContext) -> float:
    """``x * scalar + bias``: ``max |scalar|`` (an element-wise scaling, checked not to broadcast over
    the batch)."""
    scalar = torch.as_tensor(module.scalar).detach().to(torch.float64)
    if scalar.dim() > len(context.input_shape) or context.output_shape != context.input_shape:
        raise UnsupportedLayerError(
            context.path, module, f"its scalar of shape {tuple(scalar.shape)} is not an element-wise scale"
        )
    return float(scalar.abs().max())


def _torchlip_rules() -> list[LayerRule]:
    if "deel.torchlip" not in sys.modules:
        return []
    rules: list[LayerRule] = []
    padded = _loaded("deel.torchlip.modules.unconstrained", "PadConv1d", "PadConv2d")
    if padded is not None:
        rules += [_padded_conv_rule(padded[0], nn.Conv1d), _padded_conv_rule(padded[1], nn.Conv2d)]
    symmetric_pad = _loaded("deel.torchlip.functional", "SymmetricPad")
    if symmetric_pad is not None:  # concatenates flipped slices of its input: copies pixels
        rules.append(LayerRule(symmetric_pad[0], copying_pad_bound))
    activation = _loaded("deel.torchlip.modules.activation", "MaxMin", "GroupSort", "LPReLU", "HouseHolder")
    if activation is not None:
        max_min, group_sort, lprelu, householder = activation
        rules += [
            LayerRule(max_min, _coefficient_bound),
            LayerRule(group_sort, _coefficient_bound),
            LayerRule(lprelu, _lprelu_bound),
            LayerRule(householder, _householder_bound),
        ]
    pooling = _loaded(
        "deel.torchlip.modules.pooling",
        "ScaledAvgPool2d",
        "ScaledAdaptiveAvgPool2d",
        "ScaledL2NormPool2d",
        "ScaledAdaptativeL2NormPool2d",
    )
    if pooling is not None:
        average, adaptive_average, l2_norm, adaptive_l2_norm = pooling
        rules += [  # average pooling times a constant: linear with entries of one sign
            LayerRule(average, nonnegative_linear_bound),
            LayerRule(adaptive_average, nonnegative_linear_bound),
            LayerRule(l2_norm, l2_pool_bound),
            LayerRule(adaptive_l2_norm, l2_pool_bound),
        ]
    normalization = _loaded("deel.torchlip.modules.normalization", "LayerCentering", "ScaleBiasLayer")
    if normalization is not None:
        centering, scale_bias = normalization
        rules += [
            LayerRule(centering, _layer_centering_bound),
            LayerRule(scale_bias, _scale_bias_bound),
        ]
    return rules


def extension_rules() -> list[LayerRule]:
    """The rules for the timm and deel-torchlip layers whose modules are imported now."""
    return [*_timm_rules(), *_torchlip_rules()]


def extension_refusals() -> list[tuple[tuple[type, ...], str]]:
    """Library layers refused outright (with the reason), whose modules are imported now."""
    refusals = []
    rms_norms = _loaded("timm.layers.norm", "RmsNorm", "RmsNorm2d")  # timm's fused ones subclass these
    if rms_norms is not None:
        refusals.append((tuple(rms_norms), OWN_STATISTICS_REASON))
    batch_lip_norm = _loaded("deel.torchlip.modules.normalization", "BatchLipNorm")  # and BatchCentering
    if batch_lip_norm is not None:
        refusals.append(
            (
                tuple(batch_lip_norm),
                "it normalises with batch statistics in training mode and updates its running sums inside "
                "forward in eval mode; bound its vanilla_export() (a ScaleBiasLayer) instead",
            )
        )
    return refusals
