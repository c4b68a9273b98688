"""Certification gates: the thresholds a bundle must meet before deployment, and their verdicts.

A gate file is TOML (the packaged ``gates/default.toml`` and ``gates/strict.toml`` are examples)::

    min_accuracy = 0.6
    min_pain_recall = 0.6
    max_ece = 0.15
    max_abstention = 0.3
    use_lower_confidence_bound = false
    [[min_certified_accuracy]]
    grey_levels = 0.5      # or: radius = 0.25  (L2 in [0, 1] pixels at the model's input size)
    value = 0.5

:func:`load_gate` checks it (every error names the file, the key and the value); :func:`evaluate_gate`
judges measured quantities against it, one record per check.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from painwatch.robust import certified_accuracy_at

GATES_DIR = Path(__file__).resolve().parent / "gates"
DEFAULT_GATE = GATES_DIR / "default.toml"
"""The gate used when none is given (shipped with the package)."""


class UsageError(ValueError):
    """A problem with what the user gave (paths, gate file, settings): exit code 2."""


_SCALAR_THRESHOLDS: dict[str, tuple[str, str]] = {
    # gate key: (measured quantity, direction)
    "min_accuracy": ("accuracy", "min"),
    "min_pain_recall": ("pain_recall", "min"),
    "min_pain_precision": ("pain_precision", "min"),
    "min_balanced_accuracy": ("balanced_accuracy", "min"),
    "max_ece": ("ece", "max"),
    "max_abstention": ("abstention_rate", "max"),
}
_LIST_THRESHOLDS = ("min_certified_accuracy",)
_GATE_OPTIONS = ("use_lower_confidence_bound",)


@dataclass(frozen=True)
class Gate:
    """Thresholds of a gate file.

    ``scalars`` maps gate keys (``min_accuracy``, ``min_pain_recall``, ``min_pain_precision``,
    ``min_balanced_accuracy``, ``max_ece``, ``max_abstention``) to fractions in [0, 1];
    ``certified`` lists ``(radius_l2 or None, grey_levels or None, value)`` requirements of certified
    accuracy; with ``use_lower_confidence_bound`` the accuracy-type checks compare the lower end of the
    95% bootstrap interval (upper end for ``max_*``) instead of the point estimate.
    """

    path: Path
    scalars: dict[str, float]
    certified: list[dict[str, float]] = field(default_factory=list)
    use_lower_confidence_bound: bool = False

    def certified_radii(self, input_numel: int) -> list[float]:
        """The L2 radii (in [0, 1] pixel units) of the certified-accuracy checks, for a model input of
        ``input_numel = C * H * W`` values (a check given in grey levels ``g`` is at
        ``g / 255 * sqrt(input_numel)``)."""
        return [entry["radius"] if entry.get("radius") is not None
                else entry["grey_levels"] / 255.0 * math.sqrt(input_numel) for entry in self.certified]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            **self.scalars,
            "min_certified_accuracy": list(self.certified),
            "use_lower_confidence_bound": self.use_lower_confidence_bound,
        }


def _fraction(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UsageError(f"gate file {path}: {key} must be a number in [0, 1], got {value!r}")
    return float(value)


def load_gate(path: str | Path) -> Gate:
    """Read and check a gate TOML file in the format of this module's docstring (every key optional, at
    least one threshold). Raises :class:`UsageError` naming the file, key and value."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"gate file {path} does not exist")
    try:
        content = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"gate file {path} is not valid TOML: {error}") from error
    content = content.get("gate", content) if isinstance(content.get("gate"), Mapping) else content
    known = set(_SCALAR_THRESHOLDS) | set(_LIST_THRESHOLDS) | set(_GATE_OPTIONS)
    unknown = sorted(set(content) - known)
    if unknown:
        raise UsageError(
            f"gate file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    scalars = {key: _fraction(path, key, content[key]) for key in _SCALAR_THRESHOLDS if key in content}
    certified = []
    entries = content.get("min_certified_accuracy", [])
    if isinstance(entries, Mapping):
        entries = [entries]
    if not isinstance(entries, list):
        raise UsageError(
            f"gate file {path}: min_certified_accuracy must be a table or an array of tables "
            f"with radius (or grey_levels) and value, got {entries!r}"
        )
    for index, entry in enumerate(entries):
        where = f"min_certified_accuracy[{index}]"
        one_size = isinstance(entry, Mapping) and (("radius" in entry) != ("grey_levels" in entry))
        if not one_size or "value" not in entry:
            raise UsageError(
                f"gate file {path}: {where} needs value and exactly one of radius (L2) or "
                f"grey_levels, got {entry!r}"
            )
        extra = sorted(set(entry) - {"radius", "grey_levels", "value"})
        if extra:
            raise UsageError(f"gate file {path}: {where} has unknown key(s) {', '.join(extra)}")
        size_key = "radius" if "radius" in entry else "grey_levels"
        size = entry[size_key]
        if (
            isinstance(size, bool)
            or not isinstance(size, (int, float))
            or not (math.isfinite(size) and size >= 0)
        ):
            raise UsageError(f"gate file {path}: {where}.{size_key} must be a number >= 0, got {size!r}")
        certified.append({size_key: float(size), "value": _fraction(path, f"{where}.value", entry["value"])})
    option = content.get("use_lower_confidence_bound", False)
    if not isinstance(option, bool):
        raise UsageError(
            f"gate file {path}: use_lower_confidence_bound must be true or false, got {option!r}"
        )
    if not scalars and not certified:
        raise UsageError(f"gate file {path} sets no threshold; known keys: {', '.join(sorted(known))}")
    return Gate(path=path, scalars=scalars, certified=certified, use_lower_confidence_bound=option)


def evaluate_gate(gate: Gate, measured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check every threshold against ``measured``.

    ``measured`` maps each quantity (``accuracy``, ``pain_recall``, ``pain_precision``,
    ``balanced_accuracy``, ``abstention_rate``, ``ece``) to ``{estimate, low, high}``, and holds
    ``main_certified`` (``(correct, radius)`` per frame, abstentions not correct), ``main_method`` and
    ``input_numel`` (``C * H * W`` of the model input, to turn grey levels into an L2 radius).

    Returns one record per check: ``{name, value, threshold, passed, detail}``. A quantity that could
    not be measured (e.g. pain precision with no frame predicted pain) fails its check.
    """
    results = []
    for key, threshold in gate.scalars.items():
        quantity, direction = _SCALAR_THRESHOLDS[key]
        entry = measured[quantity]
        value = entry["estimate"]
        compared, basis = value, "point estimate"
        if gate.use_lower_confidence_bound and entry.get("low") is not None:
            compared = entry["low"] if direction == "min" else entry["high"]
            basis = "95% bootstrap " + ("lower" if direction == "min" else "upper") + " bound"
        ok = compared is not None and (compared >= threshold if direction == "min" else compared <= threshold)
        results.append(
            {
                "name": key,
                "value": compared,
                "threshold": threshold,
                "passed": bool(ok),
                "detail": f"{quantity} ({basis}) {'>=' if direction == 'min' else '<='} {threshold:g}",
            }
        )
    input_numel = measured["input_numel"]
    for entry, radius in zip(gate.certified, gate.certified_radii(input_numel), strict=True):
        correct, radii = _correct_and_radii(measured["main_certified"])
        value = certified_accuracy_at(correct, radii, radius)
        size = (
            f"radius {radius:.4g} L2"
            if "radius" in entry
            else f"{entry['grey_levels']:g} grey levels (L2 {radius:.4g})"
        )
        results.append(
            {
                "name": "min_certified_accuracy",
                "value": value,
                "threshold": entry["value"],
                "passed": bool(value >= entry["value"]),
                "detail": f"certified accuracy of {measured['main_method']} at {size} >= {entry['value']:g}",
            }
        )
    return results


def _correct_and_radii(records: Sequence[tuple[bool, float]]) -> tuple[list[bool], list[float]]:
    """Split ``(correct, radius)`` records (correct is False for abstentions) into two lists."""
    return [bool(correct) for correct, _ in records], [float(radius) for _, radius in records]
