"""painwatch.robust: the model-agnostic certification core (DESIGN "The certificates").

A *model* is any callable mapping a float tensor ``(B, C, H, W)`` with pixels in [0, 1] to logits
``(B, K)``; ``x`` is one image ``(C, H, W)``. Noise levels and radii are L2 norms in that pixel space.
Every certificate is a :class:`Certificate`; abstention is ``prediction == -1`` with radius 0.
This package imports torch, numpy, scipy (and ART for attacks) only, never the rest of painwatch.
"""

from painwatch.robust.attacks import (
    SURROGATE_KINDS,
    CertificateAttackReport,
    MonteCarloSurrogate,
    attack_certificates,
    monte_carlo_smoothed_classifier,
    network_classifier,
    pgd_l2,
)
from painwatch.robust.certificates import (
    ABSTAIN,
    METHODS,
    Certificate,
    lipschitz_certify,
    lipschitz_certify_batch,
    logit_margin,
    margin_for_class,
    smoothed_margin_certify,
    smoothed_margin_slack,
    smoothed_robustness,
)
from painwatch.robust.losses import MCExpectedMarginLoss, mc_expected_margin_loss, true_class_margin
from painwatch.robust.smoothing import (
    CONCENTRATION_BOUNDS,
    SmoothedClassifier,
    clopper_pearson_lower,
    empirical_bernstein_radius,
    evaluation_mode,
    expected_logits,
    expected_softmax,
    hoeffding_radius,
    mean_confidence_bounds,
    noisy_logits,
    soft_smoothing_certify,
)
from painwatch.robust.validation import (
    check_alpha,
    check_batch,
    check_count,
    check_generator,
    check_image,
    check_lipschitz_constant,
    check_logits,
    check_model,
    check_num_classes,
    check_sigma,
)

__all__ = [
    "ABSTAIN",
    "CONCENTRATION_BOUNDS",
    "METHODS",
    "SURROGATE_KINDS",
    "Certificate",
    "CertificateAttackReport",
    "MCExpectedMarginLoss",
    "MonteCarloSurrogate",
    "SmoothedClassifier",
    "attack_certificates",
    "check_alpha",
    "check_batch",
    "check_count",
    "check_generator",
    "check_image",
    "check_lipschitz_constant",
    "check_logits",
    "check_model",
    "check_num_classes",
    "check_sigma",
    "clopper_pearson_lower",
    "empirical_bernstein_radius",
    "evaluation_mode",
    "expected_logits",
    "expected_softmax",
    "hoeffding_radius",
    "lipschitz_certify",
    "lipschitz_certify_batch",
    "logit_margin",
    "margin_for_class",
    "mc_expected_margin_loss",
    "mean_confidence_bounds",
    "monte_carlo_smoothed_classifier",
    "network_classifier",
    "noisy_logits",
    "pgd_l2",
    "smoothed_margin_certify",
    "smoothed_margin_slack",
    "smoothed_robustness",
    "soft_smoothing_certify",
    "true_class_margin",
]
