"""Shared pieces of the records tests: answers shaped like the Predictor's (without a model, for the
database tests), the model record, a frame type, and a writer process for the crash and concurrency tests.

``python tests/records_fixtures.py URL MODE COUNT`` saves checks into the records at URL:
``hold`` saves one check of a new animal and, with the check flushed but not committed, prints FLUSHED
and waits to be killed; ``loop`` saves checks of animal LOOP one after the other, printing SAVED <i>
after each commit, until COUNT are saved.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from painwatch.inference import ABSTAIN_REASONS, FrameResult
from painwatch.records.service import ModelUsed

CLASSES = ("no_pain", "pain")


@dataclass(frozen=True)
class StillFrame:
    """A frame as the page holds it (name, file, time in a clip, RGB image)."""

    name: str
    source: str
    time_s: float | None
    image: np.ndarray


def fake_batch(count: int, *, seed: int = 0, abstain: tuple[int, ...] = (), pain: tuple[int, ...] = (),
               size: int = 48) -> tuple[list[StillFrame], list[FrameResult]]:
    """``count`` frames and answers shaped like the Predictor's: frames in ``pain`` answered pain, those in
    ``abstain`` refused, the others no_pain; radii, seeds and probabilities vary with ``seed``."""
    rng = np.random.default_rng(seed)
    frames, results = [], []
    for index in range(count):
        name = f"frame-{seed}-{index}.png"
        image = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
        p_pain = float(rng.uniform(0.55, 0.95)) if index in pain else float(rng.uniform(0.05, 0.45))
        refused = index in abstain
        label_index = -1 if refused else int(index in pain)
        radius = 0.0 if refused else float(rng.uniform(0.0, 0.4))
        confidence = max(p_pain, 1 - p_pain)
        results.append(FrameResult(
            name=name, label="abstain" if refused else CLASSES[label_index], class_index=label_index,
            confidence=confidence, probabilities={"no_pain": 1 - p_pain, "pain": p_pain}, radius=radius,
            radius_rms=radius / math.sqrt(3 * 32 * 32),
            radius_grey_levels=255 * radius / math.sqrt(3 * 32 * 32),
            method="randomized_smoothing", sigma=0.25, n=100, alpha=0.01, forward_passes=117,
            bound=math.nan if refused else float(rng.uniform(0.5, 1.0)), classifier="the vote classifier",
            noise_seed=int(rng.integers(0, 2**63 - 1)),
            abstain_code="unclear_under_noise" if refused else None,
            abstain_reason=ABSTAIN_REASONS["unclear_under_noise"] if refused else None,
        ))
        frames.append(StillFrame(name, name, None, image))
    return frames, results


def fake_model(*, gate_passed: bool | None = None, synthetic: bool = False) -> ModelUsed:
    """The record of a model: a made-up bundle with a model card (gate verdicts when ``gate_passed``)."""
    gates = {} if gate_passed is None else {"default.toml": {
        "passed": gate_passed, "date": "2026-11-25T13:54:17+00:00",
        "results": [{"name": "min_accuracy", "detail": "accuracy (point estimate) >= 0.6",
                     "passed": gate_passed, "threshold": 0.6, "value": 0.7 if gate_passed else 0.4}]}}
    card = {"intended_use": "Supports, and never replaces, a veterinarian's judgement.",
            "training_data": {"synthetic": synthetic}, "gates": gates, "limits": ["Single frames only."]}
    return ModelUsed("bundles/test", "ab" * 32, "test_resnet", CLASSES,
                     {"method": "randomized_smoothing", "sigma": 0.25, "alpha": 0.01, "n": 100}, None,
                     gate_passed, card)


def _write(url: str, mode: str, count: int) -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    from painwatch.records.database import open_database
    from painwatch.records.service import save_check

    database = open_database(url)
    if mode == "hold":
        def hold(session: Session, context: object) -> None:
            print("FLUSHED", flush=True)
            time.sleep(600)

        event.listen(Session, "after_flush", hold)
        frames, results = fake_batch(count, seed=1)
        save_check(database, frames, results, model=fake_model(), animal="HELD", create_animal=True)
        return
    for index in range(count):
        frames, results = fake_batch(3 + index % 5, seed=index)
        save_check(database, frames, results, model=fake_model(), animal="LOOP", create_animal=True,
                   notes=f"check {index}")
        print(f"SAVED {index}", flush=True)


if __name__ == "__main__":
    _write(sys.argv[1], sys.argv[2], int(sys.argv[3]))
