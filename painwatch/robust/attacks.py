"""PGD-L2 attacks [Madry18] that try to break certificates (a certificate is only as good as its check).

The attack itself is the adversarial-robustness-toolbox's ``ProjectedGradientDescent`` (ART, maintained,
norm 2) on a ``PyTorchClassifier``; this module adds what a certificate check needs around it:
per-image radii, several starts with the strongest result kept, seeded restarts, an exact final
projection onto the ball and the [0, 1] box, and the bookkeeping of
:func:`attack_certificates`: attack each certified image at ``0.99 * radius`` and count how many
predictions *of the classifier that was certified* changed.

Which classifier to check (docs/design.md, "The certificates"):

- ``"lipschitz"``: the bare network; attack it and classify with :func:`network_classifier`. Any flip
  disproves the certificate (or the Lipschitz bound).
- smoothing methods: the smoothed classifier cannot be differentiated, so attack a differentiable
  surrogate (:class:`MonteCarloSurrogate`: the mean logits, or the log of the mean softmax, over a fixed
  set of noise draws) and then evaluate the *smoothed* prediction at the adversarial point with many
  fresh samples (:func:`monte_carlo_smoothed_classifier`). These checks are statistical.

ART is imported when an attack runs (it takes about 1.5 s to import).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from painwatch.robust.certificate import Certificate
from painwatch.robust.margin import margin_for_class
from painwatch.robust.noise import evaluation_mode, expected_logits, expected_softmax, resolve_generator
from painwatch.robust.smoothing import SmoothedClassifier
from painwatch.robust.validation import (
    check_batch,
    check_count,
    check_generator,
    check_image,
    check_labels,
    check_logits,
    check_model,
    check_sigma,
)

__all__ = [
    "SURROGATE_KINDS",
    "CertificateAttackReport",
    "MonteCarloSurrogate",
    "attack_certificates",
    "monte_carlo_smoothed_classifier",
    "network_classifier",
    "pgd_l2",
]

SURROGATE_KINDS: tuple[str, ...] = ("logits", "softmax", "counts")
"""How a smoothed classifier aggregates noisy outputs: mean logits (``h``, smoothed margin), mean softmax
(``argmax G``, soft smoothing) or votes (Cohen's ``g``; attacked through the mean-softmax surrogate)."""


class _CallableModule(nn.Module):
    """Wrap a plain callable so that ART (which needs an ``nn.Module``) can attack it."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.function = function

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.function(batch)


class MonteCarloSurrogate(nn.Module):
    """Differentiable stand-in for a smoothed classifier: the base model averaged over fixed noise draws.

    ``forward(batch)`` returns ``(B, K)``: for ``kind="logits"`` the mean of ``f(x + sigma Z_k)`` over
    ``num_draws`` fixed draws ``Z_k`` (a Monte Carlo estimate of the expected logits); for ``"softmax"`` and
    ``"counts"`` the log of the mean softmax [Salman19], whose argmax estimates ``argmax G``
    and approximates Cohen's ``g``. The draws are taken once, from ``generator``, at construction, so the
    surrogate is a fixed deterministic function an attack can follow. One forward pass runs the base
    model on ``B * num_draws`` images: size the attack's ``batch_size`` for that.
    """

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], *, sigma: float,
                 input_shape: tuple[int, int, int], num_draws: int = 64, kind: str = "logits",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        check_model(model)
        if kind not in SURROGATE_KINDS:
            raise ValueError(f"kind must be one of {SURROGATE_KINDS}, got {kind!r}")
        if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
        self.model = model if isinstance(model, nn.Module) else _CallableModule(model)
        self.sigma = check_sigma(sigma)
        self.kind = kind
        self.num_draws = check_count(num_draws, "num_draws")
        generator = resolve_generator(generator)
        noise = torch.randn((self.num_draws, *(int(d) for d in input_shape)), generator=generator,
                            device=generator.device)
        self.register_buffer("noise", self.sigma * noise)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        batch_size = batch.shape[0]
        noisy = (batch.unsqueeze(1) + self.noise.to(batch.device, batch.dtype).unsqueeze(0)).flatten(0, 1)
        logits = self.model(noisy).reshape(batch_size, self.num_draws, -1)
        if self.kind == "logits":
            return logits.mean(dim=1)
        return torch.logsumexp(torch.log_softmax(logits, dim=2), dim=1) - math.log(self.num_draws)


LabelFunction = Callable[[torch.Tensor], torch.Tensor]
"""A classifier as a function of a batch ``(B, C, H, W)`` returning labels ``(B,)``."""


def network_classifier(model: Callable[[torch.Tensor], torch.Tensor]) -> LabelFunction:
    """The bare network as a label function: ``batch -> argmax f(batch)`` (LongTensor ``(B,)``), eval mode."""
    check_model(model)

    def classify(batch: torch.Tensor) -> torch.Tensor:
        with evaluation_mode(model), torch.no_grad():
            logits = check_logits(model(batch), batch.shape[0])
        return logits.argmax(dim=1)

    return classify


def monte_carlo_smoothed_classifier(
    model: Callable[[torch.Tensor], torch.Tensor], *, sigma: float, kind: str, num: int,
    batch_size: int = 1000, generator: torch.Generator | None = None, num_classes: int | None = None,
) -> LabelFunction:
    """A smoothed classifier estimated with ``num`` fresh noise draws per image, as a label function.

    ``kind`` selects which one: ``"logits"`` -> ``argmax E[f(x + xi)]`` (``h``, smoothed margin),
    ``"softmax"`` -> ``argmax E[softmax f(x + xi)]`` (soft smoothing), ``"counts"`` -> the majority vote of
    ``argmax f(x + xi)`` (Cohen's ``g``; needs ``num_classes``). Each call draws fresh noise from
    ``generator``. The estimate errs only where the smoothed classifier is nearly tied.
    """
    sigma = check_sigma(sigma)
    num = check_count(num, "num")
    check_generator(generator)
    if kind not in SURROGATE_KINDS:
        raise ValueError(f"kind must be one of {SURROGATE_KINDS}, got {kind!r}")
    if kind == "counts" and num_classes is None:
        raise ValueError("kind='counts' needs num_classes")
    generator = resolve_generator(generator)
    smoothed = SmoothedClassifier(model, num_classes, sigma) if kind == "counts" else None

    def classify(batch: torch.Tensor) -> torch.Tensor:
        labels = []
        for image in batch:
            if smoothed is not None:
                counts = smoothed.class_counts(image, num=num, batch_size=batch_size, generator=generator)
                labels.append(int(np.argmax(counts)))
            else:
                estimate = expected_logits if kind == "logits" else expected_softmax
                scores = estimate(model, image, sigma=sigma, num=num, batch_size=batch_size,
                                  generator=generator)
                labels.append(int(scores.argmax()))
        return torch.tensor(labels, dtype=torch.long)

    return classify


def _check_eps(eps: float | torch.Tensor | np.ndarray, batch: int) -> np.ndarray:
    if isinstance(eps, torch.Tensor):
        eps = eps.detach().cpu().numpy()
    values = np.asarray(eps, dtype=np.float64)
    if values.ndim == 0:
        values = np.full((batch,), float(values))
    if values.shape != (batch,):
        raise ValueError(f"eps must be a number or have shape ({batch},), got shape {values.shape}")
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise ValueError(
            f"eps must be finite and >= 0 (L2 radius), got values in [{values.min()}, {values.max()}]"
        )
    return values.copy()


def _project(x: torch.Tensor, candidate: torch.Tensor, eps: np.ndarray) -> torch.Tensor:
    """Project ``candidate`` onto ``{||z - x||_2 <= eps} ∩ [0, 1]^d`` per image (float64 arithmetic).

    Rescaling the perturbation towards ``x`` and then clamping to the box never leaves the ball: ``x`` lies
    in the box, so clamping only shortens each coordinate of the perturbation.
    """
    delta = (candidate.to(torch.float64) - x.to(torch.float64)).flatten(1)
    norms = delta.norm(dim=1)
    radius = torch.as_tensor(eps, dtype=torch.float64, device=delta.device)
    scale = torch.where(norms > radius, radius / norms.clamp_min(1e-300), torch.ones_like(norms))
    projected = x.to(torch.float64) + (delta * scale[:, None]).reshape(x.shape)
    return projected.clamp(0.0, 1.0).to(x.dtype)


def pgd_l2(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float | torch.Tensor | np.ndarray,
    steps: int = 50,
    restarts: int = 1,
    step_size: float = 2.5,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted PGD-L2 [Madry18] (ART ``ProjectedGradientDescent``, cross-entropy loss) against ``labels``.

    Args:
        model: maps ``(B, C, H, W)`` in [0, 1] to logits ``(B, K)``; must be differentiable.
        x: images ``(B, C, H, W)`` in [0, 1].
        labels: the classes to move away from, integer ``(B,)``.
        eps: L2 budget in [0, 1] pixel units, one number or one per image ``(B,)``; images with
            ``eps = 0`` are returned unchanged.
        steps: PGD iterations per start.
        restarts: random starts (uniform in the ball) on top of the start at ``x``.
        step_size: step length relative to the budget: each step moves ``step_size * eps / steps``
            (2.5 as in [Madry18], so a start can cross the ball and come back).
        batch_size: images per ART batch.
        generator: seeds the random starts (ART draws them from numpy's global generator: its state is
            set from this generator for the call and restored afterwards).

    Returns ``x_adv`` with the dtype and device of ``x``: per image the candidate with the lowest
    float64 margin of ``labels`` among all starts, projected so that ``||x_adv - x||_2 <= eps`` and
    ``x_adv`` lies in [0, 1]. The model's training flags are restored.
    """
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    check_model(model)
    check_batch(x)
    batch = x.shape[0]
    labels = check_labels(labels, batch=batch).to(x.device)
    budgets = _check_eps(eps, batch)
    steps = check_count(steps, "steps")
    restarts = check_count(restarts, "restarts", minimum=0)
    batch_size = check_count(batch_size, "batch_size")
    if not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
    generator = resolve_generator(generator)

    module = model if isinstance(model, nn.Module) else _CallableModule(model)
    with evaluation_mode(module), warnings.catch_warnings():
        # ART 1.20 passes tensors through np.array(..., copy=False) internally; harmless under numpy 2.
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        with torch.no_grad():
            num_classes = check_logits(module(x[:1]), 1).shape[1]
        check_labels(labels, batch=batch, num_classes=num_classes)
        classifier = PyTorchClassifier(
            model=module, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=num_classes,
            clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu",
        )
        active = np.flatnonzero(budgets > 0)
        best = x.detach().clone()
        if active.size == 0:
            return best
        x_active = x[active].detach()
        x_np = x_active.cpu().numpy().astype(np.float32)
        y_np = labels[active].cpu().numpy()
        eps_active = budgets[active]
        candidates = []
        # Start at x with a per-image budget: ART takes an eps array shaped like the input.
        eps_arr = eps_active.astype(np.float32).reshape(-1, *([1] * (x.ndim - 1)))
        attack = ProjectedGradientDescent(
            classifier, norm=2, eps=eps_arr, eps_step=eps_arr * np.float32(step_size / steps),
            max_iter=steps, targeted=False, num_random_init=0, batch_size=batch_size, verbose=False,
        )
        candidates.append(torch.from_numpy(attack.generate(x=x_np, y=y_np)))
        if restarts > 0:
            # ART's random L2 start needs one scalar eps per attack, so random starts go image by image.
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            saved_state = np.random.get_state()
            np.random.seed(seed)
            try:
                restarted = np.empty_like(x_np)
                for row, radius in enumerate(eps_active):
                    attack = ProjectedGradientDescent(
                        classifier, norm=2, eps=float(radius), eps_step=float(radius) * step_size / steps,
                        max_iter=steps, targeted=False, num_random_init=restarts, batch_size=1, verbose=False,
                    )
                    restarted[row] = attack.generate(x=x_np[row:row + 1], y=y_np[row:row + 1])[0]
            finally:
                np.random.set_state(saved_state)
            candidates.append(torch.from_numpy(restarted))

        labels_active = labels[active]
        best_margin = torch.full((active.size,), math.inf, dtype=torch.float64)
        best_active = x_active.clone()
        for candidate in candidates:
            projected = _project(x_active, candidate.to(x.device), eps_active)
            with torch.no_grad():
                margins = margin_for_class(check_logits(module(projected), active.size), labels_active).cpu()
            better = margins < best_margin
            best_margin = torch.where(better, margins, best_margin)
            best_active[better.to(x.device)] = projected[better.to(x.device)]
        best[torch.as_tensor(active, device=x.device)] = best_active
    return best


@dataclass(frozen=True, kw_only=True)
class CertificateAttackReport:
    """What PGD did to a set of certificates.

    Attributes:
        num_points: certificates given.
        num_attacked: non-abstaining certificates with a positive radius (each attacked at
            ``fraction * radius``).
        num_flipped: attacked points where the certified classifier's label differs from the certified
            prediction at the adversarial point or already at the clean image (both lie in the ball):
            0 for sound certificates; for statistical ones, rare.
        flipped: indices (into the input batch) of the flipped points.
        fraction: the budget as a fraction of each certified radius.
        max_budget_used: the largest ``||x_adv - x||_2 / radius`` over attacked points (<= fraction).
        num_changed_at_clean: of the flipped points, those whose label differs already at the clean image
            (a wrong selection or a near tie of the smoothed classifier, not the attack's doing).
    """

    num_points: int
    num_attacked: int
    num_flipped: int
    flipped: tuple[int, ...] = field(default_factory=tuple)
    fraction: float = 0.99
    max_budget_used: float = 0.0
    num_changed_at_clean: int = 0

    @property
    def flip_rate(self) -> float:
        """``num_flipped / num_attacked`` (0.0 when nothing was attacked)."""
        return self.num_flipped / self.num_attacked if self.num_attacked else 0.0


def attack_certificates(
    attack_model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    classify: LabelFunction,
    x: torch.Tensor,
    certificates: Sequence[Certificate],
    *,
    fraction: float = 0.99,
    steps: int = 50,
    restarts: int = 1,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> CertificateAttackReport:
    """Attack every certified image with PGD-L2 at ``fraction * radius`` and count broken certificates.

    ``attack_model`` is what PGD differentiates (the bare network, or a :class:`MonteCarloSurrogate` of a
    smoothed classifier); ``classify`` maps a batch to the labels of the classifier that was certified
    (:func:`network_classifier`, :func:`monte_carlo_smoothed_classifier`). ``x`` is ``(B, C, H, W)`` with
    one certificate per image. A point counts as flipped when ``classify`` disagrees with the certified
    prediction at ``x_adv`` or at ``x``.
    """
    check_batch(x)
    if len(certificates) != x.shape[0]:
        raise ValueError(f"got {len(certificates)} certificates for {x.shape[0]} images")
    if not all(isinstance(c, Certificate) for c in certificates):
        raise TypeError("certificates must be painwatch.robust.Certificate records")
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    attacked = [i for i, c in enumerate(certificates) if not c.abstained and c.radius > 0.0]
    if not attacked:
        return CertificateAttackReport(num_points=len(certificates), num_attacked=0, num_flipped=0,
                                       fraction=fraction)
    for i in attacked:
        check_image(x[i], f"x[{i}]")
    index = torch.as_tensor(attacked, device=x.device)
    x_attacked = x[index]
    predictions = torch.tensor([certificates[i].prediction for i in attacked], dtype=torch.long)
    budgets = np.array([fraction * certificates[i].radius for i in attacked], dtype=np.float64)
    # Radii can be unbounded in principle (e.g. a saturated bound); the box [0, 1]^d caps any attack anyway.
    budgets = np.minimum(budgets, math.sqrt(x[0].numel()))
    x_adv = pgd_l2(attack_model, x_attacked, predictions.to(x.device), eps=budgets, steps=steps,
                   restarts=restarts, batch_size=batch_size, generator=generator)
    used = (x_adv.double() - x_attacked.double()).flatten(1).norm(dim=1).cpu().numpy()
    radii = np.array([certificates[i].radius for i in attacked])
    clean_labels = torch.as_tensor(classify(x_attacked)).cpu().long()
    adversarial_labels = torch.as_tensor(classify(x_adv)).cpu().long()
    changed_at_clean = clean_labels != predictions
    flipped_mask = (adversarial_labels != predictions) | changed_at_clean
    flipped = tuple(attacked[i] for i in torch.nonzero(flipped_mask).flatten().tolist())
    return CertificateAttackReport(
        num_points=len(certificates),
        num_attacked=len(attacked),
        num_flipped=len(flipped),
        flipped=flipped,
        fraction=fraction,
        max_budget_used=float(np.max(used / radii)),
        num_changed_at_clean=int(changed_at_clean.sum()),
    )
