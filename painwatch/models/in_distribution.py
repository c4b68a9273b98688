"""The in-distribution check: does a frame look like the frames the network was trained on?

docs/design.md, "The in-distribution check". The statistic is computed on the network's own features
(no second network), from one clean forward pass:

- **Descriptors** of a frame, read by forward hooks on the backbone's stages (timm's ``feature_info``)
  while the network runs: ``"<stage>:grid<g>"`` holds the channel means over a g x g grid of cells of
  the stage's feature map (where in the picture each feature fires), ``"<stage>:moments"`` the mean and
  the standard deviation of each channel over positions (what fires, and how unevenly), ``"pooled"``
  the pooled features the head sees, ``"logits"`` the logits.
- **Per descriptor** a distance to the fit frames, on ``sign(v) log(1 + |v|)`` standardised with the
  fit frames' mean and standard deviation: ``"pca_residual"``, the squared norm of what the principal
  subspace holding ``variance`` of the fit frames' variance leaves unexplained (the low-dimensional
  structure of the training frames, as in [Wang22]); ``"mahalanobis"``, with a Ledoit-Wolf covariance
  [LW04] (the distance of [Lee18], one class); ``"knn"``, the distance from the unit vector to its
  k-th nearest fit frame [Sun22].
- **Combined** by the smallest per-descriptor p-value [Bates23]: each log-distance is turned into a z
  score ``(log d - m) / s`` with ``m, s`` the mean and standard deviation of the log-distances of
  *cross-fitted* fit frames (each fold of fit individuals scored by the statistic fitted on the other
  folds, so that the reference is out of sample like a new frame is); the score is the largest z
  (the smallest Gaussian p-value). ``"energy"`` is the baseline ``-logsumexp(logits)`` [Liu20].
- **Threshold**: split conformal [Vovk05; Lei18] on the n inner-validation frames: the
  ``ceil((n + 1)(1 - level))``-th smallest validation score. A frame scoring above it is refused.

Guarantee (:data:`GUARANTEE`): a new frame exchangeable with the validation frames is refused with
probability at most ``level`` (over the draw of the validation frames and the new frame), and at least
``level - 1 / (n + 1)`` when scores do not tie. The statistic is fitted on other frames than the
validation frames, so the guarantee needs no assumption on it. Frames of a new individual are not
exactly exchangeable with those of the validation individuals; the share of held-out individuals'
face crops refused is therefore measured (``painwatch certify``, LOIO, ``scripts/bench_ood.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from torch import nn

REFUSAL_LEVEL = 0.05
"""At most this share of frames like the validation frames is refused (the conformal level)."""

FILE_FORMAT = "painwatch-in-distribution-1"
SCORES = ("pca_residual", "mahalanobis", "knn", "energy")
"""Per-descriptor distances (``energy`` is the logit baseline, without descriptors)."""

GUARANTEE = (
    "A new frame exchangeable with the {n} inner-validation frames is refused with probability at most "
    "{level:g} (split-conformal threshold: the {k} smallest of their scores). Frames of a new "
    "individual are not exactly exchangeable with them, so the share refused on held-out individuals is "
    "measured rather than guaranteed."
)


class InDistributionError(ValueError):
    """An in-distribution check cannot be fitted, read or applied (the message says what and why)."""


# ---------------------------------------------------------------------------------- conformal threshold


def conformal_rank(num_scores: int, level: float = REFUSAL_LEVEL) -> int:
    """The rank ``k = ceil((n + 1)(1 - level))`` of the split-conformal threshold among ``n`` scores."""
    if not 0 < level < 1:
        raise InDistributionError(f"the refusal level must lie in (0, 1), got {level!r}")
    # The small tolerance keeps (n + 1)(1 - level) that is an integer in exact arithmetic from rounding up.
    return math.ceil((num_scores + 1) * (1 - level) - 1e-9)


def minimum_calibration_frames(level: float = REFUSAL_LEVEL) -> int:
    """The fewest calibration scores for which the conformal rank is at most their number (19 at 0.05)."""
    n = 1
    while conformal_rank(n, level) > n:
        n += 1
    return n


def conformal_threshold(scores: Sequence[float] | np.ndarray, level: float = REFUSAL_LEVEL) -> float:
    """The split-conformal threshold of calibration ``scores`` [Vovk05; Lei18]: their ``k``-th smallest,
    ``k = ceil((n + 1)(1 - level))``.

    Guarantee: for a new score exchangeable with the ``n`` calibration scores,
    ``P(new > threshold) <= level``; it is at least ``level - 1 / (n + 1)`` when scores do not tie.
    Raises :class:`InDistributionError` when ``n`` is too small for the level (``k > n``) or a score is
    not finite.
    """
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not np.all(np.isfinite(values)):
        raise InDistributionError("calibration scores must be finite numbers")
    rank = conformal_rank(len(values), level)
    if rank > len(values):
        raise InDistributionError(
            f"{len(values)} calibration frames are too few for a refusal level of {level:g}: at least "
            f"{minimum_calibration_frames(level)} are needed"
        )
    return float(values[rank - 1])


# ---------------------------------------------------------------------------------- descriptors


def stage_modules(model: nn.Module) -> list[tuple[str, int]]:
    """``(module name, reduction)`` of each stage of a timm backbone (``model.backbone.feature_info``);
    empty when the backbone does not describe its stages."""
    backbone = getattr(model, "backbone", model)
    info = getattr(backbone, "feature_info", None)
    stages = []
    for entry in info if isinstance(info, Sequence) else []:
        if isinstance(entry, Mapping) and entry.get("module"):
            stages.append((str(entry["module"]), int(entry.get("reduction", 0))))
    return stages


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The descriptors of the default check: a 4 x 4 grid of the stages at 1/8 and 1/16 of the input
    resolution (or the middle stage), and the moments of every stage; the pooled features when the
    backbone does not describe its stages. Measured in ``scripts/bench_ood.py``."""
    stages = stage_modules(model)
    if not stages:
        return ("pooled",)
    gridded = [name for name, reduction in stages if reduction in (8, 16)] or [stages[len(stages) // 2][0]]
    return (*(f"{name}:grid4" for name in gridded), *(f"{name}:moments" for name, _ in stages))


def _parse_layer(layer: str) -> tuple[str, str, int]:
    """``(module, kind, grid side)`` of a descriptor name."""
    if layer in ("pooled", "logits"):
        return "", layer, 0
    module, _, kind = layer.rpartition(":")
    if module and kind == "moments":
        return module, kind, 0
    if module and kind.startswith("grid") and kind[4:].isdigit() and int(kind[4:]) >= 1:
        return module, "grid", int(kind[4:])
    raise InDistributionError(
        f"unknown descriptor {layer!r}: use 'pooled', 'logits', '<stage>:moments' or '<stage>:grid<g>'"
    )


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise :class:`InDistributionError` unless every descriptor of ``layers`` can be read from
    ``model`` (its stage modules exist)."""
    backbone = getattr(model, "backbone", model)
    for layer in layers:
        module, _, _ = _parse_layer(layer)
        if module:
            try:
                backbone.get_submodule(module)
            except AttributeError as error:
                raise InDistributionError(f"descriptor {layer!r}: the network has no stage {module!r}") \
                    from error


@contextlib.contextmanager
def _recording(backbone: nn.Module, modules: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    # The hooks live only for this pass: a network with hooks is refused a Lipschitz bound.
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in modules:
            try:
                module = backbone.get_submodule(name)
            except AttributeError as error:
                raise InDistributionError(f"the backbone has no stage {name!r} to read descriptors from") \
                    from error
            handles.append(module.register_forward_hook(
                lambda _module, _inputs, output, name=name: outputs.__setitem__(name, output)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def descriptor_tensors(
    layers: Sequence[str], *, features: torch.Tensor, logits: torch.Tensor, maps: Mapping[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Each descriptor of ``layers`` ``(B, d)`` (float32 or wider), in order, from one pass's pooled
    ``features``, ``logits`` and stage feature ``maps`` (by module name): the one definition of the
    descriptors, shared by :func:`descriptor_pass` and :class:`DescribedNetwork`."""
    values = []
    for layer in layers:
        module, kind, side = _parse_layer(layer)
        if kind == "pooled":
            value = features
        elif kind == "logits":
            value = logits
        else:
            feature_map = maps[module].float()
            if feature_map.ndim != 4:
                raise InDistributionError(f"stage {module!r} gives shape {tuple(feature_map.shape)}, not "
                                          "a (B, C, h, w) feature map")
            if kind == "grid":
                value = F.adaptive_avg_pool2d(feature_map, side).flatten(1)
            else:
                value = torch.cat([feature_map.mean(dim=(2, 3)),
                                   feature_map.std(dim=(2, 3), unbiased=False)], dim=1)
        values.append(value.float() if value.dtype in (torch.float16, torch.bfloat16) else value)
    return values


def _stage_names(layers: Sequence[str]) -> list[str]:
    return sorted({module for module, _, _ in map(_parse_layer, layers) if module})


def descriptor_pass(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str]
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """One forward pass of ``model`` (a :class:`painwatch.models.PainNet`) over images ``x`` ``(B, C, H, W)``
    in [0, 1]: the logits ``(B, K)`` and each descriptor of ``layers`` as a float64 array ``(B, d)``.

    No gradients; the hooks are removed afterwards, whatever happens.
    """
    layers = tuple(layers)
    backbone = getattr(model, "backbone", model)
    with torch.no_grad(), _recording(backbone, _stage_names(layers)) as maps:
        features = model.features(x)
        logits = model.head(features)
        values = descriptor_tensors(layers, features=features, logits=logits, maps=maps)
    return logits, {layer: value.detach().to("cpu", torch.float64).numpy()
                    for layer, value in zip(layers, values, strict=True)}


class DescribedNetwork(nn.Module):
    """``model`` whose forward pass returns ``(logits, *descriptors)``: the logits and each descriptor
    of ``layers`` ``(B, d)``, in order, computed as :func:`descriptor_pass` computes them (the same
    :func:`descriptor_tensors`), in the same pass. A runtime that compiles a traced network (OpenVINO)
    compiles this one to answer and read the in-distribution check's descriptors at once
    (docs/design.md, "The in-distribution check"). The hooks live only during a forward pass."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = tuple(layers)
        check_layers(model, self.layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        backbone = getattr(self.model, "backbone", self.model)
        with _recording(backbone, _stage_names(self.layers)) as maps:
            features = self.model.features(x)
            logits = self.model.head(features)
            return (logits, *descriptor_tensors(self.layers, features=features, logits=logits, maps=maps))


# ---------------------------------------------------------------------------------- the fitted statistic


@dataclass(frozen=True, kw_only=True)
class InDistributionSpec:
    """What to fit: descriptors (``layers``), the per-descriptor distance (``score``, one of
    :data:`SCORES`), the share of variance the principal subspace keeps (``variance``) and its most
    components, the neighbour rank ``neighbours`` of ``knn``, the refusal ``level``, and the number of
    cross-fitting ``folds`` of fit individuals."""

    layers: tuple[str, ...]
    score: str = "pca_residual"
    variance: float = 0.95
    max_components: int = 256
    neighbours: int = 10
    level: float = REFUSAL_LEVEL
    folds: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.score not in SCORES:
            raise InDistributionError(f"score must be one of {list(SCORES)}, got {self.score!r}")
        if self.score != "energy" and not self.layers:
            raise InDistributionError("at least one descriptor layer is needed")
        for layer in self.layers:
            _parse_layer(layer)
        if not 0 < self.variance <= 1:
            raise InDistributionError(f"variance must lie in (0, 1], got {self.variance!r}")
        for name in ("max_components", "neighbours", "folds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InDistributionError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        conformal_rank(1, self.level)

    @property
    def name(self) -> str:
        """The score in words, e.g. ``max-z pca_residual`` (as ``model.json`` records it)."""
        return "energy" if self.score == "energy" else f"max-z {self.score}"

    @property
    def descriptors(self) -> tuple[str, ...]:
        """The descriptors a forward pass must produce."""
        return ("logits",) if self.score == "energy" else self.layers


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _signed_log(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values))


@dataclass(frozen=True)
class LayerStatistic:
    """One descriptor's fitted distance: standardisation (``centre``, ``scale``), the distance's
    parameters (``basis`` ``(k, d)`` principal directions, ``precision`` ``(d, d)`` or ``reference``
    ``(n, d)`` unit vectors), and the mean and standard deviation of the cross-fitted log-distances."""

    layer: str
    centre: np.ndarray
    scale: np.ndarray
    tensors: Mapping[str, np.ndarray]
    reference_mean: float = 0.0
    reference_std: float = 1.0

    def standardise(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.centre.shape[0]:
            raise InDistributionError(f"descriptor {self.layer!r} has shape {values.shape}; the check was "
                                      f"fitted on {self.centre.shape[0]} values per frame")
        return (_signed_log(values) - self.centre) / self.scale

    def log_distance(self, values: np.ndarray, score: str, neighbours: int) -> np.ndarray:
        """``log`` of the distance of each row of ``values`` to the fit frames."""
        z = self.standardise(values)
        if score == "pca_residual":
            basis = self.tensors["basis"]
            distance = np.sum((z - (z @ basis.T) @ basis) ** 2, axis=1)
        elif score == "mahalanobis":
            distance = np.einsum("ij,jk,ik->i", z, self.tensors["precision"], z)
        else:
            unit = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            squared = np.maximum(2.0 - 2.0 * unit @ self.tensors["reference"].T, 0.0)
            rank = min(neighbours, squared.shape[1]) - 1
            distance = np.sqrt(np.partition(squared, rank, axis=1)[:, rank])
        return np.log(np.maximum(distance, 1e-300))

    def z_score(self, values: np.ndarray, score: str, neighbours: int) -> np.ndarray:
        return (self.log_distance(values, score, neighbours) - self.reference_mean) / self.reference_std


def _fit_layer(layer: str, values: np.ndarray, spec: InDistributionSpec) -> LayerStatistic:
    logged = _signed_log(np.asarray(values, dtype=np.float64))
    centre = logged.mean(axis=0)
    spread = logged.std(axis=0)
    # A floor, so that a feature constant on the fit frames (a channel that never fires) does not divide
    # by zero: 1 % of the median spread.
    floor = max(0.01 * float(np.median(spread)), 1e-6)
    scale = np.maximum(spread, floor)
    z = (logged - centre) / scale
    if spec.score == "pca_residual":
        _, singular, directions = np.linalg.svd(z, full_matrices=False)
        share = np.cumsum(singular**2) / max(float(np.sum(singular**2)), 1e-300)
        kept = int(np.searchsorted(share, spec.variance - 1e-12) + 1)
        kept = min(kept, spec.max_components, max(len(z) - 1, 1), directions.shape[0])
        tensors = {"basis": directions[:kept]}
    elif spec.score == "mahalanobis":
        tensors = {"precision": LedoitWolf(assume_centered=True).fit(z).get_precision()}
    else:
        tensors = {"reference": z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)}
    # Rounded as the file stores them, so that a loaded check gives the scores its threshold was set on.
    rounded = {name: value.astype(np.float32).astype(np.float64) for name, value in tensors.items()}
    return LayerStatistic(layer, centre, scale, rounded)


def _cross_fitted_reference(
    values: np.ndarray, groups: np.ndarray, spec: InDistributionSpec, layer: str
) -> np.ndarray:
    individuals = sorted(set(groups.tolist()))
    folds = min(spec.folds, len(individuals))
    if folds < 2:  # one individual: no out-of-sample reference; the threshold still comes from validation
        return _fit_layer(layer, values, spec).log_distance(values, spec.score, spec.neighbours)
    fold_of = {name: index % folds for index, name in enumerate(individuals)}
    fold = np.asarray([fold_of[g] for g in groups.tolist()])
    reference = np.empty(len(values))
    for index in range(folds):
        inside = fold == index
        fitted = _fit_layer(layer, values[~inside], spec)
        reference[inside] = fitted.log_distance(values[inside], spec.score, spec.neighbours)
    return reference


@dataclass(frozen=True)
class InDistributionStatistic:
    """A fitted in-distribution check (see the module docstring): the descriptors' statistics, the
    conformal ``threshold`` of the score, and how many frames fitted (``fit_frames``) and calibrated
    (``calibration_frames``) it. A frame is refused when its score exceeds the threshold."""

    spec: InDistributionSpec
    layers: tuple[LayerStatistic, ...]
    threshold: float
    fit_frames: int
    calibration_frames: int
    validation_refused: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def guarantee(self) -> str:
        """The guarantee in words, with this check's numbers."""
        rank = conformal_rank(self.calibration_frames, self.spec.level)
        return GUARANTEE.format(n=self.calibration_frames, level=self.spec.level, k=_ordinal(rank))

    def scores(self, descriptors: Mapping[str, np.ndarray]) -> np.ndarray:
        """The score of each frame (larger: less like the training frames) from the descriptors of
        :func:`descriptor_pass`; a descriptor that is missing raises :class:`InDistributionError`."""
        missing = [layer for layer in self.spec.descriptors if layer not in descriptors]
        if missing:
            raise InDistributionError(f"descriptors {missing} are missing")
        if self.spec.score == "energy":
            logits = np.asarray(descriptors["logits"], dtype=np.float64)
            top = logits.max(axis=1)
            return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))
        z = np.stack([layer.z_score(descriptors[layer.layer], self.spec.score, self.spec.neighbours)
                      for layer in self.layers], axis=1)
        # A non-finite score (e.g. overflow on an absurd frame) is as far from the training frames as it gets.
        return np.nan_to_num(z.max(axis=1), nan=np.inf, posinf=np.inf)

    def refuses(self, scores: np.ndarray) -> np.ndarray:
        """Boolean per frame: is its score above the threshold?"""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    # ------------------------------------------------------------------------------ safetensors

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and the string metadata of the ``in_distribution.safetensors`` file."""
        tensors: dict[str, torch.Tensor] = {"threshold": torch.tensor([self.threshold], dtype=torch.float64)}
        for index, layer in enumerate(self.layers):
            prefix = f"layers.{index}."
            tensors[prefix + "centre"] = torch.from_numpy(np.ascontiguousarray(layer.centre))
            tensors[prefix + "scale"] = torch.from_numpy(np.ascontiguousarray(layer.scale))
            tensors[prefix + "reference_moments"] = torch.tensor([layer.reference_mean, layer.reference_std],
                                                                 dtype=torch.float64)
            for name, value in layer.tensors.items():
                # float32 halves the file; the distances are computed in float64 from it.
                tensors[prefix + name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        metadata = {
            "format": FILE_FORMAT,
            "spec": json.dumps(dataclasses.asdict(self.spec), sort_keys=True),
            "layers": json.dumps([layer.layer for layer in self.layers]),
            "fit_frames": str(self.fit_frames),
            "calibration_frames": str(self.calibration_frames),
            "validation_refused": str(self.validation_refused),
            **self.extra,
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                     source: str = "in_distribution.safetensors") -> InDistributionStatistic:
        """Read what :meth:`to_tensors` wrote; raises :class:`InDistributionError` naming ``source`` and
        the entry that is missing or malformed."""
        if metadata.get("format") != FILE_FORMAT:
            raise InDistributionError(f"{source}: format {metadata.get('format')!r} is not {FILE_FORMAT!r}")
        try:
            spec_fields = json.loads(metadata["spec"])
            spec = InDistributionSpec(**{**spec_fields, "layers": tuple(spec_fields["layers"])})
            names = json.loads(metadata["layers"])
            counts = {key: int(metadata[key]) for key in ("fit_frames", "calibration_frames",
                                                          "validation_refused")}
            threshold = float(tensors["threshold"].double().item())
            layers = []
            wanted = {"pca_residual": "basis", "mahalanobis": "precision", "knn": "reference"}.get(spec.score)
            for index, name in enumerate(names):
                prefix = f"layers.{index}."
                moments = tensors[prefix + "reference_moments"].double().numpy()
                parameters = {wanted: tensors[prefix + wanted].double().numpy()} if wanted else {}
                layers.append(LayerStatistic(name, tensors[prefix + "centre"].double().numpy(),
                                             tensors[prefix + "scale"].double().numpy(), parameters,
                                             float(moments[0]), float(moments[1])))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as error:
            raise InDistributionError(f"{source}: malformed in-distribution check ({error!r})") from error
        if tuple(names) != (spec.layers if spec.score != "energy" else ()):
            raise InDistributionError(f"{source}: layers {names} do not match its spec {list(spec.layers)}")
        if not math.isfinite(threshold):
            raise InDistributionError(f"{source}: the threshold {threshold!r} is not a finite number")
        extra = {k: v for k, v in metadata.items()
                 if k not in ("format", "spec", "layers", "fit_frames", "calibration_frames",
                              "validation_refused")}
        return cls(spec, tuple(layers), threshold, extra=extra, **counts)


def fit_in_distribution(
    fit: Mapping[str, np.ndarray],
    fit_groups: Sequence[str],
    validation: Mapping[str, np.ndarray],
    *,
    spec: InDistributionSpec,
) -> InDistributionStatistic:
    """Fit the check's statistics on the descriptors of the fit frames (``fit``, one array ``(n, d)``
    per layer; ``fit_groups`` the individual of each row) and set its threshold on the validation
    frames' descriptors (:func:`conformal_threshold` at ``spec.level``).

    The validation frames are used for the threshold only, so the conformal guarantee holds whatever
    the fit. Raises :class:`InDistributionError` naming the problem (too few frames, a missing layer,
    mismatching row counts).
    """
    groups = np.asarray([str(g) for g in fit_groups])
    for name, frames in (("fit", fit), ("validation", validation)):
        missing = [layer for layer in spec.descriptors if layer not in frames]
        if missing:
            raise InDistributionError(f"{name} descriptors {missing} are missing")
    num_fit = len(groups)
    if spec.score != "energy":
        if num_fit < 2:
            raise InDistributionError(f"{num_fit} fit frames are too few to fit an in-distribution check")
        bad = [layer for layer in spec.layers if len(fit[layer]) != num_fit]
        if bad:
            raise InDistributionError(f"fit descriptors {bad} do not have one row per fit frame ({num_fit})")
    layers = []
    if spec.score != "energy":
        for layer in spec.layers:
            values = np.asarray(fit[layer], dtype=np.float64)
            reference = _cross_fitted_reference(values, groups, spec, layer)
            fitted = _fit_layer(layer, values, spec)
            spread = float(np.std(reference))
            layers.append(LayerStatistic(layer, fitted.centre, fitted.scale, fitted.tensors,
                                         float(np.mean(reference)), max(spread, 1e-6)))
    statistic = InDistributionStatistic(spec, tuple(layers), math.inf, num_fit, 0)
    calibration = statistic.scores(validation)
    threshold = conformal_threshold(calibration, spec.level)
    return InDistributionStatistic(spec, tuple(layers), threshold, num_fit, len(calibration),
                                   validation_refused=int(np.sum(calibration > threshold)))
