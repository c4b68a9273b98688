"""timm backbones and Lipschitz networks with the normalisation inside, and model bundles
(``weights.safetensors`` + ``model.json``, with ``in_distribution.safetensors`` for the in-distribution
check).

A model takes ``(B, 3, H, W)`` float images with pixels in [0, 1] and returns logits ``(B, K)``.
:mod:`painwatch.models.schema` types ``model.json``; :mod:`painwatch.models.bundle` reads and writes
bundles; :mod:`painwatch.models.network` builds the networks; :mod:`painwatch.models.in_distribution`
is the statistic of the in-distribution check (shared by training, which fits it, and inference, which
applies it).
"""

from painwatch.models.bundle import (
    METADATA_FILE,
    WEIGHTS_FILE,
    Bundle,
    library_versions,
    load_bundle,
    read_metadata,
    record_gate_verdict,
    save_bundle,
    update_bundle_metadata,
)
from painwatch.models.in_distribution import (
    REFUSAL_LEVEL,
    InDistributionError,
    InDistributionSpec,
    InDistributionStatistic,
    conformal_threshold,
    descriptor_pass,
    fit_in_distribution,
)
from painwatch.models.lipschitz_nets import (
    LIPSCHITZ_ARCHITECTURES,
    LipschitzArchitecture,
    is_lipschitz_architecture,
)
from painwatch.models.network import (
    DEFAULT_ARCH,
    ModelWeightsError,
    Normalize,
    PainNet,
    create_model,
    find_gradcam_layer,
    load_backbone_weights,
    read_state_dict,
)
from painwatch.models.schema import (
    DEFAULT_CERTIFICATION_BOUNDS,
    DEFAULT_CERTIFICATION_SIGMA,
    DEFAULT_SCORE_TEMPERATURE,
    FORMAT_VERSION,
    IN_DISTRIBUTION_FILE,
    BundleError,
    BundleMetadata,
    CertificationDefaults,
    GateVerdict,
    InDistributionCheck,
    default_certification,
    default_certification_method,
)

__all__ = [
    "DEFAULT_ARCH",
    "DEFAULT_CERTIFICATION_BOUNDS",
    "DEFAULT_CERTIFICATION_SIGMA",
    "DEFAULT_SCORE_TEMPERATURE",
    "FORMAT_VERSION",
    "IN_DISTRIBUTION_FILE",
    "LIPSCHITZ_ARCHITECTURES",
    "METADATA_FILE",
    "REFUSAL_LEVEL",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "BundleMetadata",
    "CertificationDefaults",
    "GateVerdict",
    "InDistributionCheck",
    "InDistributionError",
    "InDistributionSpec",
    "InDistributionStatistic",
    "LipschitzArchitecture",
    "ModelWeightsError",
    "Normalize",
    "PainNet",
    "conformal_threshold",
    "create_model",
    "default_certification",
    "default_certification_method",
    "descriptor_pass",
    "find_gradcam_layer",
    "fit_in_distribution",
    "is_lipschitz_architecture",
    "library_versions",
    "load_backbone_weights",
    "load_bundle",
    "read_metadata",
    "read_state_dict",
    "record_gate_verdict",
    "save_bundle",
    "update_bundle_metadata",
]
