"""Certified accuracy of a LOIO fold trained with a Lipschitz network: one forward pass per frame.

A fold of a Lipschitz architecture (``--arch lip-...``) is certified by the Lipschitz margin
[Tsuzuku18] (docs/design.md, "The certificates", item 1): with ``L`` the sound bound of the fold's
network (:func:`painwatch.robust.lipschitz_upper_bound`, computed from its saved weights) and the test
logits the fold already computed (float32, eval mode: the forward pass a certificate takes), each
left-out frame gets ``r = M_f(x) / (sqrt(2) L)`` with no further pass, no noise and no alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from painwatch.evaluation.gate import DEFAULT_GATE, load_gate
from painwatch.models import load_bundle
from painwatch.robust import certified_accuracy_at, lipschitz_upper_bound, logit_margin


def fold_lipschitz_certificates(
    checkpoint: str | Path, test_logits: np.ndarray, test_labels: np.ndarray
) -> dict[str, Any]:
    """The Lipschitz-margin certificates of a fold's left-out frames.

    ``checkpoint`` is the fold's bundle folder; ``test_logits`` ``(N, K)`` its logits of the left-out
    frames and ``test_labels`` ``(N,)`` their labels. Returns ``lipschitz_constant`` (L), ``radii`` (L2,
    [0, 1] pixel units at the model's input size, one per frame, of the predicted class),
    ``gate_radii`` (the default gate's certified-accuracy radii) and ``certified_accuracy`` (the
    fraction of frames predicted correctly with a radius at least each gate radius, keyed by the radius
    printed with 4 significant digits), and ``forward_passes_per_frame`` (1).
    """
    bundle = load_bundle(checkpoint)
    shape = bundle.metadata.input_shape
    constant = lipschitz_upper_bound(bundle.model, shape)
    prediction, margin = logit_margin(torch.as_tensor(np.asarray(test_logits, dtype=np.float64)))
    radii = (margin / (math.sqrt(2.0) * constant)).numpy()
    correct = prediction.numpy() == np.asarray(test_labels)
    gate_radii = load_gate(DEFAULT_GATE).certified_radii(math.prod(shape))
    return {
        "lipschitz_constant": constant,
        "radii": radii.tolist(),
        "gate_radii": gate_radii,
        "certified_accuracy": {f"{r:.4g}": certified_accuracy_at(correct, radii, r) for r in gate_radii},
        "forward_passes_per_frame": 1,
    }


def pooled_certified_accuracy(
    results: Sequence[dict[str, Any]], labels: np.ndarray
) -> dict[str, float] | None:
    """Certified accuracy over every frame of the folds that carry Lipschitz certificates, at the gate
    radii (None when no fold does). ``labels`` are all frames' labels, indexed by ``test_indices``."""
    certified = [r for r in results if r.get("lipschitz")]
    if not certified:
        return None
    correct, radii = [], []
    for result in certified:
        predictions = np.argmax(np.asarray(result["test_logits"]), axis=1)
        correct += (predictions == labels[np.asarray(result["test_indices"])]).tolist()
        radii += result["lipschitz"]["radii"]
    gate_radii = certified[0]["lipschitz"]["gate_radii"]
    return {f"{r:.4g}": certified_accuracy_at(correct, radii, r) for r in gate_radii}
