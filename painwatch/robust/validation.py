"""Input checks shared by every certificate, sampler and attack in :mod:`painwatch.robust`.

Each check either returns the value in a normalised form (a Python ``float`` / ``int``, the same tensor)
or raises ``TypeError`` (wrong kind of object) / ``ValueError`` (right kind, wrong value) with a message
that names the argument and the offending value, so a caller can tell at once what to fix.

Conventions checked here (docs/design.md, "Units and conventions"): one image is a float tensor ``(C, H, W)``
with pixels in ``[0, 1]``; a batch is ``(B, C, H, W)``; a model maps a batch to logits ``(B, K)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Model",
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
]

Model = Callable[[torch.Tensor], torch.Tensor]
"""A classifier: float batch ``(B, C, H, W)`` with pixels in [0, 1] -> logits ``(B, K)``."""


def _describe(value: object) -> str:
    """Short ``repr`` for error messages (tensors are summarised, not printed in full)."""
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_pixels(x: torch.Tensor, name: str) -> None:
    """Float dtype, finite, every pixel in [0, 1]; the messages name the first problem found."""
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor with pixels in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = []
        if bool(torch.isnan(x).any()):
            kinds.append("NaN")
        if bool(torch.isinf(x).any()):
            kinds.append("inf")
        raise ValueError(f"{name} contains {bad} non-finite value(s) ({' and '.join(kinds)})")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} must have pixels in [0, 1] (normalisation belongs inside the model), "
            f"got values in [{low:.6g}, {high:.6g}]"
        )


def check_image(x: object, name: str = "x") -> torch.Tensor:
    """Check one image: a floating tensor of shape ``(C, H, W)``, finite, pixels in ``[0, 1]``.

    Returns ``x`` unchanged. Raises ``TypeError`` for a non-tensor or an integer dtype (uint8 images
    must be converted to [0, 1] floats first) and ``ValueError`` for a wrong shape, NaN/inf, or pixels
    outside ``[0, 1]``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (C, H, W), got {type(x).__name__}")
    if x.ndim != 3:
        hint = " (pass one image, not a batch)" if x.ndim == 4 else ""
        raise ValueError(f"{name} must have shape (C, H, W), got shape {tuple(x.shape)}{hint}")
    _check_pixels(x, name)
    return x


def check_batch(x: object, name: str = "x") -> torch.Tensor:
    """Check a batch of images: a floating tensor ``(B, C, H, W)``, ``B >= 1``, finite, in ``[0, 1]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    _check_pixels(x, name)
    return x


def _real_number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
            return float(value)
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    return float(value)


def check_sigma(sigma: object, name: str = "sigma") -> float:
    """Check a noise level: a finite real number ``> 0`` (L2 units of the [0, 1] pixel space)."""
    value = _real_number(sigma, name)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0 (Gaussian noise std in [0, 1] pixel units), "
                         f"got {value!r}")
    return value


def check_alpha(alpha: object, name: str = "alpha") -> float:
    """Check a failure probability: a real number strictly between 0 and 1."""
    value = _real_number(alpha, name)
    if not (0.0 < value < 1.0):
        raise ValueError(f"{name} must be strictly between 0 and 1 (a failure probability), got {value!r}")
    return value


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """Check an integer count (sample size, batch size, steps): an ``int`` ``>= minimum``.

    Integral numpy / torch integers are accepted; floats and booleans are refused with a ``TypeError``
    (``n=1e5`` must be written ``n=100_000``: a silent rounding of a sample size would change a
    certificate's meaning).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    count = int(value)
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return count


def check_lipschitz_constant(value: object, name: str = "lipschitz_constant") -> float:
    """Check an L2 Lipschitz constant: a finite real number ``> 0``."""
    constant = _real_number(value, name)
    if not math.isfinite(constant) or constant <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0 (a sound upper bound of the L2 Lipschitz "
                         f"constant of the logit map), got {constant!r}")
    return constant


def check_num_classes(value: object, name: str = "num_classes") -> int:
    """Check a number of classes: an integer ``>= 2``."""
    return check_count(value, name, minimum=2)


def check_model(model: object, name: str = "model") -> Model:
    """Check that ``model`` is callable (an ``nn.Module`` or any function of a batch)."""
    if not callable(model):
        raise TypeError(
            f"{name} must be callable (batch (B, C, H, W) -> logits (B, K)), got {_describe(model)}"
        )
    return model  # type: ignore[return-value]


def check_generator(generator: object, name: str = "generator") -> torch.Generator | None:
    """Check that ``generator`` is ``None`` or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {_describe(generator)}")
    return generator


def check_input_shape(input_shape: Sequence[int], name: str = "input_shape") -> tuple[int, ...]:
    """Check the shape of one sample (no batch dimension), e.g. ``(C, H, W)``: positive ints.

    Returns it as a tuple of Python ints (a ``torch.Size`` or a list are accepted).
    """
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) == 0:
        raise ValueError(
            f"{name} must be a non-empty tuple of positive ints like (C, H, W), got {input_shape!r}"
        )
    for size in input_shape:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must contain positive ints, got {tuple(input_shape)!r}")
    return tuple(int(size) for size in input_shape)


def check_logits(
    logits: object, batch: int, *, num_classes: int | None = None, name: str = "model output"
) -> torch.Tensor:
    """Check what a model returned for a batch of ``batch`` images: finite logits of shape ``(batch, K)``.

    ``K`` must be ``num_classes`` when given, and at least 2 otherwise (a margin needs a runner-up).
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits (B, K), got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[0] != batch:
        raise ValueError(f"{name} must have shape (B, K) = ({batch}, K) for a batch of {batch} image(s), "
                         f"got shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"{name} has {logits.shape[1]} logits per image but num_classes is {num_classes}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes (a margin needs a runner-up), "
                         f"got shape {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise TypeError(f"{name} must be floating-point logits, got dtype {logits.dtype}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{name} contains non-finite logits (NaN or inf)")
    return logits


def check_same_device(model: object, x: torch.Tensor, name: str = "x") -> None:
    """For an ``nn.Module`` with parameters or buffers, check that ``x`` is on the same device.

    Catches the mix-up early with a message that says how to fix it, instead of a deep torch error.
    """
    if not isinstance(model, torch.nn.Module):
        return
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {x.device} but the model's weights are on {tensor.device}; "
                             f"move one of them (e.g. {name}.to({str(tensor.device)!r}))")
        return


def check_labels(
    labels: object, *, batch: int, num_classes: int | None = None, name: str = "labels"
) -> torch.Tensor:
    """Integer class labels as a LongTensor of shape ``(batch,)``, each in ``[0, num_classes)`` when given.

    Accepts tensors and anything ``torch.as_tensor`` takes; floats and booleans are refused (a label is
    a class index). The message names the shape or the first label out of range.
    """
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    not_integer = labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex()
    if labels.shape != (batch,) or not_integer:
        raise ValueError(f"{name} must be an integer tensor of shape ({batch},), got {labels.dtype} "
                         f"of shape {tuple(labels.shape)}")
    if labels.numel() and num_classes is not None:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} must be in [0, {num_classes}): label {bad} is outside "
                             f"[0, {num_classes}) for {num_classes} classes")
    return labels.to(torch.long)
