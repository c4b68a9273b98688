"""The certification settings a :class:`~painwatch.inference.predict.Predictor` answers with.

A bundle's ``model.json`` holds certification defaults and the bounds within which a user may override
them (:class:`painwatch.models.CertificationDefaults`); :func:`resolve_settings` applies overrides, checks
each against its bound and returns the :class:`PredictorSettings` in force. Units: ``sigma`` is the L2
noise std per pixel in [0, 1] pixel space at the model's input size (docs/design.md, "Units and
conventions").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from painwatch.models import BundleMetadata, CertificationDefaults
from painwatch.robust import (
    BASE_METHODS,
    METHODS,
    SEQUENTIAL_BOUNDS,
    UnsupportedLayerError,
    lipschitz_upper_bound,
    method_spec,
)
from painwatch.validation import is_integer, is_number


class SettingsError(ValueError):
    """A certification setting is unknown, malformed, or outside the bundle's allowed range."""


def sequential_variant(method: str) -> str | None:
    """The registered method that may stop sampling early and shares ``method``'s classifier."""
    return next((spec.name for spec in METHODS.values() if spec.sequential and spec.base == method), None)


@dataclass(frozen=True)
class PredictorSettings:
    """The certification settings in force (after overrides), as used for every frame.

    ``n`` is the number of estimation draws for fixed-``n`` methods and the most estimation draws (the
    budget) for sequential ones; ``n0`` selection draws come on top. ``score_temperature`` ``T`` divides
    the logits inside the soft scores ``softmax(f / T)`` (soft smoothing only). ``bound`` is ``"fixed"``
    (Clopper-Pearson over the budget, early stops only to abstain) or ``"anytime"`` (the confidence
    sequence, which may stop once the radius is decided); only sequential randomized smoothing can be
    ``"fixed"``.
    """

    method: str
    sigma: float
    alpha: float
    n: int
    n0: int
    batch_size: int
    sequential: bool
    min_radius: float = 0.0
    rel_tol: float = 0.05
    score_temperature: float = 1.0
    bound: str = "anytime"

    @property
    def method_name(self) -> str:
        """The registered method that runs: the sequential variant when sampling may stop as soon as the
        radius is decided (a fixed bound that stops only to abstain keeps the fixed-``n`` name: it is
        that certificate)."""
        if self.sequential and self.bound == "anytime":
            return sequential_variant(self.method) or self.method
        return self.method

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any, name: str) -> float:
    if not is_number(value):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _within(name: str, value: float, certification: CertificationDefaults, source: str) -> None:
    if name not in certification.bounds:
        return
    low, high = (float(v) for v in certification.bounds[name])
    if not low <= value <= high:
        raise SettingsError(
            f"{name}={value:g} is outside the range this bundle allows, [{low:g}, {high:g}] "
            f"({source}: certification.bounds.{name})"
        )


def resolve_settings(
    certification: CertificationDefaults,
    *,
    method: str | None = None,
    sigma: float | None = None,
    alpha: float | None = None,
    n: int | None = None,
    sequential: bool | None = None,
    score_temperature: float | None = None,
    source: str = "model.json",
) -> PredictorSettings:
    """The bundle's certification defaults with the given overrides, each checked against its bound.

    ``sequential`` defaults to True for the methods that have a sequential variant. Raises
    :class:`SettingsError` naming the setting, the value and the allowed range.
    """
    chosen_method = certification.method if method is None else method
    if chosen_method not in BASE_METHODS:
        raise SettingsError(f"method={chosen_method!r} is not a certification method; "
                            f"choose one of {', '.join(BASE_METHODS)}")
    chosen_sigma = _number(certification.sigma if sigma is None else sigma, "sigma")
    chosen_alpha = _number(certification.alpha if alpha is None else alpha, "alpha")
    chosen_n = certification.n if n is None else n
    if not is_integer(chosen_n):
        raise SettingsError(f"n must be a whole number of noise draws, got {chosen_n!r}")
    chosen_n = int(chosen_n)
    chosen_temperature = _number(
        certification.score_temperature if score_temperature is None else score_temperature,
        "score_temperature",
    )
    for name, value in (("sigma", chosen_sigma), ("alpha", chosen_alpha), ("n", chosen_n),
                        ("score_temperature", chosen_temperature)):
        _within(name, value, certification, source)
    if chosen_temperature <= 0:
        raise SettingsError(f"score_temperature must be > 0, got {chosen_temperature:g}")
    if method_spec(chosen_method).needs_noise and chosen_sigma <= 0:
        raise SettingsError(f"sigma must be > 0 for {chosen_method}, got {chosen_sigma:g}")
    if not 0 < chosen_alpha < 1:
        raise SettingsError(f"alpha must be strictly between 0 and 1, got {chosen_alpha:g}")
    if chosen_n < 2:
        raise SettingsError(f"n must be at least 2, got {chosen_n}")
    has_variant = sequential_variant(chosen_method) is not None
    if sequential is None:
        sequential = has_variant
    if sequential and not has_variant:
        applicable = [name for name in BASE_METHODS if sequential_variant(name) is not None]
        raise SettingsError(f"sequential certification applies to {' and '.join(applicable)}, "
                            f"not to {chosen_method}")
    bound = certification.bound
    if bound not in SEQUENTIAL_BOUNDS:
        raise SettingsError(f"bound={bound!r} is not a bound; choose one of {SEQUENTIAL_BOUNDS} ({source})")
    if not sequential or not method_spec(chosen_method).stops_early_to_abstain:
        bound = "anytime"  # the fixed bound is Cohen's over the budget, sampled with early abstention
    return PredictorSettings(
        method=chosen_method,
        sigma=chosen_sigma,
        alpha=chosen_alpha,
        n=chosen_n,
        n0=certification.n0,
        batch_size=certification.batch_size,
        sequential=bool(sequential),
        # Radii below 1% of sigma are not worth extra draws (well under one grey level).
        min_radius=0.01 * chosen_sigma,
        score_temperature=chosen_temperature,
        bound=bound,
    )


def sound_lipschitz_constant(
    model: torch.nn.Module, input_shape: tuple[int, int, int], *, method: str, architecture: str
) -> float:
    """A sound upper bound of the network's L2 Lipschitz constant on inputs of ``input_shape``, for
    ``method``; a :class:`SettingsError` naming the architecture when painwatch cannot bound it."""
    try:
        return float(lipschitz_upper_bound(model, input_shape))
    except (UnsupportedLayerError, TypeError, ValueError) as error:
        others = [name for name in BASE_METHODS if not method_spec(name).needs_lipschitz_constant]
        raise SettingsError(
            f"method={method!r} needs a sound Lipschitz bound of the network, which painwatch cannot "
            f"compute for architecture {architecture!r} ({error}); use {' or '.join(others)}"
        ) from error


def usable_methods(model: torch.nn.Module, metadata: BundleMetadata) -> list[str]:
    """The base methods this bundle's network can be certified with, in :data:`BASE_METHODS` order:
    every method whose needs are met (one that needs a Lipschitz constant only when a sound bound of
    this network can be computed)."""
    usable = []
    for method in BASE_METHODS:
        if method_spec(method).needs_lipschitz_constant:
            try:
                sound_lipschitz_constant(model, metadata.input_shape, method=method,
                                         architecture=metadata.architecture)
            except SettingsError:
                continue
        usable.append(method)
    return usable
