"""timm backbones wrapped so that the model owns its input normalisation.

A :class:`PainNet` takes a float tensor ``(B, 3, H, W)`` with pixels in **[0, 1]** (docs/design.md,
"Units and conventions") and returns logits ``(B, K)``. Mean/std normalisation is the first layer
of the network, so noise ``sigma`` and certified radii are L2 norms in [0, 1] pixel space at the
model's input resolution. Inputs outside [0, 1] are accepted on purpose: smoothing adds Gaussian
noise to images and the noisy images are not clipped.

``arch`` is a timm model name or one of the Lipschitz networks of
:mod:`painwatch.models.lipschitz_nets` (``"lip-sll-small"``, ...), trained from scratch, whose sound
Lipschitz bound gives one-pass certificates (docs/design.md, "Lipschitz networks for face crops").

ImageNet weights come from a local file (``weights_path``: safetensors, or a PyTorch state dict
read with ``torch.load(weights_only=True)``; nothing is ever unpickled) or from the Hugging Face
hub when it is reachable (``pretrained=True``). Offline, a clear :class:`ModelWeightsError` says how
to pass a local file instead of waiting for network time-outs.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from painwatch.models.lipschitz_nets import (
    LIPSCHITZ_ARCHITECTURES,
    build_lipschitz_network,
    is_lipschitz_architecture,
)

DEFAULT_ARCH = "resnet50"
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
HUB_HOST = "huggingface.co"


class ModelWeightsError(RuntimeError):
    """Backbone weights could not be obtained or do not fit the architecture."""


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers saved with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(v) for v in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(v) for v in std], dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"mean and std must be sequences of equal length, got {list(mean)} and {list(std)}"
            )
        if not torch.isfinite(mean_t).all() or not torch.isfinite(std_t).all() or (std_t <= 0).any():
            raise ValueError(
                f"std must be finite and > 0 and mean finite, got mean={list(mean)} std={list(std)}"
            )
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class PainNet(nn.Module):
    """Normalisation + backbone (pooled features) + head.

    Guarantees:
    - ``forward(x)`` with ``x`` of shape ``(B, C, H, W)`` returns logits ``(B, num_classes)``;
      pixels are expected in [0, 1] (the normalisation is inside).
    - ``head(features(x)) == forward(x)`` (same computation; used for feature caching), and
      ``forward`` is the composition ``head . backbone . normalize`` that :meth:`lipschitz_composition`
      declares to :func:`painwatch.robust.lipschitz_upper_bound`.
    - ``gradcam_layer`` is the last convolutional stage of the backbone (for Grad-CAM hooks).

    ``head`` defaults to a new ``nn.Linear(num_features, num_classes)``; Lipschitz networks pass an
    orthogonal one.
    """

    def __init__(
        self,
        backbone: nn.Module,
        arch: str,
        num_classes: int,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        num_features = int(getattr(backbone, "num_features", 0))
        if num_features <= 0:
            raise ValueError(f"backbone {arch!r} does not expose a positive num_features")
        self.arch = arch
        self.num_classes = int(num_classes)
        self.input_size = int(input_size)
        self.in_chans = len(mean)
        self.num_features = num_features
        self.normalize = Normalize(mean, std)
        # Exact values for model.json; the float32 buffers round them.
        self._mean = tuple(float(v) for v in mean)
        self._std = tuple(float(v) for v in std)
        self.backbone = backbone
        self.head = nn.Linear(num_features, self.num_classes) if head is None else head

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean subtracted inside the model (as given; the buffer holds it in float32)."""
        return self._mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation divided inside the model (as given)."""
        return self._std

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"PainNet expects a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"PainNet expects a float tensor (B, {self.in_chans}, H, W) with pixels in [0, 1], "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"PainNet expects a floating point tensor with pixels in [0, 1], got dtype {x.dtype}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, num_features)`` of images with pixels in [0, 1]."""
        self._check_input(x)
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of images ``(B, C, H, W)`` with pixels in [0, 1]."""
        return self.head(self.features(x))

    def lipschitz_composition(self) -> list[tuple[str, nn.Module]]:
        """The layers ``forward`` applies, in order: its Lipschitz bound is the product of theirs
        (``1 / min(std)`` for the normalisation)."""
        return [("normalize", self.normalize), ("backbone", self.backbone), ("head", self.head)]

    @property
    def is_lipschitz(self) -> bool:
        """True for the Lipschitz networks of :mod:`painwatch.models.lipschitz_nets`."""
        return is_lipschitz_architecture(self.arch)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The backbone's last convolutional block (output of the deepest feature stage)."""
        return find_gradcam_layer(self.backbone)

    def to_device(self, device: str | torch.device) -> PainNet:
        """Move to ``device``; on CUDA also switch to channels_last memory format (faster convolutions)."""
        device = torch.device(device)
        self.to(device)
        if device.type == "cuda":
            self.to(memory_format=torch.channels_last)
        return self

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, num_classes={self.num_classes}, input_size={self.input_size}"


def find_gradcam_layer(backbone: nn.Module) -> nn.Module:
    """The last block of the deepest feature stage of a timm backbone.

    Uses timm's ``feature_info`` (the module producing the lowest-resolution feature map); when that
    module is a sequence of blocks, its last block is returned (its output is the stage's output).
    """
    feature_info = getattr(backbone, "feature_info", None)
    module: nn.Module | None = None
    if isinstance(feature_info, Sequence) and feature_info:
        name = feature_info[-1].get("module") if isinstance(feature_info[-1], Mapping) else None
        if name:
            with contextlib.suppress(AttributeError):
                module = backbone.get_submodule(name)
    if module is None:
        convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ValueError(f"backbone {type(backbone).__name__} has no convolution to attach Grad-CAM to")
        return convs[-1]
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module


def _check_arch(arch: str) -> None:
    import timm

    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a timm model name or a Lipschitz architecture, got {arch!r}")
    if is_lipschitz_architecture(arch):
        return
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        close += [name for name in LIPSCHITZ_ARCHITECTURES if arch.startswith("lip")]
        hint = f" (similar names: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown architecture {arch!r}{hint}; Lipschitz networks: "
                         f"{', '.join(LIPSCHITZ_ARCHITECTURES)}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout_s`` seconds, DNS included.

    Name resolution ignores socket time-outs (it can take 20 s and more without a network), so the
    probe runs in a daemon thread and is abandoned when it is late.
    """
    import threading

    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    worker = threading.Thread(target=probe, name="painwatch-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


def _hub_repo(arch: str) -> str:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
        repo = getattr(cfg, "hf_hub_id", None)
    except Exception:  # an unknown tag or an old timm: fall back to the plain name
        repo = None
    return repo or f"timm/{arch}"


def _offline_message(arch: str, reason: str) -> str:
    return (
        f"ImageNet weights for {arch!r} are not available from the Hugging Face hub ({reason}). "
        f"Download them where the hub is reachable ('model.safetensors' of {_hub_repo(arch)}) and pass the "
        f"local file: create_model(..., weights_path=PATH) or `painwatch train --weights PATH`; "
        f"or train from scratch without --pretrained."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a weights-only PyTorch checkpoint.

    Never unpickles arbitrary objects: ``.pt/.pth/.bin`` files go through
    ``torch.load(weights_only=True)``. Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``)
    are unwrapped and a ``module.`` prefix (DataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelWeightsError(f"weights file {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelWeightsError(
                f"weights file {str(path)!r} is not a readable safetensors file: {error}"
            ) from error
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # pickle errors have many types; all mean "not a weights-only checkpoint"
            raise ModelWeightsError(
                f"weights file {str(path)!r} is neither safetensors nor a weights-only PyTorch checkpoint "
                f"(only tensors are accepted, nothing is unpickled): {error}"
            ) from error
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise ModelWeightsError(f"weights file {str(path)!r} holds no state dict of tensors")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        cleaned[key.removeprefix("module.")] = value
    if not cleaned:
        raise ModelWeightsError(f"weights file {str(path)!r} holds no tensors")
    return cleaned


def load_backbone_weights(backbone: nn.Module, path: str | Path, arch: str) -> None:
    """Load ImageNet (or other) weights into a head-less timm backbone, checking every key.

    The original classifier (e.g. ``fc.*`` for ResNets) is dropped; a painwatch state dict
    (``backbone.*`` keys) is also accepted. Raises :class:`ModelWeightsError` naming the missing,
    unexpected or mis-shaped keys.
    """
    state = read_state_dict(path)
    if any(key.startswith("backbone.") for key in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    classifier_names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{c}.") for c in classifier_names)}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} shape mismatch(es), e.g. {mis_shaped[:3]}")
    if problems:
        raise ModelWeightsError(
            f"weights file {str(path)!r} does not fit architecture {arch!r}: " + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=True)


def _hub_pretrained_backbone(arch: str, drop_rate: float) -> nn.Module:
    import timm

    if not _hub_offline() and not _hub_reachable():
        raise ModelWeightsError(_offline_message(arch, f"{HUB_HOST} is not reachable"))
    try:
        return timm.create_model(arch, pretrained=True, num_classes=0, drop_rate=drop_rate)
    except Exception as error:  # hub / cache errors come in many types; all mean "no weights"
        reason = "HF_HUB_OFFLINE is set and they are not in the local cache" if _hub_offline() else str(error)
        raise ModelWeightsError(_offline_message(arch, reason)) from error


def create_model(
    arch: str = DEFAULT_ARCH,
    *,
    num_classes: int = 2,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    input_size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    drop_rate: float = 0.0,
    seed: int | None = None,
) -> PainNet:
    """Build a :class:`PainNet` around ``timm`` architecture ``arch`` with a new ``num_classes`` head,
    or the Lipschitz network ``arch`` of :data:`painwatch.models.lipschitz_nets.LIPSCHITZ_ARCHITECTURES`
    (trained from scratch: no ImageNet weights, no dropout; ImageNet mean/std unless given).

    - ``weights_path``: local backbone weights (safetensors or weights-only PyTorch file); takes
      precedence over ``pretrained``.
    - ``pretrained=True``: ImageNet weights from the hub (or its local cache); raises
      :class:`ModelWeightsError` quickly when offline or unreachable, saying how to pass a local file.
    - ``mean``/``std``: the normalisation inside the model; default: the architecture's pretrained
      config (ImageNet statistics for ResNets).
    - ``input_size``: the side (pixels) of the square images the model is trained and certified at.
    - ``seed``: when given, the new layers are initialised from that seed without touching the
      global random state.
    """
    import timm

    _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or not 16 <= input_size <= 4096:
        raise ValueError(f"input_size must be an integer number of pixels in [16, 4096], got {input_size!r}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")

    lipschitz = is_lipschitz_architecture(arch)
    if lipschitz and (pretrained or weights_path is not None or float(drop_rate) > 0):
        raise ValueError(
            f"architecture {arch!r} is a Lipschitz network trained from scratch: it takes no ImageNet "
            f"weights and no dropout (got pretrained={pretrained}, weights_path={weights_path!r}, "
            f"drop_rate={drop_rate})"
        )
    rng_context = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng_context:
        if seed is not None:
            torch.manual_seed(int(seed))
        if lipschitz:
            mean = tuple(mean) if mean is not None else IMAGENET_MEAN
            std = tuple(std) if std is not None else IMAGENET_STD
            backbone, head = build_lipschitz_network(arch, input_size=input_size, in_chans=len(mean),
                                                     num_classes=num_classes)
            return PainNet(backbone, arch, num_classes, input_size, mean, std, head=head)
        if weights_path is not None:
            backbone = timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=drop_rate)
            load_backbone_weights(backbone, weights_path, arch)
        elif pretrained:
            backbone = _hub_pretrained_backbone(arch, drop_rate)
        else:
            backbone = timm.create_model(arch, pretrained=False, num_classes=0, drop_rate=drop_rate)
        cfg = getattr(backbone, "pretrained_cfg", {}) or {}
        mean = tuple(mean) if mean is not None else tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(std) if std is not None else tuple(cfg.get("std", IMAGENET_STD))
        model = PainNet(backbone, arch, num_classes, input_size, mean, std)
    return model
