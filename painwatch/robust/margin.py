"""Margin certificates: the Lipschitz margin [Tsuzuku18], the smoothed margin and smoothed robustness [RC].

Units: ``x`` is one image ``(C, H, W)`` with pixels in ``[0, 1]``; every radius and every noise level
``sigma`` is an L2 norm in that pixel space, at the model's input resolution. Margins are computed in
float64. ``L`` (``lipschitz_constant``) must be a *sound upper bound* of the L2 Lipschitz constant of the
logit map ``f`` (see :func:`painwatch.robust.lipschitz_upper_bound`); with an estimate that is too small
the radii below are not guaranteed.

Methods (docs/design.md, "The certificates"), registered in :data:`painwatch.robust.METHODS`:

- ``"lipschitz"`` [Tsuzuku18] (item 1): ``r = M_f(x) / (sqrt(2) L)``, deterministic, one forward pass;
  certifies the bare network.
- ``"smoothed_margin"`` [RC, Ch. 3] (item 2): ``SM(x) = E[M_c(x + xi)]``, ``xi ~ N(0, sigma^2 I)``, lower
  confidence bound by Gaussian concentration, ``r = SM_low / (sqrt(2) L)``; certifies the expected-logit
  classifier.
- :func:`smoothed_robustness` [RC, Ch. 2] (item 3): the probability bound over (eps, sigma).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from painwatch.robust.certificate import (
    ABSTAIN,
    Certificate,
    CertificationOutcome,
    CertificationSettings,
    MethodSpec,
    register_method,
)
from painwatch.robust.noise import evaluation_mode, noisy_logit_batches
from painwatch.robust.validation import (
    Model,
    check_alpha,
    check_batch,
    check_count,
    check_generator,
    check_image,
    check_lipschitz_constant,
    check_logits,
    check_model,
    check_same_device,
    check_sigma,
)

__all__ = [
    "lipschitz_certify",
    "lipschitz_certify_batch",
    "logit_margin",
    "margin_for_class",
    "smoothed_margin_certify",
    "smoothed_margin_slack",
    "smoothed_robustness",
]

_SQRT2 = math.sqrt(2.0)


def logit_margin(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 class and its margin over the runner-up, for a batch of logits ``(B, K)``, ``K >= 2``.

    Returns ``(prediction, margin)``: ``prediction`` a LongTensor ``(B,)`` (ties go to the lowest index,
    as ``torch.argmax``), ``margin = f_c - max_{j != c} f_j >= 0`` as a float64 tensor ``(B,)``.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (B, K) with K >= 2, got {shape}")
    logits64 = logits.detach().to(torch.float64)
    prediction = torch.argmax(logits64, dim=1)
    top2 = torch.topk(logits64, k=2, dim=1).values
    return prediction, top2[:, 0] - top2[:, 1]


def margin_for_class(logits: torch.Tensor, label: int | torch.Tensor) -> torch.Tensor:
    """Margin of a *fixed* class: ``M_c = f_c - max_{j != c} f_j`` in float64 (negative when c loses).

    ``logits`` is ``(B, K)``; ``label`` is one class for all rows or a LongTensor ``(B,)``.
    ``M_c`` is ``sqrt(2) L``-Lipschitz in the input when ``f`` is ``L``-Lipschitz.
    """
    logits64 = logits.detach().to(torch.float64)
    batch, num_classes = logits64.shape
    labels = torch.as_tensor(label, dtype=torch.long, device=logits64.device).expand(batch)
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"label must be in [0, {num_classes}), got {labels.unique().tolist()}")
    own = logits64.gather(1, labels[:, None])[:, 0]
    others = logits64.scatter(1, labels[:, None], -math.inf)
    return own - others.max(dim=1).values


def _model_logits(model: Model, batch: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on ``batch`` in eval mode without autograd, checked for shape and finiteness."""
    with evaluation_mode(model), torch.no_grad():
        logits = model(batch)
    return check_logits(logits, batch.shape[0])


def lipschitz_certify(model: Model, x: torch.Tensor, lipschitz_constant: float) -> Certificate:
    """Lipschitz margin certificate [Tsuzuku18] of the bare network at one image (docs/design.md,
    "The certificates", item 1).

    Guarantee: if ``lipschitz_constant >= Lip_2(f)``, then ``argmax f(x + delta) = prediction`` for every
    ``||delta||_2 < radius = M_f(x) / (sqrt(2) L)`` (deterministic: ``alpha = 0``). One forward pass in
    eval mode. A tie between the top two logits gives radius 0 (the prediction is kept: the certificate
    then only states what ``f`` predicts at ``x``).
    """
    return lipschitz_certify_batch(model, check_image(x).unsqueeze(0), lipschitz_constant)[0]


def lipschitz_certify_batch(model: Model, x: torch.Tensor, lipschitz_constant: float) -> list[Certificate]:
    """:func:`lipschitz_certify` for a batch ``(B, C, H, W)``: one forward pass for all images."""
    check_model(model)
    check_batch(x)
    check_same_device(model, x)
    constant = check_lipschitz_constant(lipschitz_constant)
    return _lipschitz_certificates(_model_logits(model, x), constant)


def _lipschitz_certificates(logits: torch.Tensor, constant: float) -> list[Certificate]:
    prediction, margin = logit_margin(logits)
    radii = (margin / (_SQRT2 * constant)).tolist()
    return [
        Certificate(prediction=int(c), radius=float(r), method=_LIPSCHITZ.name, sigma=0.0, n=0, alpha=0.0,
                    bound=float(m), forward_passes=1)
        for c, r, m in zip(prediction.tolist(), radii, margin.tolist(), strict=True)
    ]


def smoothed_margin_slack(*, lipschitz_constant: float, sigma: float, n: int, alpha: float) -> float:
    """Gaussian-concentration slack ``2 L sigma sqrt(ln(1/alpha) / n)`` of the smoothed margin [RC, Ch. 3].

    In logit units (it is subtracted from a mean margin).
    ``M_c(x + sigma Z)`` is ``sqrt(2) L sigma``-Lipschitz in a standard Gaussian ``Z``, so the mean of ``n``
    independent draws is ``sqrt(2) L sigma / sqrt(n)``-Lipschitz in ``(Z_1..Z_n)`` and falls below its
    expectation by more than this slack with probability at most ``alpha``.
    """
    constant = check_lipschitz_constant(lipschitz_constant)
    log_term = math.log(1.0 / check_alpha(alpha))
    return 2.0 * constant * check_sigma(sigma) * math.sqrt(log_term / check_count(n, "n"))


def smoothed_margin_certify(
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float,
    lipschitz_constant: float,
    n0: int = 100,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    logits_callback: Callable[[torch.Tensor], None] | None = None,
) -> Certificate:
    """Smoothed (expected) margin certificate [RC, Ch. 3] (docs/design.md, "The certificates", item 2),
    two-stage like [Cohen19].

    What it certifies is the expected-logit classifier ``h(x) = argmax_c E_xi[f_c(x + xi)]``,
    ``xi ~ N(0, sigma^2 I)``, *not* the bare network ``f``.

    1. ``n0`` noisy samples select ``c``, the argmax of their mean logits.
    2. ``n`` fresh samples estimate ``SM(x) = E[M_c(x + xi)]`` (``M_c = f_c - max_{j != c} f_j``, float64);
       ``SM_low = SM_hat - 2 L sigma sqrt(ln(1/alpha) / n)``.

    Guarantee: with probability at least ``1 - alpha`` over the fresh samples, ``SM(x) >= SM_low``; then,
    since ``SM`` is ``sqrt(2) L``-Lipschitz and ``SM(x') > 0`` implies ``h(x') = c``, ``h(x + delta) = c`` for
    every ``||delta||_2 < r = SM_low / (sqrt(2) L)`` (L2, [0, 1] pixel units). Abstains (prediction -1,
    radius 0) when ``SM_low <= 0``. Requires ``lipschitz_constant`` to be a sound upper bound of
    ``Lip_2(f)``. Deterministic given the generator's seed; ``logits_callback`` sees every batch of noisy
    logits (float64), selection draws first.
    """
    check_model(model)
    check_image(x)
    sigma = check_sigma(sigma)
    constant = check_lipschitz_constant(lipschitz_constant)
    n0 = check_count(n0, "n0")
    n = check_count(n, "n")
    alpha = check_alpha(alpha)
    batch_size = check_count(batch_size, "batch_size")
    check_generator(generator)

    def draw(num: int) -> torch.Tensor:
        # Each stage resolves the generator anew: with None, the two stages draw independent seeds.
        batches = noisy_logit_batches(model, x, sigma=sigma, num=num, batch_size=batch_size,
                                      generator=generator, logits_callback=logits_callback)
        return torch.cat(list(batches), dim=0)

    candidate = int(torch.argmax(draw(n0).mean(dim=0)))
    margin_hat = float(margin_for_class(draw(n), candidate).mean())
    slack = smoothed_margin_slack(lipschitz_constant=constant, sigma=sigma, n=n, alpha=alpha)
    margin_low = margin_hat - slack
    certified = margin_low > 0.0
    return Certificate(
        prediction=candidate if certified else ABSTAIN,
        radius=margin_low / (_SQRT2 * constant) if certified else 0.0,
        method=_SMOOTHED_MARGIN.name, sigma=sigma, n=n, alpha=alpha, bound=margin_low,
        forward_passes=n0 + n,
    )


def smoothed_robustness(
    margin_lower_bound: float | np.ndarray,
    *,
    lipschitz_constant: float,
    eps: float | np.ndarray,
    sigma: float | np.ndarray,
) -> np.ndarray:
    """Smoothed robustness bound [RC, Ch. 2] (docs/design.md, "The certificates", item 3) over adversary
    ``eps`` and noise ``sigma`` (both L2, [0, 1] pixel units).

    For every ``||delta||_2 <= eps``::

        P_xi[f(x + delta + xi) predicts c] >= 1 - exp(-(SM_low - sqrt(2) L eps)^2 / (4 L^2 sigma^2))

    whenever ``SM_low > sqrt(2) L eps``, and the bound is 0 elsewhere (nothing certified). Here
    ``margin_lower_bound`` is ``SM_low``, a lower bound of ``E[M_c(x + xi)]`` at the *same* sigma (e.g. the
    ``bound`` of a :func:`smoothed_margin_certify` certificate at that sigma, or the plain logit margin when
    ``sigma = 0``); the statement then holds with the confidence of that bound.
    Why: ``M_c(x + delta + sigma Z)`` is ``sqrt(2) L sigma``-Lipschitz in ``Z`` with mean at least
    ``SM_low - sqrt(2) L eps``; Gaussian concentration bounds the chance it drops to 0.

    Limits: ``sigma = 0`` is the worst case (the Lipschitz margin, item 1): 1 where
    ``SM_low > sqrt(2) L eps``, else 0; ``eps = 0`` is the average case (accuracy under noise). All
    arguments broadcast (numpy rules); the result is a float64 array of the broadcast shape with values
    in ``[0, 1]``.
    """
    constant = check_lipschitz_constant(lipschitz_constant)
    margin = np.asarray(margin_lower_bound, dtype=np.float64)
    eps_arr = np.asarray(eps, dtype=np.float64)
    sigma_arr = np.asarray(sigma, dtype=np.float64)
    if np.isnan(margin).any():
        raise ValueError("margin_lower_bound contains NaN")
    if not (np.isfinite(eps_arr).all() and (eps_arr >= 0).all()):
        raise ValueError(
            f"eps must be finite and >= 0 (L2 radius), got values in [{eps_arr.min()}, {eps_arr.max()}]"
        )
    if not (np.isfinite(sigma_arr).all() and (sigma_arr >= 0).all()):
        raise ValueError(
            f"sigma must be finite and >= 0, got values in [{sigma_arr.min()}, {sigma_arr.max()}]"
        )
    try:
        margin, eps_arr, sigma_arr = np.broadcast_arrays(margin, eps_arr, sigma_arr)
    except ValueError as error:
        raise ValueError(
            f"margin_lower_bound {margin.shape}, eps {eps_arr.shape} and sigma {sigma_arr.shape} "
            "do not broadcast together"
        ) from error
    slack = margin - _SQRT2 * constant * eps_arr
    certified = slack > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = -np.square(slack) / (4.0 * constant**2 * np.square(sigma_arr))
        # sigma = 0 with a positive slack: exponent is -inf, the bound is exactly 1.
        bound = -np.expm1(np.where(sigma_arr > 0, exponent, -np.inf))
    return np.where(certified, bound, 0.0).astype(np.float64)


def _run_lipschitz(model: Model, x: torch.Tensor, settings: CertificationSettings) -> CertificationOutcome:
    """:func:`lipschitz_certify`; its one batch of (clean) logits goes to ``logits_callback`` too, so that
    a caller gets the probabilities from the same forward pass."""
    check_model(model)
    batch = check_image(x).unsqueeze(0)
    check_same_device(model, batch)
    constant = check_lipschitz_constant(settings.lipschitz_constant)
    logits = _model_logits(model, batch)
    if settings.logits_callback is not None:
        settings.logits_callback(logits.detach().to(torch.float64))
    return CertificationOutcome(_lipschitz_certificates(logits, constant)[0])


def _lipschitz_from_logits(logits: torch.Tensor, settings: CertificationSettings) -> CertificationOutcome:
    """:func:`lipschitz_certify` from the clean logits ``(1, K)`` of the one pass it would make."""
    constant = check_lipschitz_constant(settings.lipschitz_constant)
    return CertificationOutcome(_lipschitz_certificates(logits, constant)[0])


def _run_smoothed_margin(
    model: Model, x: torch.Tensor, settings: CertificationSettings
) -> CertificationOutcome:
    certificate = smoothed_margin_certify(
        model, x, sigma=settings.sigma, lipschitz_constant=settings.lipschitz_constant, n0=settings.n0,
        n=settings.n, alpha=settings.alpha, batch_size=settings.batch_size, generator=settings.generator,
        logits_callback=settings.logits_callback,
    )
    return CertificationOutcome(certificate)


_LIPSCHITZ = register_method(MethodSpec(
    name="lipschitz",
    certifies="the network itself",
    needs_lipschitz_constant=True,
    needs_noise=False,
    deterministic=True,
    sequential=False,
    base="lipschitz",
    runner=_run_lipschitz,
    from_logits=_lipschitz_from_logits,
))
_SMOOTHED_MARGIN = register_method(MethodSpec(
    name="smoothed_margin",
    certifies="the expected-logit classifier argmax E[f(x + xi)]",
    needs_lipschitz_constant=True,
    needs_noise=True,
    deterministic=False,
    sequential=False,
    base="smoothed_margin",
    runner=_run_smoothed_margin,
))
