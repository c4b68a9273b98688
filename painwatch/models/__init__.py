"""timm backbones with the normalisation inside, and model bundles (``weights.safetensors`` + ``model.json``).

A model takes ``(B, 3, H, W)`` float images with pixels in [0, 1] and returns logits ``(B, K)``.
"""

from painwatch.models.bundle import (
    CERTIFICATION_METHODS,
    DEFAULT_CERTIFICATION_BOUNDS,
    DEFAULT_CERTIFICATION_SIGMA,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    Bundle,
    BundleError,
    default_certification,
    library_versions,
    load_bundle,
    read_metadata,
    save_bundle,
    update_bundle_metadata,
    validate_metadata,
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

__all__ = [
    "CERTIFICATION_METHODS",
    "DEFAULT_ARCH",
    "DEFAULT_CERTIFICATION_BOUNDS",
    "DEFAULT_CERTIFICATION_SIGMA",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "ModelWeightsError",
    "Normalize",
    "PainNet",
    "create_model",
    "default_certification",
    "find_gradcam_layer",
    "library_versions",
    "load_backbone_weights",
    "load_bundle",
    "read_metadata",
    "read_state_dict",
    "save_bundle",
    "update_bundle_metadata",
    "validate_metadata",
]
