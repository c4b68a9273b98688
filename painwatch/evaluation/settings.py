"""The settings of a LOIO run and of a certification: dataclasses whose fields declare their options.

:class:`LoioSettings` *contains* the :class:`~painwatch.training.config.TrainConfig` every fold trains
with (it never mirrors its fields); :class:`CertifySettings` holds what ``painwatch certify`` measures
with. Both validate on construction, naming the field and the bad value. Units: noise levels are L2
norms per pixel in [0, 1] pixel space at the model's input size (docs/design.md, "Units and
conventions").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from painwatch.settings import setting
from painwatch.training.config import TrainConfig
from painwatch.validation import check_integer, check_number

#: LoioSettings fields and TrainConfig fields that may change between a run and its ``--resume``: they
#: do not change what a fold computes (the device can change float rounding only; the bootstrap and
#: the bins change the pooled summary only; the others change speed only).
RESUME_FREE_SETTINGS = frozenset(
    {"device", "max_folds", "progress", "num_workers", "bootstrap_reps", "num_bins", "eval_batch_size",
     "channels_last"}
)


@dataclass
class LoioSettings:
    """Everything that defines a LOIO run; saved in the run's ``config.json`` and checked on ``--resume``.

    ``train`` is the training configuration of every fold; fold ``k`` trains with
    ``fold_seed(train.seed, k)`` (:func:`painwatch.data.fold_seed`). With ``cache_features`` the
    backbone is frozen and only a linear head is trained on cached features (``train.head_epochs``,
    ``train.head_l2``, ``label_smoothing``, ``class_balance``, ``monitor`` and ``patience`` apply); the
    loss must then be cross-entropy and the noise 0 (pixel noise cannot be applied to cached features).
    """

    data: str = setting(positional=True, help="data folder or manifest CSV")
    out: str = setting(required=True, metavar="RUN", help="run folder (created; must be new or --resume)")
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_features: bool = setting(
        False,
        help="freeze the backbone: extract features once, train only the linear head in every fold "
        "(needs --loss ce and --noise-sigma 0)",
    )
    inner_val_individuals: int | None = setting(
        None, exclusive="inner_validation",
        help="number of training individuals held out for validation in each fold",
    )
    inner_val_fraction: float = setting(
        0.2, exclusive="inner_validation",
        help="fraction of training individuals held out for validation (rounded up)",
    )
    bootstrap_reps: int = setting(1000, help="cluster-bootstrap replicates for the 95%% intervals")
    num_bins: int = setting(15, help="confidence bins of the ECE and the reliability diagram", cli=False)
    max_folds: int | None = setting(
        None, help="run at most this many unfinished folds now, then stop (continue later with --resume)"
    )
    progress: bool = setting(True, negated_by="--quiet", help="no progress bars")

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        self.validate()

    def validate(self) -> LoioSettings:
        """Check the LOIO settings (the training ones are checked by ``TrainConfig``)."""
        if not isinstance(self.train, TrainConfig):
            raise ValueError(f"LoioSettings.train must be a TrainConfig, got {type(self.train).__name__}")
        self.train.validate()
        if self.max_folds is not None:
            check_integer(self.max_folds, "LoioSettings.max_folds (None: every fold)", minimum=1)
        check_integer(self.bootstrap_reps, "LoioSettings.bootstrap_reps", minimum=1)
        check_integer(self.num_bins, "LoioSettings.num_bins", minimum=1)
        if self.inner_val_individuals is not None:
            check_integer(self.inner_val_individuals, "LoioSettings.inner_val_individuals", minimum=1)
        check_number(self.inner_val_fraction, "LoioSettings.inner_val_fraction", minimum=0.0, maximum=1.0,
                     exclusive_minimum=True, exclusive_maximum=True)
        if self.cache_features and (self.train.loss != "ce" or self.train.noise_sigma > 0):
            raise ValueError(
                f"--cache-features trains a head on fixed features, where pixel noise cannot be applied: "
                f"it needs --loss ce and --noise-sigma 0 (got loss={self.train.loss!r}, "
                f"noise_sigma={self.train.noise_sigma})"
            )
        return self

    def fold_config(self, seed: int, device: str | None = None) -> TrainConfig:
        """The :class:`TrainConfig` of a fold trained with ``seed`` (on ``device`` when given)."""
        return dataclasses.replace(self.train, seed=int(seed), device=device or self.train.device)

    def checked(self) -> dict[str, Any]:
        """The settings that must match for ``--resume``: every LOIO and training setting that can change
        a fold, in one flat mapping (the form ``config.json`` has always had)."""
        values = {**self.train.to_dict(), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                             if f.name not in ("train", "data", "out")}}
        return {key: value for key, value in values.items() if key not in RESUME_FREE_SETTINGS}


def saved_settings_as_checked(saved: dict[str, Any]) -> dict[str, Any]:
    """The checked settings a saved ``config.json`` stands for, in today's form.

    Runs saved by older versions name the backbone weights ``weights`` and lack the training settings
    that had no option then; such a run was trained with that setting's default, so a missing training
    setting compares as its :class:`TrainConfig` default.
    """
    upgraded = dict(saved)
    if "weights" in upgraded and "weights_path" not in upgraded:
        upgraded["weights_path"] = upgraded.pop("weights")
    defaults = {key: value for key, value in TrainConfig().to_dict().items()
                if key not in RESUME_FREE_SETTINGS}
    return {**defaults, **upgraded}


@dataclass
class CertifySettings:
    """What ``painwatch certify`` measures a bundle with (see :mod:`painwatch.evaluation.certify`)."""

    bundle: Path = setting(positional=True, help="model bundle folder (model.json + weights.safetensors)")
    data: Path = setting(
        positional=True, help="held-out frames: DATA/<individual>/<label>/* or a manifest CSV"
    )
    out: Path = setting(required=True, help="report folder (HTML, Markdown, JSON, PNG)")
    gate: Path | None = setting(None, help="gate TOML file (default: the packaged default.toml)")
    allow_overlap: bool = setting(
        False, help="allow individuals the bundle was trained on (the report is marked)"
    )
    max_frames: int | None = setting(
        None, help="certify at most this many frames, spread over individuals and classes"
    )
    individuals: tuple[str, ...] | None = setting(
        None, separator=",", help="comma-separated individuals of DATA to certify on (default: all)"
    )
    method: str | None = setting(None, help="certification method (default: the bundle's)")
    sigma: float | None = setting(None, help="noise sigma (within the bundle's bounds)")
    alpha: float | None = setting(None, help="error probability (within the bundle's bounds)")
    n: int | None = setting(None, help="noise draws per frame (the budget for sequential certificates)")
    noise_sigmas: tuple[float, ...] = setting(
        (0.05, 0.1, 0.25, 0.5), help="sigmas for accuracy under noise and the robustness surface"
    )
    noise_draws: int = setting(32, help="noisy copies per frame per sigma")
    bootstrap_reps: int = setting(1000, help="bootstrap replicates for the CIs")
    seed: int | None = setting(
        None,
        help="seed of every random draw, for a reproducible experiment; by default the certificates' noise "
        "comes from the operating system's entropy, as deployed, and the other draws (frames, bootstrap, "
        "noise study) from a random seed recorded in the report",
    )
    device: str = setting("auto", help="cpu, cuda, or auto (cuda when available)")
    main_method_only: bool = setting(False, help="certify with the bundle's method only (faster)")
    write_bundle: bool = setting(True, help="write the verdict into the bundle", cli=False)
    progress: bool = setting(True, negated_by="--quiet", help="no progress bar")

    def __post_init__(self) -> None:
        self.bundle, self.data, self.out = Path(self.bundle), Path(self.data), Path(self.out)
        if self.gate is not None:
            self.gate = Path(self.gate)
        if self.individuals is not None:
            self.individuals = tuple(str(name) for name in self.individuals)
        self.noise_sigmas = tuple(float(value) for value in self.noise_sigmas)
        check_integer(self.noise_draws, "--noise-draws", minimum=2)
        check_integer(self.bootstrap_reps, "--bootstrap-reps", minimum=1)
        if self.max_frames is not None:
            check_integer(self.max_frames, "--max-frames", minimum=1)
        for value in self.noise_sigmas:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--noise-sigmas must be numbers > 0, got {value!r}")


@dataclass
class DemoSettings:
    """How the demo bundle is made.

    Measured on the default demo set (``painwatch demo-data``): a from-scratch resnet10t stays at chance
    for about 10 epochs, then learns the cues; 20 epochs at half-strength augmentation reach about 74%
    on held-out individuals. Noise sigma 0.06 (about 15 grey levels per pixel) leaves the small facial
    cues visible; 0.12 drowned them at 64 px. The gate certifies with the budget the page uses (``n``
    None: the bundle's default), so it judges the classifier people get.
    """

    data: Path = setting(required=True, help="data folder or manifest (e.g. data/demo)")
    out: Path = setting(required=True, help="bundle folder to write")
    held_out: int = setting(5, help="individuals kept for certification")
    arch: str = setting("resnet10t", help="timm architecture")
    input_size: int = setting(64, help="side of the square model input in pixels")
    epochs: int = setting(20, help="training epochs (no early stopping)")
    noise_sigma: float = setting(0.06, help="Gaussian noise augmentation, L2 per pixel in [0, 1] units")
    max_frames: int | None = setting(30, help="frames certified (spread over individuals)")
    n: int | None = setting(
        None, help="noise-draw budget per frame for certification (default: the bundle's, as the page "
        "uses)"
    )
    gate: Path | None = setting(None, help="gate TOML (default: the packaged gate)")
    seed: int = setting(0, help="seed of every random draw")
    progress: bool = setting(True, negated_by="--quiet", help="no progress bars")

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)

    def train_config(self) -> TrainConfig:
        """The demo recipe (README, "The command line"): lr 2e-3, half-strength augmentation, every epoch."""
        return TrainConfig(arch=self.arch, input_size=self.input_size, epochs=self.epochs,
                           noise_sigma=self.noise_sigma, seed=self.seed, lr=2e-3, augment=0.5,
                           patience=None)
