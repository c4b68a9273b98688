"""timm backbones and Lipschitz networks with the normalisation inside, and model bundles
(``weights.safetensors`` + ``model.json``).

A model takes ``(B, 3, H, W)`` float images with pixels in [0, 1] and returns logits ``(B, K)``.
:mod:`painwatch.models.schema` types ``model.json``; :mod:`painwatch.models.bundle` reads and writes
bundles; :mod:`painwatch.models.network` builds the networks.
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
    BundleError,
    BundleMetadata,
    CertificationDefaults,
    GateVerdict,
    default_certification,
    default_certification_method,
)

__all__ = [
    "DEFAULT_ARCH",
    "DEFAULT_CERTIFICATION_BOUNDS",
    "DEFAULT_CERTIFICATION_SIGMA",
    "DEFAULT_SCORE_TEMPERATURE",
    "FORMAT_VERSION",
    "LIPSCHITZ_ARCHITECTURES",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "BundleMetadata",
    "CertificationDefaults",
    "GateVerdict",
    "LipschitzArchitecture",
    "ModelWeightsError",
    "Normalize",
    "PainNet",
    "create_model",
    "default_certification",
    "default_certification_method",
    "find_gradcam_layer",
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
