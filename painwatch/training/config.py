"""The settings of a training run: one :class:`TrainConfig`, every field declared once.

Each field carries its help text, flag and metavar (:func:`painwatch.settings.setting`); the command
line builds ``painwatch train`` and ``painwatch loio`` options from them, so a default, a unit or a
help text is written in exactly one place. Units (docs/design.md, "Units and conventions"):
``noise_sigma`` is the L2 noise level per pixel in [0, 1] pixel space at ``input_size``;
``warmup_epochs`` is in epochs (fractions allowed); ``lr`` is per step; ``margin`` is in logit units.
Every random draw of a run (shuffling, sampling, noise, augmentation) derives from ``seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from painwatch.settings import setting
from painwatch.validation import check_bool, check_choice, check_integer, check_number

LOSSES = ("ce", "mc_margin", "ce+mc_margin", "offset_ce", "mcr", "mscr")
NOISE_LOSSES = ("mc_margin", "ce+mc_margin", "mscr")
"""The losses that maximise a margin under the training noise: they need ``noise_sigma > 0``."""
SCHEDULES = ("cosine", "onecycle", "constant")
CLASS_BALANCING = ("weights", "sampler", "none")
MONITORS = ("val_loss", "val_balanced_accuracy")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    """Settings of a training run; validated on construction (a bad value raises ``ValueError`` naming
    ``TrainConfig.<field>`` and the value).

    ``margin`` (d) and ``num_draws`` (k) parametrise the Monte Carlo expected-margin loss
    (docs/design.md, "Training"); ``margin_weight`` scales it when added to cross-entropy. ``margin`` is
    also the offset of the offset cross-entropy ``tau CE((f - d onehot_y) / tau)`` [Prach22] (``tau`` =
    ``offset_temperature``) and the target of the MCR loss ``relu(d - M_f)`` and of the MSCR loss
    ``relu(d - SM)`` (smoothed margin by moment propagation at input variance ``noise_sigma^2``; AOL and
    BCOP Lipschitz networks only) [RC, Ch. 3]; with a Lipschitz network of bound L they aim at a
    certified radius of ``d / (sqrt(2) L)``. ``patience``
    (epochs without improvement of ``monitor`` on the validation individuals) stops early; ``None``
    trains every epoch. ``head_epochs`` and ``head_l2`` are used by the linear head on cached features
    only (:func:`painwatch.training.head.fit_head`).
    """

    arch: str = setting(
        "resnet50",
        help="timm architecture name (e.g. resnet50, resnet18, resnet10t), or a Lipschitz network trained "
        "from scratch that certifies in one forward pass (lip-sll-small, lip-sll-medium, lip-aol-small, "
        "lip-bcop-small; lip-sll-tiny and lip-aol-tiny for quick trials)",
    )
    input_size: int = setting(
        224, metavar="PIXELS", help="side of the square model input in pixels; frames are resized to it"
    )
    weights_path: str | None = setting(
        None, flag="--weights", metavar="FILE",
        help="local ImageNet weights of the backbone (safetensors or .pth state dict); used instead of "
        "--pretrained",
    )
    pretrained: bool = setting(False, help="ImageNet weights from the Hugging Face hub (needs network)")
    epochs: int = setting(10, help="at most this many passes over the training frames")
    batch_size: int = setting(32, metavar="FRAMES", help="frames per training step")
    eval_batch_size: int = setting(64, help="frames per validation batch (speed only)", cli=False)
    lr: float = setting(3e-4, help="peak AdamW learning rate (per step)")
    weight_decay: float = setting(
        0.05, help="AdamW decoupled weight decay (weight matrices and kernels; not biases or norm scales)"
    )
    schedule: str = setting(
        "cosine", choices=SCHEDULES,
        help="per-step learning-rate schedule: cosine (warm-up, then cosine decay to 0), onecycle "
        "(OneCycleLR peaking after the warm-up, or after 30%% of the run without one), constant (after the "
        "warm-up)",
    )
    warmup_epochs: float = setting(
        1.0, metavar="EPOCHS", help="linear learning-rate warm-up, in epochs (fractions allowed); 0 for none"
    )
    patience: int | None = setting(
        5, metavar="EPOCHS", zero_means_none=True,
        help="early stopping: epochs without improvement of --monitor on the validation individuals; "
        "0 disables",
    )
    monitor: str = setting(
        "val_loss", choices=MONITORS,
        help="validation score that picks the best epoch and drives early stopping",
    )
    class_balance: str = setting(
        "weights", choices=CLASS_BALANCING,
        help="class imbalance: inverse-frequency loss weights, balanced sampling, or none",
    )
    noise_sigma: float = setting(
        0.0, metavar="SIGMA",
        help="Gaussian noise augmentation: sigma of the noise added to every pixel, in [0, 1] pixel units "
        "(unclipped; the sigma of the certificates); 0 for none",
    )
    augment: float = setting(
        1.0, metavar="STRENGTH",
        help="strength of the image augmentation in [0, 1] (scales the crop, affine and colour ranges); "
        "0 for none",
    )
    validate_under_noise: bool = setting(
        True, negated_by="--validate-clean",
        help="validate on clean frames even when training with noise (otherwise under the training noise)",
    )
    loss: str = setting(
        "ce", choices=LOSSES,
        help="cross-entropy, the Monte Carlo expected-margin loss (needs --noise-sigma > 0), their sum, "
        "the offset cross-entropy tau CE((logits - d onehot) / tau) (offset_ce, for Lipschitz networks), "
        "the margin certified radius loss relu(d - margin) (mcr), or its smoothed version by moment "
        "propagation (mscr: needs --noise-sigma > 0 and a lip-aol or lip-bcop network)",
    )
    margin: float = setting(
        1.0, help="target margin d of the expected-margin, offset_ce, mcr and mscr losses, in logit units"
    )
    offset_temperature: float = setting(
        0.25, metavar="TAU", help="temperature tau of --loss offset_ce (smaller: closer to a hinge at d)"
    )
    num_draws: int = setting(
        4, metavar="K", help="noise draws k per frame and step of the expected-margin loss"
    )
    margin_weight: float = setting(1.0, help="weight of the expected-margin term in --loss ce+mc_margin")
    label_smoothing: float = setting(0.0, help="label smoothing of the cross-entropy, in [0, 1)")
    drop_rate: float = setting(
        0.0, help="dropout probability of the backbone (on the pooled features for ResNets), in [0, 1)"
    )
    max_grad_norm: float | None = setting(
        5.0, zero_means_none=True, help="clip the gradient's global L2 norm to this; 0 disables"
    )
    amp: bool = setting(
        True, negated_by="--no-amp",
        help="disable mixed precision (bfloat16/float16 autocast, used on CUDA only)",
    )
    channels_last: bool = setting(True, help="channels_last memory format on CUDA (speed only)", cli=False)
    seed: int = setting(
        0, help="seed of every random draw (splits, initialisation, shuffling, augmentation, noise)"
    )
    num_workers: int = setting(0, help="data-loading worker processes; 0 loads in the main process")
    device: str = setting("auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps")
    head_epochs: int = setting(
        50, metavar="ROUNDS", group="head",
        help="with --cache-features: at most this many L-BFGS rounds (up to 20 iterations each) of the "
        "linear head",
    )
    head_l2: float = setting(
        1e-2, group="head", help="with --cache-features: L2 penalty of the head on standardised features"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Check every setting; raises ``ValueError`` naming ``TrainConfig.<field>`` and the bad value."""
        name = "TrainConfig.{}".format
        for field_name in ("epochs", "batch_size", "eval_batch_size", "num_draws", "head_epochs"):
            check_integer(getattr(self, field_name), name(field_name), minimum=1)
        check_integer(self.input_size, name("input_size"), minimum=16, maximum=4096)
        check_number(self.lr, name("lr"), minimum=0.0, exclusive_minimum=True)
        for field_name in ("weight_decay", "warmup_epochs", "noise_sigma", "margin_weight", "head_l2"):
            check_number(getattr(self, field_name), name(field_name), minimum=0.0)
        check_number(self.offset_temperature, name("offset_temperature"), minimum=0.0, exclusive_minimum=True)
        check_number(self.margin, name("margin"))
        check_number(self.label_smoothing, name("label_smoothing"), minimum=0.0, maximum=1.0,
                     exclusive_maximum=True)
        for field_name in ("amp", "channels_last", "pretrained", "validate_under_noise"):
            check_bool(getattr(self, field_name), name(field_name))
        check_number(self.augment, name("augment") + " (0: no augmentation, 1: the full ranges)",
                     minimum=0.0, maximum=1.0)
        check_number(self.drop_rate, name("drop_rate"), minimum=0.0, maximum=1.0, exclusive_maximum=True)
        if self.max_grad_norm is not None:
            check_number(self.max_grad_norm, name("max_grad_norm") + " (None: no clipping)", minimum=0.0,
                         exclusive_minimum=True)
        if self.patience is not None:
            check_integer(self.patience, name("patience") + " (None: no early stopping)", minimum=1)
        check_integer(self.seed, name("seed"), minimum=0)
        check_integer(self.num_workers, name("num_workers"), minimum=0)
        check_choice(self.loss, name("loss"), LOSSES)
        check_choice(self.schedule, name("schedule"), SCHEDULES)
        check_choice(self.class_balance, name("class_balance"), CLASS_BALANCING)
        check_choice(self.monitor, name("monitor"), MONITORS)
        device_kind = str(self.device).split(":")[0]
        check_choice(device_kind, name("device") + " (optionally with an index, e.g. cuda:1)", DEVICES)
        if not isinstance(self.arch, str) or not self.arch:
            raise ValueError(f"{name('arch')} must be a timm model name, got {self.arch!r}")
        if self.loss in NOISE_LOSSES and self.noise_sigma <= 0:
            raise ValueError(
                f"{name('loss')} {self.loss!r} maximises the margin under noise: it needs "
                f"TrainConfig.noise_sigma > 0 (--noise-sigma > 0), got {self.noise_sigma!r}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The config of a dict such as :meth:`to_dict` wrote; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
