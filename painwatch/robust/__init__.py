"""painwatch.robust: the model-agnostic certification core (docs/design.md, "The certificates").

A *model* is any callable mapping a float tensor ``(B, C, H, W)`` with pixels in [0, 1] to logits
``(B, K)``; ``x`` is one image ``(C, H, W)``. Noise levels and radii are L2 norms in that pixel space.
Every certificate is a :class:`Certificate`; abstention is ``prediction == -1`` with radius 0. Certify
through :func:`certify` with a method name of :data:`METHODS` (the registry says what each method
needs and which classifier it certifies). This package imports torch, numpy, scipy (and ART for
attacks, when one runs) only, never the rest of painwatch.

Modules (arrows point to what a module imports; there are no cycles):

- ``validation`` input checks; ``certificate`` the Certificate, the method registry, certify();
- ``noise`` the one seeded Gaussian sampler; ``bounds`` Clopper-Pearson, Hoeffding, empirical
  Bernstein and the betting confidence sequence;
- ``margin`` (-> certificate, noise) the Lipschitz margin [Tsuzuku18], the smoothed margin and
  smoothed robustness [RC]; ``sequential`` (-> certificate, noise, bounds) anytime-valid and
  fixed-budget certificates [WSR23]; ``smoothing`` (-> certificate, noise, bounds, sequential)
  randomized smoothing [Cohen19] and soft smoothing [Salman19];
- ``spectral`` dense and convolution operator norms [Sedghi19]; ``lipschitz_rules`` (-> spectral)
  per-layer bounds and ``lipschitz_extensions`` (-> lipschitz_rules, spectral) those of timm and
  deel-torchlip layers; ``lipschitz`` (-> lipschitz_rules, lipschitz_extensions, spectral) sound
  network bounds; ``layers`` (-> spectral) orthogonal layers [Li19; Anil19]; ``lipschitz_layers``
  (-> layers, spectral) AOL layers [Prach22] and SLL residual layers [Araujo23];
- ``moments`` (-> layers, lipschitz_layers) Gaussian moment propagation; ``losses`` (-> moments)
  margin losses; ``attacks`` (-> margin, noise, smoothing) PGD-L2 checks [Madry18]; ``evaluation``
  certified accuracy.

Everything public is re-exported here.
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
from painwatch.robust.bounds import (
    CONCENTRATION_BOUNDS,
    BettingLowerBound,
    best_attainable_lower_bound,
    clopper_pearson_lower,
    empirical_bernstein_radius,
    hoeffding_radius,
    mean_confidence_bounds,
)
from painwatch.robust.certificate import (
    ABSTAIN,
    BASE_METHODS,
    METHODS,
    Certificate,
    CertificationOutcome,
    CertificationSampler,
    CertificationSettings,
    MethodSpec,
    certification_sampler,
    certify,
    certify_logits,
    certify_steps,
    method_spec,
    register_method,
)
from painwatch.robust.evaluation import (
    certified_accuracy_at,
    certified_accuracy_curve,
    certified_accuracy_interval,
)
from painwatch.robust.layers import (
    GroupSort,
    InvertibleDownsampling,
    MaxMin,
    OrthogonalConv2d,
    OrthogonalLinear,
    bjorck_orthonormalize,
    export_plain,
)
from painwatch.robust.lipschitz import (
    UnsupportedLayerError,
    lipschitz_lower_estimate,
    lipschitz_upper_bound,
)
from painwatch.robust.lipschitz_layers import (
    AOLConv2d,
    AOLLinear,
    ChannelPad,
    PlainSLL,
    SLLConv2d,
    SLLLinear,
    aol_rescale,
    sdp_residual_bound,
)
from painwatch.robust.losses import (
    LOSS_NAMES,
    MarginCertifiedRadiusLoss,
    MarginSmoothedCertifiedRadiusLoss,
    MCExpectedMarginLoss,
    MulticlassHingeLoss,
    OffsetCrossEntropyLoss,
    SmoothedCrossEntropyLoss,
    SoftmaxCrossEntropyLoss,
    ZhenLoss,
    make_loss,
    mc_expected_margin_loss,
    mcr_loss,
    mscr_loss,
    multiclass_hinge_loss,
    offset_cross_entropy_loss,
    sc_sce_loss,
    sce_loss,
    true_class_margin,
    zhen_loss,
)
from painwatch.robust.margin import (
    lipschitz_certify,
    lipschitz_certify_batch,
    logit_margin,
    margin_for_class,
    smoothed_margin_certify,
    smoothed_margin_slack,
    smoothed_robustness,
)
from painwatch.robust.moments import (
    MomentRule,
    clark_max_moments,
    expected_margin,
    gaussian_logit_moments,
    incorrect_max_moments,
    propagate_moments,
    register_moment_rule,
    relu_moments,
)
from painwatch.robust.noise import (
    evaluation_mode,
    expected_logits,
    expected_softmax,
    noisy_copies,
    noisy_logit_batches,
    noisy_logits,
    resolve_generator,
)
from painwatch.robust.sequential import (
    SCORE_KINDS,
    SEQUENTIAL_BOUNDS,
    SEQUENTIAL_METHODS,
    STOP_REASONS,
    SequentialCertificate,
    SequentialSampler,
    sequential_certify,
    sequential_certify_steps,
)
from painwatch.robust.smoothing import (
    SmoothedClassifier,
    soft_smoothing_certify,
)
from painwatch.robust.spectral import (
    FLOAT_SAFETY,
    conv_layer_norm_bound,
    conv_operator_norm_bound,
    dense_operator_norm,
)
from painwatch.robust.validation import (
    Model,
    check_alpha,
    check_batch,
    check_count,
    check_generator,
    check_image,
    check_input_shape,
    check_labels,
    check_lipschitz_constant,
    check_logits,
    check_model,
    check_num_classes,
    check_same_device,
    check_sigma,
)

__all__ = [
    "ABSTAIN",
    "BASE_METHODS",
    "CONCENTRATION_BOUNDS",
    "FLOAT_SAFETY",
    "LOSS_NAMES",
    "METHODS",
    "SCORE_KINDS",
    "SEQUENTIAL_BOUNDS",
    "SEQUENTIAL_METHODS",
    "STOP_REASONS",
    "SURROGATE_KINDS",
    "AOLConv2d",
    "AOLLinear",
    "BettingLowerBound",
    "Certificate",
    "CertificateAttackReport",
    "CertificationOutcome",
    "CertificationSampler",
    "CertificationSettings",
    "ChannelPad",
    "GroupSort",
    "InvertibleDownsampling",
    "MCExpectedMarginLoss",
    "MarginCertifiedRadiusLoss",
    "MarginSmoothedCertifiedRadiusLoss",
    "MaxMin",
    "MethodSpec",
    "Model",
    "MomentRule",
    "MonteCarloSurrogate",
    "MulticlassHingeLoss",
    "OffsetCrossEntropyLoss",
    "OrthogonalConv2d",
    "OrthogonalLinear",
    "PlainSLL",
    "SLLConv2d",
    "SLLLinear",
    "SequentialCertificate",
    "SequentialSampler",
    "SmoothedClassifier",
    "SmoothedCrossEntropyLoss",
    "SoftmaxCrossEntropyLoss",
    "UnsupportedLayerError",
    "ZhenLoss",
    "aol_rescale",
    "attack_certificates",
    "best_attainable_lower_bound",
    "bjorck_orthonormalize",
    "certification_sampler",
    "certified_accuracy_at",
    "certified_accuracy_curve",
    "certified_accuracy_interval",
    "certify",
    "certify_logits",
    "certify_steps",
    "check_alpha",
    "check_batch",
    "check_count",
    "check_generator",
    "check_image",
    "check_input_shape",
    "check_labels",
    "check_lipschitz_constant",
    "check_logits",
    "check_model",
    "check_num_classes",
    "check_same_device",
    "check_sigma",
    "clark_max_moments",
    "clopper_pearson_lower",
    "conv_layer_norm_bound",
    "conv_operator_norm_bound",
    "dense_operator_norm",
    "empirical_bernstein_radius",
    "evaluation_mode",
    "expected_logits",
    "expected_margin",
    "expected_softmax",
    "export_plain",
    "gaussian_logit_moments",
    "hoeffding_radius",
    "incorrect_max_moments",
    "lipschitz_certify",
    "lipschitz_certify_batch",
    "lipschitz_lower_estimate",
    "lipschitz_upper_bound",
    "logit_margin",
    "make_loss",
    "margin_for_class",
    "mc_expected_margin_loss",
    "mcr_loss",
    "mean_confidence_bounds",
    "method_spec",
    "monte_carlo_smoothed_classifier",
    "mscr_loss",
    "multiclass_hinge_loss",
    "network_classifier",
    "noisy_copies",
    "noisy_logit_batches",
    "noisy_logits",
    "offset_cross_entropy_loss",
    "pgd_l2",
    "propagate_moments",
    "register_method",
    "register_moment_rule",
    "relu_moments",
    "resolve_generator",
    "sc_sce_loss",
    "sce_loss",
    "sdp_residual_bound",
    "sequential_certify",
    "sequential_certify_steps",
    "smoothed_margin_certify",
    "smoothed_margin_slack",
    "smoothed_robustness",
    "soft_smoothing_certify",
    "true_class_margin",
    "zhen_loss",
]
