"""The settings of bulk work: what ``painwatch predict`` answers (:class:`BulkSettings`), where bulk
work runs (:class:`DistributedSettings`: this process, or a Ray cluster [Moritz18]) and what computes
the answers and noise draws (:class:`EngineSettings`, also taken by ``painwatch certify``).

Both are dataclasses whose fields declare their command-line options (docs/design.md, "One declaration
per setting"). This module imports neither torch nor Ray, so that the command line can read it to build
its options; :mod:`painwatch.inference.distributed` holds the Ray code and imports Ray only when a run
asks for it. Units: ``sigma`` is the L2 noise per pixel in [0, 1] pixel space at the model's input
size (docs/design.md, "Units and conventions").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from painwatch.settings import setting
from painwatch.validation import check_integer, check_number

RUNTIMES: tuple[str, ...] = ("torch", "openvino")
"""How the network runs: PyTorch eager, or an OpenVINO compiled model (CPU only)."""
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""The arithmetic of weights and activations: float32, or bfloat16 (8-bit mantissa, fp32 range)."""


@dataclass
class EngineSettings:
    """What computes a frame's answer and every one of its noise draws (docs/design.md, "The answer at
    once and a certificate that grows"): the certificate is about that exact model, and every result
    records it. ``auto`` picks the fastest here (OpenVINO on CPUs, bf16 where the processor or GPU
    computes it natively), so results can differ slightly between machines; ``--runtime torch
    --precision fp32`` gives the network as trained, the same everywhere."""

    runtime: str = setting(
        "auto", choices=("auto", *RUNTIMES),
        help="what runs the network: auto (OpenVINO on CPUs when installed), torch, openvino",
    )
    precision: str = setting("auto", choices=("auto", *PRECISIONS),
                             help="its arithmetic: auto (bf16 where native), fp32, bf16")


LOCAL_RAY = "local"
"""``--ray`` without an address: start a Ray instance on this machine for the run."""


@dataclass
class DistributedSettings:
    """Where bulk work runs: here (``ray`` None, the default) or on Ray.

    A LOIO fold is a Ray task asking for ``fold_cpus`` CPUs and ``fold_gpus`` GPUs; the frames of bulk
    prediction and certification are shared by ``workers`` Ray actors that each load the bundle once
    and ask for ``worker_cpus`` / ``worker_gpus``. Fractional GPUs share a GPU (0.5: two per GPU). A
    task or actor whose worker process dies (killed, out of memory, node lost) is retried up to
    ``retries`` times; an exception raised by painwatch's own code is not retried (it would happen
    again) and stops the run. None of these change a result: they are excluded from LOIO's resume
    checks.
    """

    ray: str | None = setting(
        None, const=LOCAL_RAY, metavar="ADDRESS",
        help="run on Ray: --ray alone starts a local Ray on this machine; --ray ADDRESS (host:port, "
        "ray://host:10001, or auto for the cluster of this node) joins a running cluster. Give it after "
        "the positional arguments",
    )
    fold_cpus: float = setting(1.0, group="folds", help="CPUs each LOIO fold asks Ray for")
    fold_gpus: float = setting(
        0.0, group="folds", help="GPUs each LOIO fold asks Ray for (fractions share a GPU: 0.5 runs two "
        "folds on each)"
    )
    workers: int | None = setting(
        None, group="frames",
        help="Ray actors sharing the frames, each loading the bundle once (default: as many as the "
        "cluster's GPUs, or CPUs, hold)",
    )
    worker_cpus: float = setting(1.0, group="frames", help="CPUs each Ray actor asks for")
    worker_gpus: float | None = setting(
        None, group="frames",
        help="GPUs each Ray actor asks for, fractions allowed (default: 1 when the cluster has GPUs, else 0)",
    )
    retries: int = setting(
        3, help="times Ray retries a fold, or restarts an actor, whose worker process died"
    )

    def __post_init__(self) -> None:
        if self.ray is not None and not str(self.ray).strip():
            raise ValueError(f"--ray takes a cluster address or nothing, got {self.ray!r}")
        check_number(self.fold_cpus, "--fold-cpus", minimum=0.0, exclusive_minimum=True)
        check_number(self.fold_gpus, "--fold-gpus", minimum=0.0)
        check_number(self.worker_cpus, "--worker-cpus", minimum=0.0, exclusive_minimum=True)
        if self.worker_gpus is not None:
            check_number(self.worker_gpus, "--worker-gpus", minimum=0.0)
        if self.workers is not None:
            check_integer(self.workers, "--workers", minimum=1)
        check_integer(self.retries, "--retries", minimum=0)

    @property
    def enabled(self) -> bool:
        """Whether the work goes to Ray."""
        return self.ray is not None


@dataclass
class BulkSettings:
    """What ``painwatch predict`` answers: every frame of ``inputs`` with ``bundle``, into ``out``.

    ``inputs`` are folders (searched recursively for images and clips; a folder holding a
    ``manifest.csv`` is read through it), manifest CSVs (a ``path`` column, or ``video`` and ``time_s``;
    optional face box ``x0, y0, x1, y1``), image files and clips (sampled at ``fps``). The noise seed of
    every frame comes from the operating system's entropy unless ``seed`` is given (then from the seed
    and the frame's pixels) or ``noise_seeds`` names an earlier results file whose frames keep their
    recorded seeds.
    """

    bundle: Path = setting(positional=True, help="model bundle folder (model.json + weights.safetensors)")
    inputs: tuple[str, ...] = setting(
        positional=True, metavar="INPUT",
        help="folders of images and clips, manifest CSVs, image files or clips",
    )
    out: Path = setting(
        required=True, metavar="RESULTS.csv",
        help="results CSV, one row per frame; when it exists, its frames are skipped (the run continues "
        "it); problems go to RESULTS.problems.csv",
    )
    fps: float = setting(1.0, help="frames per second sampled from each clip")
    max_frames_per_clip: int | None = setting(
        None, zero_means_none=True, help="sample at most this many frames of each clip (0: no limit)"
    )
    seed: int | None = setting(
        None,
        help="seed of every frame's noise, for a reproducible experiment (each frame's seed is then a hash "
        "of the seed and its pixels); by default each frame's noise seed comes from the operating "
        "system's entropy, as deployed, and is recorded in its row",
    )
    noise_seeds: Path | None = setting(
        None, metavar="FROM.csv",
        help="reuse the noise seeds of an earlier results CSV: its frames get their recorded noise_seed "
        "again (the same certificates); other frames get seeds as usual",
    )
    method: str | None = setting(None, help="certification method (default: the bundle's)")
    sigma: float | None = setting(None, help="noise sigma (within the bundle's bounds)")
    alpha: float | None = setting(None, help="error probability (within the bundle's bounds)")
    n: int | None = setting(None, help="noise draws per frame (the budget for sequential certificates)")
    device: str = setting("auto", help="cpu, cuda, or auto (cuda when available; on Ray: on each worker)")
    chunk_frames: int = setting(
        32, help="frames per unit of work (one actor call) and per atomic rewrite of the results file"
    )
    progress: bool = setting(True, negated_by="--quiet", help="no progress bar")

    def __post_init__(self) -> None:
        self.bundle, self.out = Path(self.bundle), Path(self.out)
        if self.noise_seeds is not None:
            self.noise_seeds = Path(self.noise_seeds)
        self.inputs = tuple(str(value) for value in self.inputs)
        if not self.inputs:
            raise ValueError("painwatch predict needs at least one INPUT (folder, manifest, image or clip)")
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"--fps must be a positive number of frames per second, got {self.fps!r}")
        if self.max_frames_per_clip is not None:
            check_integer(self.max_frames_per_clip, "--max-frames-per-clip", minimum=1)
        check_integer(self.chunk_frames, "--chunk-frames", minimum=1)
        if self.out.suffix.lower() != ".csv":
            raise ValueError(f"--out must name a .csv file, got {str(self.out)!r}")

    @property
    def problems_file(self) -> Path:
        """Where the frames that could not be answered are listed: ``RESULTS.problems.csv``."""
        return self.out.with_suffix(".problems.csv")
