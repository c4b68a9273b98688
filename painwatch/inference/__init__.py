"""Answers for frames: the :class:`Predictor` (class, calibrated confidence, certified radius), its
settings, Grad-CAM saliency and the model card. The page (``app.py``) and the command line use only this.
"""

from painwatch.inference.model_card import (
    INTENDED_USE,
    KNOWN_LIMITS,
    SYNTHETIC_WARNING,
    model_card_dict,
    model_card_markdown,
)
from painwatch.inference.predict import (
    ABSTAIN_LABEL,
    ABSTAIN_REASONS,
    FrameResult,
    Predictor,
    frame_seed,
    random_noise_seed,
)
from painwatch.inference.saliency import gradcam
from painwatch.inference.settings import (
    PredictorSettings,
    SettingsError,
    resolve_settings,
    sequential_variant,
    sound_lipschitz_constant,
    usable_methods,
)

__all__ = [
    "ABSTAIN_LABEL",
    "ABSTAIN_REASONS",
    "INTENDED_USE",
    "KNOWN_LIMITS",
    "SYNTHETIC_WARNING",
    "FrameResult",
    "Predictor",
    "PredictorSettings",
    "SettingsError",
    "frame_seed",
    "gradcam",
    "model_card_dict",
    "model_card_markdown",
    "random_noise_seed",
    "resolve_settings",
    "sequential_variant",
    "sound_lipschitz_constant",
    "usable_methods",
]
