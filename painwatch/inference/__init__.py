"""Answers for frames: the :class:`Predictor` (class, calibrated confidence, certified radius), its
settings, Grad-CAM saliency and the model card; bulk prediction over folders, manifests and clips, on
one machine or a Ray cluster. The page (``app.py``) and the command line use only this.

The public names below are loaded on first use (PEP 562), so that the command line, which reads the
settings of bulk runs (:mod:`painwatch.inference.bulk_settings`) to build its options, does not pay for
importing torch; the ``TYPE_CHECKING`` block below names every module they come from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from painwatch.lazy import lazy_attributes

_EXPORTS: dict[str, str] = {
    "INTENDED_USE": "painwatch.inference.model_card",
    "KNOWN_LIMITS": "painwatch.inference.model_card",
    "SYNTHETIC_WARNING": "painwatch.inference.model_card",
    "model_card_dict": "painwatch.inference.model_card",
    "model_card_markdown": "painwatch.inference.model_card",
    "ABSTAIN_LABEL": "painwatch.inference.predict",
    "ABSTAIN_REASONS": "painwatch.inference.predict",
    "FrameResult": "painwatch.inference.predict",
    "Predictor": "painwatch.inference.predict",
    "frame_seed": "painwatch.inference.predict",
    "random_noise_seed": "painwatch.inference.predict",
    "gradcam": "painwatch.inference.saliency",
    "PredictorSettings": "painwatch.inference.settings",
    "SettingsError": "painwatch.inference.settings",
    "resolve_settings": "painwatch.inference.settings",
    "sequential_variant": "painwatch.inference.settings",
    "sound_lipschitz_constant": "painwatch.inference.settings",
    "usable_methods": "painwatch.inference.settings",
}

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


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, namespace=globals(), public=__all__)


if TYPE_CHECKING:  # static checkers and IDEs see the real names
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
