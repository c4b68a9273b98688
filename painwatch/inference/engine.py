"""The network as it answers: one runtime and one precision for the clean pass and every noise draw.

A certificate is about the exact function that gave the answer (docs/design.md, "The answer at once and
a certificate that grows"). An :class:`Engine` is that function: it wraps a bundle's network in a
runtime (``torch``, or ``openvino`` [OpenVINO] on CPUs) at a precision (``fp32``, or ``bf16`` where
the processor has it) and computes logits ``(B, K)`` of images ``(B, C, H, W)`` with pixels in [0, 1].

Every batch is cut into passes of a fixed shape (``pass_rows`` images, the last one padded with zeros),
so a row's logits depend on that row alone, never on the other images that shared its pass: frames
batched together give the certificates they get alone, and a recorded noise seed reproduces a result
whatever else was being certified. A single clean image (the answer) goes through a pass of one row;
:meth:`Engine.answer_described` makes that pass also return the in-distribution check's descriptors
(:class:`painwatch.models.in_distribution.DescribedNetwork`), so that the check is about the network
that answers, in its runtime and precision, at no second pass.

The engine measures its own throughput (:attr:`Engine.passes_per_s`, images per second over recent
noise passes) and, once certification reports it, the rate of whole certification rounds
(:attr:`Engine.draws_per_s`: drawing the noise, the passes and the bookkeeping), from which the page
turns a time budget into a number of draws.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from painwatch.inference.bulk_settings import PRECISIONS, RUNTIMES
from painwatch.models.in_distribution import DescribedNetwork, descriptor_pass

__all__ = ["PRECISIONS", "RUNTIMES", "Engine", "EngineError", "bf16_supported", "choose_engine",
           "make_engine", "network_fingerprint"]


CPU_PASS_ROWS = 16
"""Images per noise pass on a CPU: the batch ``scripts/bench_latency.py`` measures every engine at
(OpenVINO bf16 ran ResNet50 at 224 px at 4.7 times a bare fp32 timm loop there, ``results/latency/``)."""
GPU_PASS_ROWS = 256
"""Images per noise pass on a GPU: enough to keep it busy with ResNet50 at 224 px."""
_THROUGHPUT_MEMORY = 0.7
"""Weight of the past in the running throughput (per timed pass)."""


class EngineError(ValueError):
    """A runtime or precision that cannot run here (not installed, no bf16, no GPU for it)."""


@functools.lru_cache(maxsize=1)
def bf16_supported_on_cpu() -> bool:
    """Whether this processor computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
            # oneDNN also emulates bf16 on plain AVX512; only the native instructions pay.
            return not flags or any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
    except (AttributeError, RuntimeError, OSError):
        pass
    return False


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (a CUDA GPU that supports it, or such a CPU)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bf16_supported_on_cpu()


def openvino_available() -> bool:
    """Whether the ``openvino`` package imports."""
    try:
        import openvino  # noqa: F401 - optional: imported only to see whether it is there
    except ImportError:
        return False
    return True


def choose_engine(
    device: torch.device, *, runtime: str = "auto", precision: str = "auto"
) -> tuple[str, str]:
    """The ``(runtime, precision)`` to run on ``device``: ``"auto"`` picks the fastest that is exact
    enough here (OpenVINO on CPUs when installed, bf16 where the device has it natively); an explicit
    choice is checked. Raises :class:`EngineError` naming what is missing."""
    if runtime not in ("auto", *RUNTIMES):
        raise EngineError(f"runtime={runtime!r} is not a runtime; choose auto or one of "
                          f"{', '.join(RUNTIMES)}")
    if precision not in ("auto", *PRECISIONS):
        raise EngineError(f"precision={precision!r} is not a precision; choose auto or one of "
                          f"{', '.join(PRECISIONS)}")
    if runtime == "auto":
        runtime = "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if runtime == "openvino":
        if device.type != "cpu":
            raise EngineError(f"runtime='openvino' runs on the CPU only, not on {device}")
        if not openvino_available():
            raise EngineError("runtime='openvino' needs the openvino package (pip install openvino)")
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise EngineError(f"precision='bf16' needs native bfloat16 on {device} (AVX512-BF16 or AMX on a CPU, "
                          "a GPU that supports it); use fp32")
    return runtime, precision


@dataclass
class _Throughput:
    """Images per second over recent timed passes (a running average)."""

    passes_per_s: float = math.nan

    def record(self, images: int, seconds: float) -> None:
        if images <= 0 or seconds <= 0:
            return
        rate = images / seconds
        if math.isnan(self.passes_per_s):
            self.passes_per_s = rate
        else:
            self.passes_per_s = _THROUGHPUT_MEMORY * self.passes_per_s + (1 - _THROUGHPUT_MEMORY) * rate


class Engine:
    """The network in one runtime and precision; see the module docstring.

    ``engine(batch)`` returns float32 logits ``(B, K)`` on ``batch``'s device, computed in passes of
    ``pass_rows`` images (``engine.answer(batch)`` in passes of one image, for clean answers). Attributes:
    ``runtime``, ``precision``, ``pass_rows``, ``device``, ``threads`` (CPU threads it runs on),
    ``passes_per_s`` (measured, NaN before the first timed pass).
    """

    runtime: str = ""

    def __init__(
        self, *, precision: str, pass_rows: int, device: torch.device, input_shape: Sequence[int]
    ) -> None:
        if precision not in PRECISIONS:
            raise EngineError(f"precision={precision!r} is not one of {PRECISIONS}")
        if not isinstance(pass_rows, int) or pass_rows < 1:
            raise EngineError(f"pass_rows must be a positive integer, got {pass_rows!r}")
        self.precision = precision
        self.pass_rows = pass_rows
        self.device = device
        self.input_shape = tuple(int(d) for d in input_shape)
        self.threads = torch.get_num_threads()
        self._throughput = _Throughput()
        self._draws = _Throughput()

    @property
    def name(self) -> str:
        """``"<runtime>-<precision>"``, e.g. ``openvino-bf16``."""
        return f"{self.runtime}-{self.precision}"

    @property
    def passes_per_s(self) -> float:
        """Images per second of the recent noise passes (NaN before any was timed)."""
        return self._throughput.passes_per_s

    @property
    def draws_per_s(self) -> float:
        """Noise draws per second of recent certification rounds (:meth:`record_draws`), or
        :attr:`passes_per_s` before any was recorded."""
        rate = self._draws.passes_per_s
        return rate if math.isfinite(rate) else self.passes_per_s

    def record_draws(self, draws: int, seconds: float) -> None:
        """Record a certification round: ``draws`` noisy copies drawn, passed and counted in ``seconds``."""
        self._draws.record(draws, seconds)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self._in_passes(batch, self.pass_rows, timed=True)

    def answer(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of clean images, one image per pass (the fastest way to one answer)."""
        return self._in_passes(batch, 1, timed=False)

    def answer_described(
        self, batch: torch.Tensor, layers: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """Logits ``(B, K)`` of clean images and each in-distribution descriptor of ``layers`` as a
        float64 array ``(B, d)``, from the same passes of one image (no second pass): the descriptors
        :func:`~painwatch.models.in_distribution.descriptor_pass` computes, in this engine's runtime
        and precision."""
        layers = tuple(layers)
        self._check_shape(batch)
        logits, parts = [], []
        for row in batch:
            outputs = self._run_described(row.unsqueeze(0), layers)
            logits.append(outputs[0].to(batch.device, torch.float32))
            parts.append(outputs[1:])
        descriptors = {layer: np.concatenate([part[i].detach().cpu().to(torch.float64).numpy()
                                              for part in parts])
                       for i, layer in enumerate(layers)}
        return (torch.cat(logits) if logits else batch.new_zeros((0, 0))), descriptors

    def _run_described(self, part: torch.Tensor, layers: tuple[str, ...]) -> list[torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - every runtime overrides it

    def warm_up(self, layers: Sequence[str] = ()) -> float:
        """Run one noise pass and one answer pass on zeros (first passes are slow: memory, kernel choice),
        the answer with the descriptors of ``layers`` too when given, and time a second noise pass;
        returns the measured images per second."""
        zeros = torch.zeros((self.pass_rows, *self.input_shape), device=self.device)
        self.answer(zeros[:1])
        if layers:
            self.answer_described(zeros[:1], layers)
        self(zeros)
        self(zeros)
        return self.passes_per_s

    def _check_shape(self, batch: torch.Tensor) -> None:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.input_shape))}), "
                             f"got shape {tuple(batch.shape)}")

    def _in_passes(self, batch: torch.Tensor, rows: int, *, timed: bool) -> torch.Tensor:
        self._check_shape(batch)
        outputs = []
        for start in range(0, batch.shape[0], rows):
            part = batch[start:start + rows]
            count = part.shape[0]
            if count < rows:  # a fixed shape: a row's logits never depend on the rows beside it
                part = torch.cat([part, part.new_zeros((rows - count, *self.input_shape))])
            began = time.perf_counter()
            logits = self._run(part)[:count]
            if timed:
                self._throughput.record(rows, time.perf_counter() - began)
            outputs.append(logits.to(batch.device, torch.float32))
        return torch.cat(outputs) if outputs else batch.new_zeros((0, 0))

    def _run(self, part: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every runtime overrides it
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What computes the answers, for results and reports."""
        return {"runtime": self.runtime, "precision": self.precision, "pass_rows": self.pass_rows,
                "device": str(self.device), "threads": self.threads}


class TorchEngine(Engine):
    """PyTorch eager on its own copy of the network, channels-last (faster convolutions on CPUs and
    GPUs), with weights and activations in bfloat16 for ``precision="bf16"``."""

    runtime = "torch"

    def __init__(
        self, model: torch.nn.Module, *, precision: str, pass_rows: int, input_shape: Sequence[int],
        descriptors: Sequence[str] = (),
    ) -> None:
        device = next(model.parameters()).device
        super().__init__(precision=precision, pass_rows=pass_rows, device=device, input_shape=input_shape)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # Its own copy: the page's Grad-CAM hooks on the bundle's network never see a noise pass.
        self.network = copy.deepcopy(model).eval().to(dtype=self.dtype, memory_format=torch.channels_last)
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def _run(self, part: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            inputs = part.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
            return self.network(inputs).float()

    def _run_described(self, part: torch.Tensor, layers: tuple[str, ...]) -> list[torch.Tensor]:
        # The hooks go on the engine's own copy for this pass only (its noise passes never carry them).
        inputs = part.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            logits, descriptors = descriptor_pass(self.network, inputs, layers)
        return [logits.float(), *(torch.from_numpy(descriptors[layer]) for layer in layers)]


def network_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a network's class and every parameter and buffer (names, dtypes, shapes, values): the
    same fingerprint, the same function."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_COMPILED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
"""OpenVINO compiled models by (network fingerprint, shape, precision, threads), the most recent last:
converting a network takes seconds, and a process often loads the same bundle again."""
_COMPILED_MAX = 8
_COMPILED_LOCK = threading.Lock()


class OpenVinoEngine(Engine):
    """An OpenVINO compiled model on the CPU [OpenVINO], converted from the bundle's network (the
    weights are the same numbers); ``precision`` is its inference precision hint (``bf16`` runs
    convolutions and matrix products in bfloat16 with fp32 accumulation). Compiled models are kept per
    process (:data:`_COMPILED`); every engine has its own inference requests, one call at a time each."""

    runtime = "openvino"

    def __init__(
        self, model: torch.nn.Module, *, precision: str, pass_rows: int, input_shape: Sequence[int],
        descriptors: Sequence[str] = (),
    ) -> None:
        super().__init__(precision=precision, pass_rows=pass_rows, device=torch.device("cpu"),
                         input_shape=input_shape)
        self._model = model
        self._fingerprint = network_fingerprint(model)
        self._requests: dict[Any, Any] = {}
        self._locks: dict[Any, threading.Lock] = {}
        for rows in sorted({1, pass_rows}):
            compiled = self._compiled(model, self._fingerprint, rows)
            self._requests[rows] = compiled.create_infer_request()
            self._locks[rows] = threading.Lock()
        if descriptors:
            self._described_request(tuple(descriptors))

    def _described_request(self, layers: tuple[str, ...]) -> tuple[Any, threading.Lock]:
        """The inference request of the one-image pass that also returns ``layers``' descriptors
        (compiled on first use, or at construction for the ``descriptors`` given)."""
        key = ("described", layers)
        with _COMPILED_LOCK:
            ready = key in self._requests
        if not ready:
            compiled = self._compiled(DescribedNetwork(self._model, layers), self._fingerprint, 1,
                                      variant=layers)
            with _COMPILED_LOCK:
                if key not in self._requests:
                    self._requests[key] = compiled.create_infer_request()
                    self._locks[key] = threading.Lock()
        return self._requests[key], self._locks[key]

    def _compiled(
        self, model: torch.nn.Module, fingerprint: str, rows: int, variant: tuple[str, ...] = ()
    ) -> Any:
        import openvino as ov  # optional: only this runtime needs it

        key = (fingerprint, variant, rows, self.input_shape, self.precision, self.threads)
        with _COMPILED_LOCK:
            if key in _COMPILED:
                _COMPILED.move_to_end(key)
                return _COMPILED[key]
            converted = _COMPILED.get((fingerprint, variant, "converted"))
            if converted is None:
                # Traced once on one image (tracing a large batch costs minutes), reshaped per pass.
                with torch.no_grad(), warnings.catch_warnings():
                    # The converter traces the network; its tracer's notes are about other networks.
                    warnings.simplefilter("ignore", category=FutureWarning)
                    warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
                    converted = ov.convert_model(copy.deepcopy(model).cpu().eval().float(),
                                                 example_input=torch.zeros((1, *self.input_shape)))
                self._keep((fingerprint, variant, "converted"), converted)
            shaped = converted.clone()
            shaped.reshape({shaped.inputs[0]: [rows, *self.input_shape]})
            config = {"INFERENCE_NUM_THREADS": self.threads,
                      "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"}
            compiled = ov.Core().compile_model(shaped, "CPU", config)
            self._keep(key, compiled)
            return compiled

    @staticmethod
    def _keep(key: tuple[Any, ...], value: Any) -> None:
        _COMPILED[key] = value
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)

    def _run(self, part: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(part.detach().cpu().numpy(), dtype=np.float32)
        rows = part.shape[0]
        with self._locks[rows]:
            outputs = self._requests[rows].infer({0: inputs})
            return torch.from_numpy(np.array(outputs[0], dtype=np.float32, copy=True))

    def _run_described(self, part: torch.Tensor, layers: tuple[str, ...]) -> list[torch.Tensor]:
        request, lock = self._described_request(layers)
        inputs = np.ascontiguousarray(part.detach().cpu().numpy(), dtype=np.float32)
        with lock:
            outputs = request.infer({0: inputs})
            return [torch.from_numpy(np.array(outputs[i], dtype=np.float32, copy=True))
                    for i in range(1 + len(layers))]


def make_engine(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    *,
    runtime: str = "auto",
    precision: str = "auto",
    pass_rows: int | None = None,
    descriptors: Sequence[str] = (),
) -> Engine:
    """The :class:`Engine` of ``model`` (on its device) for images ``input_shape`` ``(C, H, W)``: the
    runtime and precision :func:`choose_engine` gives, in passes of ``pass_rows`` images (by default
    :data:`CPU_PASS_ROWS` on a CPU, :data:`GPU_PASS_ROWS` on a GPU). ``descriptors`` (in-distribution
    descriptor names) are prepared for :meth:`Engine.answer_described` now rather than on first use.
    With ``runtime="auto"`` a network OpenVINO cannot convert (with its descriptors, when given) runs
    with torch (with a ``RuntimeWarning``); asked for by name, it raises :class:`EngineError`."""
    device = next(model.parameters()).device
    asked = runtime
    runtime, precision = choose_engine(device, runtime=runtime, precision=precision)
    if pass_rows is None:
        pass_rows = CPU_PASS_ROWS if device.type == "cpu" else GPU_PASS_ROWS
    if runtime == "openvino":
        try:
            return OpenVinoEngine(model, precision=precision, pass_rows=pass_rows, input_shape=input_shape,
                                  descriptors=descriptors)
        except Exception as error:  # the converter's own error types; it covers most networks, not all
            if asked != "auto":
                raise EngineError(f"OpenVINO cannot run this network: {error}") from error
            warnings.warn(f"OpenVINO cannot convert {type(model).__name__} ({type(error).__name__}); "
                          "running it with torch", RuntimeWarning, stacklevel=2)
    return TorchEngine(model, precision=precision, pass_rows=pass_rows, input_shape=input_shape,
                       descriptors=descriptors)
