"""Grad-CAM [Selvaraju17] saliency of the network for one frame, on its last convolutional stage."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from painwatch.data import centre_square


def gradcam(
    model: torch.nn.Module, x: torch.Tensor, *, frame_shape: tuple[int, int], class_index: int | None = None
) -> np.ndarray:
    """Grad-CAM of ``model`` (which has a ``gradcam_layer``) on one preprocessed frame ``x`` ``(C, H, W)``.

    ``class_index`` defaults to the network's top class on the clean frame. The map is computed at the
    model's input size and placed back on the centre square of a frame of ``frame_shape`` (height,
    width): the region the evaluation transform keeps; the rest is 0. Returns an ``H x W`` float32 map
    in [0, 1]; a map that is zero everywhere means no positive evidence was found.
    """
    device = next(model.parameters()).device
    batch = x.unsqueeze(0).to(device).requires_grad_(True)
    captured: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["activation"] = output

    handle = model.gradcam_layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(batch)
            target = int(logits.argmax(dim=1)) if class_index is None else int(class_index)
            if not 0 <= target < logits.shape[1]:
                raise ValueError(f"class_index must be in [0, {logits.shape[1] - 1}], got {class_index}")
            logits[0, target].backward()
    finally:
        handle.remove()
    activation = captured["activation"]
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    height, width = frame_shape
    top, left, side = centre_square(height, width)
    cam = torch.nn.functional.interpolate(cam, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else torch.zeros_like(cam)
    full = np.zeros((height, width), dtype=np.float32)
    full[top : top + side, left : left + side] = cam.cpu().numpy().clip(0.0, 1.0)
    return full
