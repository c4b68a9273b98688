"""painwatch: pain detection in Japanese macaques from facial frames, with certified robustness.

Subpackages:
- ``painwatch.robust``: the model-agnostic certification core (imports nothing of the project).
- ``painwatch.data``: frames, manifests, validation, transforms, video sampling, the synthetic demo set.
- ``painwatch.models``: timm backbones with normalisation inside, and model bundles.
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("no_pain", "pain")
"""Class order of the clinical task: ``no_pain`` = 0, ``pain`` = 1."""
