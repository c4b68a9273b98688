"""Sound L2 Lipschitz upper bounds of networks, and a lower estimate to check them against.

Everything here is about the L2 norm on a single sample: for a network ``f`` taking a batch
``(B, *input_shape)``, ``L`` bounds ``||f(x) - f(y)||_2 <= L ||x - y||_2`` for every pair of samples,
in the units of the input (pixels in [0, 1] for painwatch models). The Lipschitz margin certificate
[Tsuzuku18] and the smoothed margin [RC, Ch. 3] need ``L`` to be an *upper* bound (docs/design.md,
"The certificates", item 1).

- :func:`lipschitz_upper_bound` - a *sound* upper bound, composed layer by layer along ``nn.Sequential``:
  exact spectral norm for dense layers, the FFT bound [Sedghi19] for convolutions (both in
  :mod:`painwatch.robust.spectral`), exact constants for activations, pooling and normalisation
  layers (the rules of :mod:`painwatch.robust.lipschitz_rules`, and of
  :mod:`painwatch.robust.lipschitz_extensions` for timm and deel-torchlip layers), and the declared
  bounds of the orthogonal layers of :mod:`painwatch.robust.layers`. A layer is bounded by a rule only
  when it computes what the rule's class computes: a subclass overriding ``forward``, and a layer with
  forward hooks, are refused unless they declare their own bound. Layers it cannot bound raise
  :class:`UnsupportedLayerError` naming the layer and the reason. Use it for certificates.
- :func:`lipschitz_lower_estimate` - power iteration on the Jacobian at random points: a *lower*
  estimate of the Lipschitz constant, for tests and reports. Never use it for a certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.nn.modules import module as module_machinery
from torch.nn.utils import parametrize

from painwatch.robust.lipschitz_extensions import extension_refusals, extension_rules
from painwatch.robust.lipschitz_rules import (
    TORCH_REFUSALS,
    TORCH_RULES,
    LayerContext,
    LayerRule,
    UnsupportedLayerError,
    preserved_buffers,
)
from painwatch.robust.spectral import FLOAT_SAFETY
from painwatch.robust.validation import check_input_shape

__all__ = [
    "UnsupportedLayerError",
    "lipschitz_lower_estimate",
    "lipschitz_upper_bound",
]

_ROOT = "<root>"

_SEQUENTIAL_METHODS = ("forward", "__iter__")
"""nn.Sequential is composed child by child; a subclass must keep its forward and its iteration order."""

_CALL_MACHINERY = ("__call__", "_wrapped_call_impl", "_call_impl")
"""nn.Module's calling code (it runs the hooks, then forward); overriding it changes the computation."""


# ---------------------------------------------------------------------------------------------------
# Upper bound
# ---------------------------------------------------------------------------------------------------


def lipschitz_upper_bound(module: nn.Module, input_shape: Sequence[int]) -> float:
    """Return a sound upper bound of the L2 Lipschitz constant of ``module`` on inputs of ``input_shape``.

    Parameters
    ----------
    module:
        The network. Supported: ``nn.Sequential`` (recursively; the bound is the product of its
        layers' bounds), ``nn.Linear`` (exact largest singular value), ``nn.Conv1d/2d/3d`` with any
        stride, padding (zeros, circular, reflect, replicate), dilation and groups (FFT bound, see
        :func:`painwatch.robust.spectral.conv_operator_norm_bound`) and their transposes, batch norm
        in eval mode, a normalisation layer with ``mean``/``std`` attributes computing ``(x - mean) / std``,
        max/average/L2 pooling (plain and adaptive), padding layers, pixel (un)shuffle,
        Flatten/Unflatten/Identity/Dropout, the usual activations (ReLU, LeakyReLU, ELU, Tanh, Sigmoid,
        GELU, SiLU, ...), the layers of :mod:`painwatch.robust.layers`, timm's batch norm with a fused
        activation and deel-torchlip's layers (see :mod:`painwatch.robust.lipschitz_extensions`).
        Weights under ``torch.nn.utils.parametrize`` are bounded as computed. Any module may declare its
        own bound by defining a method ``lipschitz_upper_bound(input_shape) -> float``; that method is
        trusted for everything the module computes, its own hooks included. A module whose forward is
        the composition of some of its sub-modules may say so instead with a method
        ``lipschitz_composition() -> [(name, module), ...]`` (in the order they are applied); the bound
        is then the product of theirs, each checked as above (its own hooks are refused). Anything else
        raises :class:`UnsupportedLayerError` naming the layer.
    input_shape:
        Shape of one sample, without the batch dimension, e.g. ``(C, H, W)``. Convolution and pooling
        bounds depend on it (the FFT grid), so pass the true input resolution.

    Returns
    -------
    float
        ``L`` such that ``||module(x) - module(y)||_2 <= L * ||x - y||_2`` for all samples ``x, y`` of
        that shape, in exact arithmetic, with the weights the module holds now (for a parametrized
        weight, the one its next forward pass computes). Power iteration is never used: every layer
        bound is exact or provably an upper bound (computed in float64 with a relative margin
        :data:`FLOAT_SAFETY`). Bounding leaves every buffer of the module as it was.

    Raises
    ------
    UnsupportedLayerError
        For a layer without a sound bound (its path and type are in the message, with the reason): a
        layer type without a rule; a subclass of a supported layer that overrides ``forward`` (or
        another method its computation runs), or replaces it on the instance; a layer with a forward
        hook or forward pre-hook, and any global forward hook
        (``torch.nn.modules.module.register_module_forward_hook``), since a hook may change what a
        layer computes; a parametrized weight that differs between two evaluations; batch norm in
        training mode; containers whose ``forward`` is not a plain composition.
    ValueError
        For a bad ``input_shape`` or when a layer rejects the activation shape it receives.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    shape = check_input_shape(input_shape)
    global_hooks = _hook_description(
        getattr(module_machinery, "_global_forward_pre_hooks", {}),
        getattr(module_machinery, "_global_forward_hooks", {}),
    )
    if global_hooks:
        raise UnsupportedLayerError(
            _ROOT,
            module,
            f"a global {global_hooks} is registered; it runs on every layer and can change what each "
            "computes, so no layer's bound holds; remove it first",
        )
    walk = _BoundWalk(
        rules={rule.layer_class: rule for rule in (*TORCH_RULES, *extension_rules())},
        refusals=[*TORCH_REFUSALS, *extension_refusals()],
    )
    bound, _ = walk.bound(module, shape, _ROOT)
    return float(bound)


def _child_path(path: str, name: str) -> str:
    return name if path == _ROOT else f"{path}.{name}"


def _probe_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float32, torch.device("cpu")


def _output_shape(module: nn.Module, shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """Shape of one output sample, by a forward pass on zeros (buffers restored afterwards)."""
    dtype, device = _probe_dtype_device(module)
    try:
        with preserved_buffers(module), torch.no_grad():
            out = module(torch.zeros((1, *shape), dtype=dtype, device=device))
    except Exception as error:  # the layer's own message says what is wrong
        raise ValueError(
            f"layer '{path}' ({type(module).__name__}) rejects an input of shape {shape}: {error}"
        ) from error
    if not isinstance(out, torch.Tensor):
        raise UnsupportedLayerError(path, module, f"its forward returns {type(out).__name__}, not a tensor")
    return tuple(out.shape[1:])


def _hook_description(pre_hooks: dict, hooks: dict) -> str:
    """'forward pre-hook (f)' / 'forward hook (g, h)' for non-empty hook dictionaries, else ''."""

    def names(registered: dict) -> str:
        return ", ".join(getattr(hook, "__qualname__", type(hook).__name__) for hook in registered.values())

    parts = []
    if pre_hooks:
        parts.append(f"forward pre-hook ({names(pre_hooks)})")
    if hooks:
        parts.append(f"forward hook ({names(hooks)})")
    return " and a ".join(parts)


def _override_reason(module: nn.Module, layer_class: type, methods: tuple[str, ...]) -> str | None:
    """Why ``module`` may not compute what ``layer_class`` computes (it resolves one of ``methods`` or
    of nn.Module's calling code to another function), or None when it does."""
    parent = f"{layer_class.__module__}.{layer_class.__qualname__}"
    for name in (*methods, *_CALL_MACHINERY):
        if name in vars(module):
            return f"replaces {name} on the instance, so the bound of {parent} does not apply"
        if getattr(type(module), name, None) is not getattr(layer_class, name, None):
            owner = next((c for c in type(module).__mro__ if name in vars(c)), type(module))
            return (
                f"overrides {name} (in {owner.__qualname__}), so the bound of its parent {parent} does not "
                "apply; define lipschitz_upper_bound(input_shape) on it"
            )
    return None


class _BoundWalk:
    """One traversal of a module tree with the rules and refusals in force for it."""

    def __init__(self, rules: dict[type, LayerRule], refusals: list[tuple[tuple[type, ...], str]]) -> None:
        self.rules = rules
        self.refusals = refusals

    def bound(self, module: nn.Module, shape: tuple[int, ...], path: str) -> tuple[float, tuple[int, ...]]:
        """(bound, output shape) of ``module`` on samples of ``shape``."""
        own = getattr(type(module), "lipschitz_upper_bound", None)
        if callable(own):
            value = float(module.lipschitz_upper_bound(shape))
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"layer '{path}' ({type(module).__name__}) declared an invalid bound {value!r}"
                )
            return value, _output_shape(module, shape, path)
        hooks = _hook_description(module._forward_pre_hooks, module._forward_hooks)
        if hooks:
            raise UnsupportedLayerError(
                path,
                module,
                f"has a {hooks}, which can change what it computes; bound it without the hook (a weight "
                "normalisation hook has a torch.nn.utils.parametrizations version, bounded as computed)",
            )
        composition = getattr(type(module), "lipschitz_composition", None)
        if callable(composition):
            return self._composition_bound(module, shape, path)
        for layer_types, reason in self.refusals:
            if isinstance(module, layer_types):
                raise UnsupportedLayerError(path, module, reason)
        rule = next((self.rules[c] for c in type(module).__mro__ if c in self.rules), None)
        if rule is not None:
            reason = _override_reason(module, rule.layer_class, rule.methods)
            if reason is not None:
                raise UnsupportedLayerError(path, module, reason)
            return self._rule_bound(module, rule, shape, path)
        if isinstance(module, nn.Sequential):
            reason = _override_reason(module, nn.Sequential, _SEQUENTIAL_METHODS)
            if reason is not None:
                raise UnsupportedLayerError(path, module, reason)
            total = 1.0
            for name, child in module.named_children():
                value, shape = self.bound(child, shape, _child_path(path, name))
                total *= value
            return total, shape
        if _is_standardizer(module):
            out_shape = _output_shape(module, shape, path)
            return _standardizer_bound(module, shape, path), out_shape
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or len(list(module.children())) > 0:
            raise UnsupportedLayerError(
                path,
                module,
                "its forward is not known to be a plain composition of its children (only nn.Sequential is "
                "composed automatically); define lipschitz_upper_bound(input_shape) on it or restructure it "
                "as nn.Sequential",
            )
        raise UnsupportedLayerError(path, module, "no sound Lipschitz bound is known for this layer type")

    def _composition_bound(
        self, module: nn.Module, shape: tuple[int, ...], path: str
    ) -> tuple[float, tuple[int, ...]]:
        """A module that declares its forward to be the composition of sub-modules, in order: the
        product of their (fully checked) bounds."""
        steps = list(module.lipschitz_composition())
        if not steps or not all(
            isinstance(step, tuple) and len(step) == 2 and isinstance(step[0], str)
            and isinstance(step[1], nn.Module) for step in steps
        ):
            raise UnsupportedLayerError(
                path, module, "its lipschitz_composition() must return (name, module) pairs, at least one"
            )
        total = 1.0
        for name, child in steps:
            value, shape = self.bound(child, shape, _child_path(path, name))
            total *= value
        return total, shape

    def _rule_bound(
        self, module: nn.Module, rule: LayerRule, shape: tuple[int, ...], path: str
    ) -> tuple[float, tuple[int, ...]]:
        _check_parametrizations_are_stable(module, path)
        out_shape = _output_shape(module, shape, path)

        def bound_child(child: nn.Module, name: str, child_shape: tuple[int, ...]):
            return self.bound(child, child_shape, _child_path(path, name))

        context = LayerContext(
            path=path, input_shape=shape, output_shape=out_shape, bound_child=bound_child
        )
        with preserved_buffers(module):
            value = float(rule.bound(module, context))
        if not math.isfinite(value) or value < 0:
            raise UnsupportedLayerError(path, module, f"its computed bound {value!r} is not a finite L >= 0")
        return value, out_shape


def _check_parametrizations_are_stable(module: nn.Module, path: str) -> None:
    """A bound is computed from a parametrized tensor as the next forward pass computes it (buffers
    restored in between, as a power iteration in training mode updates them); a tensor that still
    differs between two evaluations (a random parametrization) has no single bound."""
    if not parametrize.is_parametrized(module):
        return
    for name in module.parametrizations:
        values = []
        for _ in range(2):
            with preserved_buffers(module), torch.no_grad():
                values.append(getattr(module, name).detach().clone())
        if not torch.equal(values[0], values[1]):
            raise UnsupportedLayerError(
                path, module, f"its parametrized {name!r} differs between two evaluations"
            )


def _is_standardizer(module: nn.Module) -> bool:
    return (
        hasattr(module, "mean")
        and hasattr(module, "std")
        and len(list(module.children())) == 0
        and not isinstance(module.mean, Callable)
        and not isinstance(module.std, Callable)
    )


def _standardizer_bound(module: nn.Module, shape: tuple[int, ...], path: str) -> float:
    """1 / min |std|, after checking numerically that the layer really computes (x - mean) / std."""
    dtype, device = _probe_dtype_device(module)
    try:
        mean = torch.as_tensor(module.mean, dtype=torch.float64).detach().cpu()
        std = torch.as_tensor(module.std, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError) as error:
        raise UnsupportedLayerError(path, module, f"its mean/std are not numeric ({error})") from error
    if torch.any(std == 0) or not torch.all(torch.isfinite(std)):
        raise UnsupportedLayerError(path, module, f"its std has zero or non-finite entries: {std.tolist()}")

    def per_channel(values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 1 and values.numel() == shape[0] and len(shape) > 1:
            return values.reshape(shape[0], *([1] * (len(shape) - 1)))
        return values

    probe = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (probe - per_channel(mean)) / per_channel(std)
    with torch.no_grad():
        actual = module(probe.to(dtype=dtype, device=device)).to(torch.float64).cpu()
    tolerance = 1e-4 * (1.0 + float(expected.abs().max()))
    if actual.shape != expected.shape or not torch.allclose(actual, expected, atol=tolerance, rtol=1e-4):
        raise UnsupportedLayerError(
            path, module, "it has mean/std attributes but does not compute (x - mean) / std"
        )
    return float(1.0 / std.abs().min()) * (1.0 + FLOAT_SAFETY)


# ---------------------------------------------------------------------------------------------------
# Lower estimate (tests and reports only)
# ---------------------------------------------------------------------------------------------------


def _jacobian_vector_product(
    module: nn.Module, points: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """J(points) @ direction by forward-mode automatic differentiation."""
    with fwAD.dual_level():
        outputs = module(fwAD.make_dual(points, direction))
        tangent = fwAD.unpack_dual(outputs).tangent
    return tangent if tangent is not None else torch.zeros_like(outputs)


def lipschitz_lower_estimate(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    num_points: int = 8,
    iterations: int = 50,
    generator: torch.Generator | None = None,
    inputs: torch.Tensor | None = None,
) -> float:
    """A LOWER estimate of the L2 Lipschitz constant: the largest Jacobian norm found by power iteration.

    At each of ``num_points`` inputs (uniform in [0, 1], or the rows of ``inputs``), runs ``iterations``
    steps of power iteration on ``J(x)^T J(x)`` with Jacobian-vector and vector-Jacobian products, and
    returns the largest ``||J(x) v||`` over unit vectors ``v`` it reached. Every such value is at most the
    true Lipschitz constant (up to float rounding), so this is a lower bound: useful to check that
    :func:`lipschitz_upper_bound` is sound and tight, never a certificate. The module must treat samples
    independently (eval mode for batch norm). Random draws come from ``generator``.
    """
    shape = check_input_shape(input_shape)
    if num_points < 1 or iterations < 1:
        raise ValueError(f"num_points and iterations must be >= 1, got {num_points} and {iterations}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    dtype, device = _probe_dtype_device(module)
    if inputs is None:
        points = torch.rand((num_points, *shape), generator=generator, dtype=dtype).to(device)
    else:
        points = inputs.detach().to(dtype=dtype, device=device)
        if tuple(points.shape[1:]) != shape:
            raise ValueError(f"inputs must have shape (B, *{shape}), got {tuple(points.shape)}")
    direction = torch.randn(points.shape, generator=generator, dtype=dtype).to(device)

    def normalized(vectors: torch.Tensor) -> torch.Tensor:
        norms = vectors.flatten(1).norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
        return vectors / norms.view(-1, *([1] * (vectors.dim() - 1)))

    direction = normalized(direction)
    # Derivatives are taken w.r.t. the input only; freezing the parameters meanwhile also lets layers
    # with derived weights (Björck) reuse them instead of rebuilding them at every product.
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with torch.enable_grad():
            tracked = points.clone().requires_grad_(True)
            outputs = module(tracked)  # one graph, reused for every vector-Jacobian product
            for _ in range(iterations):
                image = _jacobian_vector_product(module, points, direction)
                (direction,) = torch.autograd.grad(
                    outputs, tracked, image, retain_graph=True, allow_unused=True
                )
                if direction is None:  # the output does not depend on the input
                    return 0.0
                direction = normalized(direction)
            image = _jacobian_vector_product(module, points, direction)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return float(image.detach().flatten(1).norm(dim=1).max())


