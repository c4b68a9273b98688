"""The certificate record, the registry of certification methods, and :func:`certify`.

A :class:`Certificate` is the answer of one certification of one image (docs/design.md, "The
certificates"). Which methods exist, what each needs and which classifier its radius is about is
recorded once, here, in :data:`METHODS` (docs/design.md, "The method registry"); the modules that
implement the methods (``margin``, ``smoothing``, ``sequential``) register them when they are
imported, and everything above :mod:`painwatch.robust` certifies through :func:`certify` and asks the
registry instead of writing method names out again.

Units: ``x`` is one image ``(C, H, W)`` with pixels in [0, 1]; every radius and every noise level
``sigma`` is an L2 norm in that pixel space, at the model's input resolution.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
import torch

from painwatch.robust.validation import Model, check_model, check_same_device

__all__ = [
    "ABSTAIN",
    "BASE_METHODS",
    "METHODS",
    "SEQUENTIAL_BOUNDS",
    "Certificate",
    "CertificationOutcome",
    "CertificationSampler",
    "CertificationSettings",
    "MethodSpec",
    "certification_sampler",
    "certify",
    "certify_logits",
    "certify_steps",
    "method_spec",
    "register_method",
]

ABSTAIN: int = -1
"""The prediction of a certificate that abstains (its radius is 0)."""

SEQUENTIAL_BOUNDS: tuple[str, ...] = ("anytime", "fixed")
"""The confidence bounds of the smoothing certificates that draw in batches: ``anytime``, the betting
confidence sequence [WSR23] (valid under any stopping rule); ``fixed``, Clopper-Pearson [CP34] over the
whole budget, sampling stopped early only to abstain (hard votes only). docs/design.md, "The
certificates", item 6."""


@dataclass(frozen=True)
class Certificate:
    """The answer of one certification of one image.

    Attributes:
        prediction: the certified class index, or ``ABSTAIN`` (-1) when nothing could be certified.
        radius: certified L2 radius in [0, 1] pixel units (0.0 when abstaining). For every perturbation
            ``delta`` with ``||delta||_2 < radius`` the certified classifier (``METHODS[method].certifies``)
            predicts ``prediction`` at ``x + delta``; for the statistical methods this holds with
            probability at least ``1 - alpha`` over the sampling noise.
        method: a name registered in :data:`METHODS`.
        sigma: the Gaussian noise std of the smoothing (0.0 for ``"lipschitz"``).
        n: the number of noise samples that estimated the bound (0 for ``"lipschitz"``).
        alpha: the failure probability of the bound (0.0 for the deterministic ``"lipschitz"``).
        bound: the statistic the radius came from: the logit margin (``"lipschitz"``), the lower
            confidence bound ``SM_low`` of the smoothed margin, the Clopper-Pearson bound ``pA_low``
            (``"randomized_smoothing"``), or the lower bound of the expected top-class score
            (soft and sequential smoothing). May be NaN when a method abstained before estimating it.
        forward_passes: how many images went through the model to produce this certificate
            (1 for ``"lipschitz"``, ``n0 + n`` for the two-stage statistical methods).
    """

    prediction: int
    radius: float
    method: str
    sigma: float
    n: int
    alpha: float
    bound: float
    forward_passes: int = 0

    def __post_init__(self) -> None:
        # Normalise numpy / torch scalars to Python numbers so records compare and serialise cleanly.
        for name in ("prediction", "n", "forward_passes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"Certificate.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("radius", "sigma", "alpha", "bound"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Certificate.{name} must be a real number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.method not in METHODS:
            raise ValueError(f"unknown certificate method {self.method!r}; expected one of {tuple(METHODS)}")
        if self.prediction < ABSTAIN:
            raise ValueError(
                f"prediction must be a class index >= 0 or ABSTAIN (-1), got {self.prediction!r}"
            )
        if not (self.radius >= 0.0):
            raise ValueError(f"radius must be >= 0, got {self.radius!r}")
        if self.prediction == ABSTAIN and self.radius != 0.0:
            raise ValueError(f"an abstaining certificate must have radius 0.0, got {self.radius!r}")
        if not (self.sigma >= 0.0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be finite and >= 0, got {self.sigma!r}")
        if not (0.0 <= self.alpha < 1.0):
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha!r}")
        if self.n < 0 or self.forward_passes < 0:
            raise ValueError(
                f"n and forward_passes must be >= 0, got n={self.n}, forward_passes={self.forward_passes}"
            )

    @property
    def abstained(self) -> bool:
        """True when no class could be certified (``prediction == ABSTAIN``)."""
        return self.prediction == ABSTAIN

    def radius_rms(self, input_shape: tuple[int, int, int]) -> float:
        """The radius as a per-pixel RMS change: ``radius / sqrt(C * H * W)`` (pixel values in [0, 1])."""
        return self.radius / math.sqrt(_numel(input_shape))

    def radius_grey_levels(self, input_shape: tuple[int, int, int]) -> float:
        """The radius as an RMS change in 8-bit grey levels: ``255 * radius / sqrt(C * H * W)``."""
        return 255.0 * self.radius_rms(input_shape)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (NaN bounds become ``None``; ``abstained`` is included)."""
        record = asdict(self)
        for key in ("radius", "bound", "sigma", "alpha"):
            value = float(record[key])
            record[key] = None if math.isnan(value) else value
        record["abstained"] = self.abstained
        return record


def _numel(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    return int(np.prod([int(d) for d in input_shape]))


LogitsCallback = Callable[[torch.Tensor], None]
"""Receives each batch of noisy logits (float64 ``(b, K)``) a noise method draws, in drawing order."""


@dataclass(frozen=True, kw_only=True)
class CertificationSettings:
    """Every setting :func:`certify` passes to a method's runner (a method ignores those it does not use).

    Attributes:
        sigma: Gaussian noise std, L2 in [0, 1] pixel units (> 0 for the noise methods).
        alpha: failure probability of a statistical certificate, in (0, 1).
        n0: selection draws that pick the class (noise methods).
        n: estimation draws; for the sequential methods the budget (the most estimation draws).
        batch_size: the most images per forward pass (memory only; results do not depend on it
            beyond the order in which noise is drawn, which is fixed).
        generator: the source of every noise draw (None: fresh randomness).
        lipschitz_constant: a sound upper bound of the network's L2 Lipschitz constant.
        score_temperature: soft scores are ``softmax(f / score_temperature)`` (soft smoothing only).
        stop_early: ``randomized_smoothing`` only: stop sampling as soon as abstaining is decided
            (the certificate is still Cohen's over all ``n`` draws whenever it does not abstain).
        rel_tol: sequential methods: stop once the radius is within this fraction of the best the
            remaining budget could plausibly give.
        min_radius: noise methods that stop early: radii below this (L2) are not worth sampling for.
        logits_callback: called with each batch of noisy logits (float64 ``(b, K)``), selection draws
            included, e.g. to estimate calibrated probabilities without extra forward passes; for
            ``"lipschitz"``, with its one batch of clean logits.
    """

    sigma: float = 0.0
    alpha: float = 0.001
    n0: int = 100
    n: int = 1000
    batch_size: int = 1000
    generator: torch.Generator | None = None
    lipschitz_constant: float | None = None
    score_temperature: float = 1.0
    stop_early: bool = True
    rel_tol: float = 0.05
    min_radius: float = 0.0
    logits_callback: LogitsCallback | None = None


@dataclass(frozen=True)
class CertificationOutcome:
    """What :func:`certify` returns: the certificate and, for runs that may stop sampling early, why
    they stopped (``"target"``, ``"saturated"``, ``"futile"`` or ``"budget"``; None for fixed-n runs and
    for the steps of :func:`certify_steps` before the last).

    ``done`` is False for those earlier steps; ``budget`` is the most estimation draws of a run that draws
    in steps (None otherwise); ``vote_lower_bound`` is, where the method gives one, a level ``1 - alpha``
    lower bound on ``P_xi[argmax f(x + xi) = prediction]`` (see
    :class:`painwatch.robust.sequential.SequentialCertificate`), NaN where it gives none.
    """

    certificate: Certificate
    stop_reason: str | None = None
    _: KW_ONLY
    done: bool = True
    budget: int | None = None
    vote_lower_bound: float = math.nan

    @property
    def forward_passes(self) -> int:
        """Images that went through the model for this certificate (selection and estimation)."""
        return self.certificate.forward_passes


Runner = Callable[[Model, torch.Tensor, CertificationSettings], CertificationOutcome]
"""How a method runs: ``runner(model, x, settings) -> CertificationOutcome`` for one image ``x``."""

LogitsRunner = Callable[[torch.Tensor, CertificationSettings], CertificationOutcome]
"""How a deterministic method certifies from the clean logits ``(K,)`` of one image already computed:
``from_logits(logits, settings) -> CertificationOutcome``."""


class CertificationSampler(Protocol):
    """A certification of one image that draws in steps while the caller runs the model
    (:class:`painwatch.robust.sequential.SequentialSampler` is one).

    ``noisy_chunks()`` gives the next step's noisy copies of the image (chunks ``(b, C, H, W)``, drawn
    in a fixed order); ``observe(logits)`` takes their logits, concatenated in that order, and returns
    the outcome so far; ``done`` says that sampling stopped; ``next_draws`` how many copies the next step
    takes. Driven with the same model and generator, the last outcome equals :func:`certify`'s.
    """

    @property
    def done(self) -> bool: ...

    @property
    def next_draws(self) -> int: ...

    def noisy_chunks(self) -> Iterator[torch.Tensor]: ...

    def observe(self, logits: torch.Tensor) -> CertificationOutcome: ...


SamplerFactory = Callable[[torch.Tensor, CertificationSettings], "CertificationSampler | None"]
"""How a method draws in steps: ``sampler(x, settings)``, or None when with these settings it does not."""


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A certification method as the registry knows it.

    Attributes:
        name: the name stored in ``Certificate.method``.
        certifies: the classifier the radius is about, in words a report can print.
        needs_lipschitz_constant: the radius formula uses a sound L2 Lipschitz bound of the network.
        needs_noise: the method smooths with Gaussian noise (``sigma > 0``).
        deterministic: no sampling (``alpha`` is unused, the certificate holds with certainty).
        sequential: the method may stop sampling as soon as the answer is decided (an anytime-valid
            bound), so ``n`` is a budget.
        base: the fixed-n method whose classifier and radius formula this one shares (``name`` itself
            for a base method, the names a model bundle may configure).
        runner: see :data:`Runner`.
        stops_early_to_abstain: with ``stop_early=True`` the runner stops sampling as soon as abstaining
            is decided, and otherwise certifies from the whole budget with the fixed-n bound (the
            ``"fixed"`` bound of :data:`SEQUENTIAL_BOUNDS`).
        uses_score_temperature: the certified scores are ``softmax(f / score_temperature)``.
        sampler: how the method draws in steps (see :data:`SamplerFactory`; None: it certifies in one go).
        from_logits: for a deterministic method whose certificate is a function of the image's clean
            logits alone, that function (see :data:`LogitsRunner`; :func:`certify_logits`), else None.
    """

    name: str
    certifies: str
    needs_lipschitz_constant: bool
    needs_noise: bool
    deterministic: bool
    sequential: bool
    base: str
    runner: Runner
    stops_early_to_abstain: bool = False
    uses_score_temperature: bool = False
    sampler: SamplerFactory | None = None
    from_logits: LogitsRunner | None = None

    def __post_init__(self) -> None:
        for field_name in ("name", "certifies", "base"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"MethodSpec.{field_name} must be a non-empty string, got {value!r}")
        if not callable(self.runner):
            raise TypeError(f"MethodSpec.runner of {self.name!r} must be callable, got {self.runner!r}")
        if self.sampler is not None and not callable(self.sampler):
            raise TypeError(f"MethodSpec.sampler of {self.name!r} must be callable or None, "
                            f"got {self.sampler!r}")
        if self.sequential and self.base == self.name:
            raise ValueError(f"sequential method {self.name!r} must name the fixed-n method it shares "
                             "its classifier with as its base")
        if self.deterministic and self.needs_noise:
            raise ValueError(f"method {self.name!r} cannot be deterministic and need noise")
        if self.from_logits is not None and not (self.deterministic and callable(self.from_logits)):
            raise ValueError(f"MethodSpec.from_logits of {self.name!r} must be callable, and only a "
                             f"deterministic method certifies from clean logits, got {self.from_logits!r}")

    @property
    def is_base(self) -> bool:
        """True for the methods a model bundle may configure (``base == name``)."""
        return self.base == self.name


_REGISTRY: dict[str, MethodSpec] = {}

METHODS: Mapping[str, MethodSpec] = MappingProxyType(_REGISTRY)
"""Every certification method, name -> :class:`MethodSpec`, in registration order (read-only)."""


class _BaseMethodNames(Sequence[str]):
    """The names of the base methods in :data:`METHODS`, in registration order, read when used (the
    registry fills while :mod:`painwatch.robust` is imported)."""

    def _names(self) -> tuple[str, ...]:
        return tuple(name for name, spec in _REGISTRY.items() if spec.is_base)

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(other) == self._names()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._names())


BASE_METHODS: Sequence[str] = _BaseMethodNames()
"""The names a model bundle may configure (the base methods), in a stable order."""


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` and return it; a name can be registered once."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method needs a MethodSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY:
        raise ValueError(f"certification method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; a ValueError listing the known names for anything else."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown certification method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return spec


def _settings(
    method: str,
    *,
    sigma: float = 0.0,
    alpha: float = 0.001,
    n0: int = 100,
    n: int = 1000,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    lipschitz_constant: float | None = None,
    score_temperature: float = 1.0,
    stop_early: bool = True,
    rel_tol: float = 0.05,
    min_radius: float = 0.0,
    logits_callback: LogitsCallback | None = None,
) -> tuple[MethodSpec, CertificationSettings]:
    spec = method_spec(method)
    if spec.needs_lipschitz_constant and lipschitz_constant is None:
        raise ValueError(f"method {method!r} needs lipschitz_constant (a sound upper bound of the network's "
                         "L2 Lipschitz constant, e.g. from lipschitz_upper_bound); none was given")
    if spec.needs_noise and not (isinstance(sigma, numbers.Real) and sigma > 0):
        raise ValueError(f"method {method!r} smooths with Gaussian noise and needs sigma > 0 (L2 noise "
                         f"std in [0, 1] pixel units), got sigma={sigma!r}")
    if logits_callback is not None and not callable(logits_callback):
        raise TypeError(f"logits_callback must be callable or None, got {type(logits_callback).__name__}")
    settings = CertificationSettings(
        sigma=sigma, alpha=alpha, n0=n0, n=n, batch_size=batch_size, generator=generator,
        lipschitz_constant=lipschitz_constant, score_temperature=score_temperature, stop_early=stop_early,
        rel_tol=rel_tol, min_radius=min_radius, logits_callback=logits_callback,
    )
    return spec, settings


def certify(
    method: str,
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float = 0.0,
    alpha: float = 0.001,
    n0: int = 100,
    n: int = 1000,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    lipschitz_constant: float | None = None,
    score_temperature: float = 1.0,
    stop_early: bool = True,
    rel_tol: float = 0.05,
    min_radius: float = 0.0,
    logits_callback: LogitsCallback | None = None,
) -> CertificationOutcome:
    """Certify one image ``x`` (``(C, H, W)``, pixels in [0, 1]) of ``model`` with a registered method.

    The settings are those of :class:`CertificationSettings`; a method ignores those it does not use.
    Checks first that the method's needs are met (a Lipschitz constant for ``lipschitz`` and
    ``smoothed_margin``, ``sigma > 0`` for the noise methods) and raises a ValueError naming the method
    and the missing setting otherwise; every other setting is checked by the method itself. The
    guarantee is the method's (docs/design.md, "The certificates"): what ``METHODS[method].certifies``
    says is certified at the returned radius, with probability at least ``1 - alpha`` over the noise
    for the statistical methods. Same generator seed, same certificate.
    """
    spec, checked = _settings(
        method, sigma=sigma, alpha=alpha, n0=n0, n=n, batch_size=batch_size, generator=generator,
        lipschitz_constant=lipschitz_constant, score_temperature=score_temperature, stop_early=stop_early,
        rel_tol=rel_tol, min_radius=min_radius, logits_callback=logits_callback,
    )
    outcome = spec.runner(model, x, checked)
    if not isinstance(outcome, CertificationOutcome) or outcome.certificate.method != method:
        raise TypeError(f"the runner of {method!r} must return a CertificationOutcome whose certificate "
                        f"has method {method!r}, got {outcome!r}")
    return outcome


def certification_sampler(
    method: str,
    x: torch.Tensor,
    *,
    sigma: float = 0.0,
    alpha: float = 0.001,
    n0: int = 100,
    n: int = 1000,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    lipschitz_constant: float | None = None,
    score_temperature: float = 1.0,
    stop_early: bool = True,
    rel_tol: float = 0.05,
    min_radius: float = 0.0,
    logits_callback: LogitsCallback | None = None,
) -> CertificationSampler | None:
    """A :class:`CertificationSampler` of ``x`` for a method that draws in steps with these settings (the
    settings of :func:`certify`), or None when it certifies in one go (then use :func:`certify`).

    Driven to the end with the same model and generator, it gives :func:`certify`'s outcome exactly; a
    caller may run the noisy copies of several images through one forward pass.
    """
    spec, checked = _settings(
        method, sigma=sigma, alpha=alpha, n0=n0, n=n, batch_size=batch_size, generator=generator,
        lipschitz_constant=lipschitz_constant, score_temperature=score_temperature, stop_early=stop_early,
        rel_tol=rel_tol, min_radius=min_radius, logits_callback=logits_callback,
    )
    return None if spec.sampler is None else spec.sampler(x, checked)


def certify_steps(
    method: str,
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float = 0.0,
    alpha: float = 0.001,
    n0: int = 100,
    n: int = 1000,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    lipschitz_constant: float | None = None,
    score_temperature: float = 1.0,
    stop_early: bool = True,
    rel_tol: float = 0.05,
    min_radius: float = 0.0,
    logits_callback: LogitsCallback | None = None,
) -> Iterator[CertificationOutcome]:
    """:func:`certify`, step by step: the outcome after every step of a method that draws in steps (the
    last has ``done=True`` and equals :func:`certify`'s), or the one outcome of any other method.

    With an anytime-valid bound every step's certificate holds on its own; with a fixed-budget bound the
    steps before the last abstain and only show progress. Arguments are checked before the first draw.
    """
    options = dict(
        sigma=sigma, alpha=alpha, n0=n0, n=n, batch_size=batch_size, generator=generator,
        lipschitz_constant=lipschitz_constant, score_temperature=score_temperature, stop_early=stop_early,
        rel_tol=rel_tol, min_radius=min_radius, logits_callback=logits_callback,
    )
    sampler = certification_sampler(method, x, **options)
    if sampler is None:
        return iter([certify(method, model, x, **options)])
    check_model(model)
    check_same_device(model, x)
    return _drive(model, sampler)


def _drive(model: Model, sampler: CertificationSampler) -> Iterator[CertificationOutcome]:
    # Certificates are about the deterministic network: eval mode for the run, each flag restored after
    # (the registry knows no sampler module, so this does not reuse painwatch.robust.noise).
    flags = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    for module, _ in flags:
        module.training = False
    try:
        with torch.no_grad():
            while not sampler.done:
                logits = torch.cat([model(chunk) for chunk in sampler.noisy_chunks()], dim=0)
                yield sampler.observe(logits)
    finally:
        for module, training in flags:
            module.training = training
def certify_logits(
    method: str, logits: torch.Tensor, *, lipschitz_constant: float | None = None
) -> CertificationOutcome:
    """Certify one image from its clean logits ``(K,)`` (or ``(1, K)``) already computed, with a
    deterministic method that certifies from them alone (``METHODS[method].from_logits``: ``lipschitz``).

    The guarantee is :func:`certify`'s for the same method, provided ``logits`` are the network's output
    at the image in eval mode (the pass :func:`certify` would make); no forward pass is made here, so the
    certificate's ``forward_passes`` counts that earlier pass (1). Raises a ValueError naming the method
    when it cannot certify from logits or its needs are not met.
    """
    spec = method_spec(method)
    if spec.from_logits is None:
        able = ", ".join(name for name, other in _REGISTRY.items() if other.from_logits is not None)
        raise ValueError(f"method {method!r} cannot certify from clean logits alone; these can: {able}")
    if spec.needs_lipschitz_constant and lipschitz_constant is None:
        raise ValueError(f"method {method!r} needs lipschitz_constant (a sound upper bound of the network's "
                         "L2 Lipschitz constant, e.g. from lipschitz_upper_bound); none was given")
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (1, 2) or (
            logits.dim() == 2 and logits.shape[0] != 1) or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be the (K,) or (1, K) logits of one image with K >= 2, got {shape}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits must be finite")
    outcome = spec.from_logits(logits.detach().reshape(1, -1), CertificationSettings(
        lipschitz_constant=lipschitz_constant))
    if not isinstance(outcome, CertificationOutcome) or outcome.certificate.method != method:
        raise TypeError(f"from_logits of {method!r} must return a CertificationOutcome whose certificate "
                        f"has method {method!r}, got {outcome!r}")
    return outcome
