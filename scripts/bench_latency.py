"""Benchmark the veterinarian's wait: the first answer, the certificate, and forward passes per second.

Measured in one run on this machine, with a fixed thread count (``--threads``) and a fixed batch of
noisy copies (``--batch``), for a random-init ``--arch`` at ``--input-size`` px (timing does not depend
on the weights) in a bundle with the default certification settings (``n0 + n`` = 1 000 passes) and an
in-distribution check fitted on ``--check-frames`` random frames (as every new bundle carries one, so
the first answer includes the check, whose descriptors the answer's own pass of the engine reads):

- ``bare_passes_per_s``: a bare fp32 timm ``model(x)`` loop on batches of ``--batch`` (NCHW,
  ``torch.no_grad``), the baseline, timed before and after the rest (the median of both, so that a
  change of the machine's load during the run weighs on both sides of the ratio);
- ``engines``: images per second of every runtime and precision this machine has (torch or OpenVINO,
  fp32 or bf16, channels_last for torch), each through :class:`painwatch.inference.engine.Engine`;
- ``first_answer_s``: median seconds from a frame (``H x W x 3`` uint8) to its class, calibrated
  confidence and in-distribution refusal (:meth:`painwatch.inference.Predictor.answer`) with the engine
  the page uses; ``first_answer_engine_s`` the engine's clean pass alone (logits only), and
  ``first_answer_two_passes_s`` the former way, the engine's pass then a second pass of the fp32
  network for the check's descriptors, and ``bare_one_image_s`` a bare fp32 ``model(x)`` on one image
  (the machine's load at that moment);
- ``certificate_s``: median seconds to a frame's certificate at the default budget
  (:meth:`~painwatch.inference.Predictor.certify_steps`), over ``--frames`` frames, and
  ``passes_per_s`` (forward passes per second while certifying them);
- ``bf16_disagreement``: how often the bf16 engine's class differs from the fp32 network's on
  ``--random-inputs`` random inputs (and, with ``--demo-bundle`` and ``--demo-data``, on the demo set's
  frames of the individuals that bundle was not trained on); with those, ``refusal``: how often the
  in-distribution check's refusal from the bf16 engine's descriptors (read in the answer's own pass)
  differs from the refusal from the fp32 network's descriptors (on which the threshold was set), on
  the held-out face crops and the pictures that are not face crops of ``scripts/bench_ood.py``.

``load`` records the machine's load average before and after. Usage (from the repository root; the
machine is shared, so run it niced)::

    nice -n 5 python scripts/bench_latency.py --out results/latency \\
        --demo-bundle data/demo-bundle --demo-data data/demo
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download anything

import numpy as np
import torch
from bench_ood import non_face_groups  # this folder's script: the pictures that are not face crops

from painwatch.calibration import calibrated_probabilities
from painwatch.data import eval_transform, load_records, read_image
from painwatch.inference import Predictor
from painwatch.inference.engine import (
    PRECISIONS,
    RUNTIMES,
    EngineError,
    choose_engine,
    make_engine,
)
from painwatch.io import atomic_write_json
from painwatch.models import create_model, default_certification, save_bundle
from painwatch.models.in_distribution import (
    InDistributionSpec,
    default_layers,
    descriptor_pass,
    fit_in_distribution,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenVINO threads (fixed)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=4, help="timed batches per engine")
    parser.add_argument("--answers", type=int, default=7, help="frames timed for the first answer")
    parser.add_argument("--frames", type=int, default=2, help="frames certified at the full budget")
    parser.add_argument("--random-inputs", type=int, default=64, help="random inputs for bf16 vs fp32")
    parser.add_argument("--check-frames", type=int, default=40,
                        help="random frames the in-distribution check is fitted on (as many calibrate it)")
    parser.add_argument("--demo-bundle", type=Path, default=None)
    parser.add_argument("--demo-data", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("results/latency"))
    return parser


def _load() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def _machine(device: torch.device) -> dict[str, Any]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if "model name" in line), "")
    machine = {"platform": platform.platform(), "processor": model or platform.processor(),
               "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
               "torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return machine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_frames(rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    """Random uint8 RGB frames a little larger than the model's input (the transform crops them)."""
    return [rng.integers(0, 256, (size + 32, size + 48, 3), dtype=np.uint8) for _ in range(count)]


def random_check(model: torch.nn.Module, frames: int, size: int, batch: int) -> Any:
    """An in-distribution check of ``model`` fitted on ``frames`` random frames and calibrated on as many
    others, of the kind the benchmark then answers and certifies (timing does not depend on what the
    check was fitted on, but a refused frame would not be certified)."""
    spec = InDistributionSpec(layers=default_layers(model))
    transform = eval_transform(size)
    rng = np.random.default_rng(1)

    def descriptors() -> dict[str, np.ndarray]:
        images = torch.stack([transform(frame) for frame in random_frames(rng, frames, size)])
        parts = [descriptor_pass(model, images[start:start + batch], spec.layers)[1]
                 for start in range(0, frames, batch)]
        return {layer: np.concatenate([part[layer] for part in parts]) for layer in parts[0]}

    fit = descriptors()
    return fit_in_distribution(fit, [f"m{i % 4}" for i in range(frames)], descriptors(), spec=spec)


def bare_one_image_s(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> list[float]:
    """Seconds of a bare fp32 ``model(x)`` on one image, one time per repeat (after a warm-up)."""
    times = []
    with torch.no_grad():
        model(image)
        for _ in range(repeats):
            _sync(image.device)
            began = time.perf_counter()
            model(image)
            _sync(image.device)
            times.append(time.perf_counter() - began)
    return times


def bare_rates(model: torch.nn.Module, batch: torch.Tensor, repeats: int) -> list[float]:
    """Images per second of a bare fp32 ``model(x)`` loop (NCHW), one rate per batch of ``repeats``."""
    rates = []
    with torch.no_grad():
        model(batch)  # warm-up
        for _ in range(repeats):
            _sync(batch.device)
            began = time.perf_counter()
            model(batch)
            _sync(batch.device)
            rates.append(batch.shape[0] / (time.perf_counter() - began))
    return rates


def engine_passes_per_s(engine: Any, batch: torch.Tensor, repeats: int) -> float:
    """Images per second of ``engine`` on ``batch``, the median of ``repeats`` batches after a warm-up."""
    engine(batch)
    rates = []
    for _ in range(repeats):
        _sync(batch.device)
        began = time.perf_counter()
        engine(batch)
        _sync(batch.device)
        rates.append(batch.shape[0] / (time.perf_counter() - began))
    return statistics.median(rates)


def _held_out_frames(bundle: Path, data: Path) -> list[np.ndarray]:
    """The demo set's face crops of the individuals ``bundle`` was not trained on."""
    metadata = Predictor.load(bundle, seed=0, runtime="torch", precision="fp32").metadata
    trained = set(metadata.training.get("individuals") or [])
    with (data / "manifest.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["individual"] not in trained]
    frames = []
    for row in rows:  # the face crop the manifest gives, as the held-out evaluation sees it
        x0, y0, x1, y1 = (int(row[key]) for key in ("x0", "y0", "x1", "y1"))
        frames.append(np.ascontiguousarray(read_image(data / row["path"])[y0:y1, x0:x1]))
    return frames


def _engine_probabilities(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """The calibrated probabilities of one clean pass of ``predictor``'s engine (no in-distribution check)."""
    x = predictor.preprocess(image).unsqueeze(0).to(predictor.device)
    logits = predictor.engine.answer(x).detach().to("cpu", torch.float64).numpy()
    return calibrated_probabilities(logits, predictor.temperature)[0]


def disagreement(fp32: Predictor, low: Predictor, images: list[np.ndarray]) -> dict[str, Any]:
    """How often ``low``'s clean class differs from ``fp32``'s, and the largest confidence gap."""
    differ, gap = 0, 0.0
    for image in images:
        a, b = _engine_probabilities(fp32, image), _engine_probabilities(low, image)
        differ += int(a.argmax() != b.argmax())
        gap = max(gap, float(abs(a[a.argmax()] - b[a.argmax()])))
    return {"frames": len(images), "differ": differ, "share": differ / max(len(images), 1),
            "max_confidence_gap": gap, "engine": low.engine.name}


def refusal_disagreement(
    fp32: Predictor, low: Predictor, groups: dict[str, list[np.ndarray]]
) -> dict[str, Any]:
    """How often the in-distribution refusal of ``low``'s answer (scored on the descriptors its engine
    reads in the answer's pass) differs from the refusal scored on the fp32 network's descriptors
    (:func:`descriptor_pass`, those the threshold was set on), per group of pictures; every frame whose
    decision differs is listed with both scores."""
    check = low.in_distribution
    if check is None:
        raise SystemExit(f"{low.bundle_path} has no in-distribution check to compare")
    layers = check.spec.descriptors
    report: dict[str, Any] = {"threshold": float(check.threshold), "engine": low.engine.name, "groups": {}}
    cases, largest_gap, nearest = [], 0.0, math.inf
    for group, images in groups.items():
        counts = {"frames": len(images), "differ": 0, "refused_fp32": 0, "refused_engine": 0}
        for index, image in enumerate(images):
            x = fp32.preprocess(image, f"{group} #{index}")
            _, descriptors = descriptor_pass(fp32.model, x.unsqueeze(0), layers)
            reference = float(check.scores(descriptors)[0])
            answer = low.answer_tensor(x)
            score = float(answer.in_distribution_score)
            refused_reference, refused = low.refuses(reference), low.refuses(score)
            counts["refused_fp32"] += int(refused_reference)
            counts["refused_engine"] += int(refused)
            largest_gap = max(largest_gap, abs(score - reference))
            nearest = min(nearest, abs(reference - check.threshold))
            if refused != refused_reference:
                counts["differ"] += 1
                cases.append({"group": group, "index": index, "fp32_score": reference, "engine_score": score})
        report["groups"][group] = counts
    report["frames"] = sum(g["frames"] for g in report["groups"].values())
    report["differ"] = len(cases)
    report["max_score_gap"] = largest_gap
    report["nearest_fp32_score_to_threshold"] = nearest
    report["differing_frames"] = cases
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = _load()
    began_run = time.perf_counter()
    size = args.input_size
    model = create_model(args.arch, num_classes=2, input_size=size, seed=0).eval().to(device)
    shape = (3, size, size)
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand((args.batch, *shape), generator=generator).to(device)

    bare_before = bare_rates(model, batch, args.repeats)
    one_before = bare_one_image_s(model, batch[:1], args.repeats)
    print(f"bare fp32 model(x): {statistics.median(bare_before):.2f} images/s", flush=True)
    engines: dict[str, float] = {}
    for runtime in RUNTIMES:
        for precision in PRECISIONS:
            try:
                choose_engine(device, runtime=runtime, precision=precision)
            except EngineError as error:
                print(f"{runtime}-{precision}: not here ({error})", flush=True)
                continue
            engine = make_engine(model, shape, runtime=runtime, precision=precision, pass_rows=args.batch)
            engines[engine.name] = engine_passes_per_s(engine, batch, args.repeats)
            print(f"{engine.name}: {engines[engine.name]:.2f} images/s", flush=True)
            del engine

    with tempfile.TemporaryDirectory() as scratch:
        training = {"individuals": ["bench"], "num_frames": 0, "loss": "ce", "noise_sigma": None, "epochs": 0}
        certification = {**default_certification(None), "batch_size": args.batch}
        check = random_check(model.cpu(), args.check_frames, size, args.batch)
        folder = save_bundle(Path(scratch) / "bundle", model.cpu(),
                             {"training": training, "certification": certification}, in_distribution=check)
        model.to(device)
        loaded = time.perf_counter()
        predictor = Predictor.load(folder, seed=0, device=device)
        load_s = time.perf_counter() - loaded
        reference = Predictor.load(folder, seed=0, device=device, runtime="torch", precision="fp32")
        rng = np.random.default_rng(0)
        frames = random_frames(rng, max(args.answers, args.frames), size)
        answer_passes = predictor.answer(frames[:1])[0].forward_passes  # warm-up of the one-image pass
        answer_times, engine_times, two_pass_times = [], [], []
        for frame in frames[:args.answers]:
            began = time.perf_counter()
            predictor.answer([frame])
            answer_times.append(time.perf_counter() - began)
            began = time.perf_counter()
            _engine_probabilities(predictor, frame)  # the class and confidence alone, without the check
            engine_times.append(time.perf_counter() - began)
            began = time.perf_counter()  # the former way: the engine's pass, then the fp32 network's
            _engine_probabilities(predictor, frame)
            two_pass = predictor.preprocess(frame).unsqueeze(0).to(device)
            descriptor_pass(predictor.model, two_pass, predictor.in_distribution.spec.descriptors)
            two_pass_times.append(time.perf_counter() - began)
        print(f"first answer: median {statistics.median(answer_times):.3f} s", flush=True)
        certificate_times, passes, stops = [], 0, []
        certify_began = time.perf_counter()
        for index, frame in enumerate(frames[:args.frames]):
            began = time.perf_counter()
            (result,) = predictor.predict([frame], names=[f"frame-{index}"])
            certificate_times.append(time.perf_counter() - began)
            passes += result.forward_passes
            stops.append(result.stop_reason)
            print(f"certificate {index}: {certificate_times[-1]:.1f} s, {result.forward_passes} passes, "
                  f"stop {result.stop_reason}, {result.abstain_code or 'answered'}", flush=True)
            if result.abstain_code == "not_like_training_frames":
                raise SystemExit("the in-distribution check refused a benchmark frame: nothing was certified")
        passes_per_s = passes / (time.perf_counter() - certify_began)
        bare_after = bare_rates(model, batch, args.repeats)
        one_after = bare_one_image_s(model, batch[:1], args.repeats)
        bare = statistics.median(bare_before + bare_after)
        print(f"bare fp32 model(x) again: {statistics.median(bare_after):.2f} images/s", flush=True)
        inputs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(args.random_inputs)]
        precision = {"random_inputs": disagreement(reference, predictor, inputs)}
        settings = predictor.settings.to_dict()
        engine_name = predictor.engine.name
    if args.demo_bundle is not None and args.demo_data is not None:
        fp32 = Predictor.load(args.demo_bundle, seed=0, runtime="torch", precision="fp32")
        low = Predictor.load(args.demo_bundle, seed=0)
        held_out = _held_out_frames(args.demo_bundle, args.demo_data)
        precision["demo_held_out"] = {**disagreement(fp32, low, held_out),
                                      "bundle_architecture": fp32.metadata.architecture,
                                      "bundle_input_size": fp32.metadata.input_size}
        print(f"bf16 vs fp32 on {len(held_out)} held-out demo frames: {precision['demo_held_out']['differ']} "
              "differ", flush=True)
        trained = set(fp32.metadata.training.get("individuals") or [])
        held_out_records = [r for r in load_records(args.demo_data) if r.individual not in trained]
        groups = {"held-out face crops": held_out, **non_face_groups(held_out_records, seed=0)}
        precision["refusal"] = refusal_disagreement(fp32, low, groups)
        refusal = precision["refusal"]
        print(f"in-distribution refusal, bf16 engine vs fp32 descriptors: {refusal['differ']} of "
              f"{refusal['frames']} decisions differ", flush=True)
    figures = {
        "arch": args.arch, "input_size": size, "threads": args.threads, "batch": args.batch,
        "engine": engine_name, "load_s": load_s,
        "first_answer_s": statistics.median(answer_times), "first_answer_times_s": answer_times,
        "first_answer_engine_s": statistics.median(engine_times),
        "first_answer_two_passes_s": statistics.median(two_pass_times),
        "bare_one_image_s": statistics.median(one_before + one_after),
        "certificate_s": statistics.median(certificate_times), "certificate_times_s": certificate_times,
        "certified_frames": len(certificate_times), "stop_reasons": stops,
        "passes_per_s": passes_per_s, "bare_passes_per_s": bare,
        "bare_passes_per_s_before": statistics.median(bare_before),
        "bare_passes_per_s_after": statistics.median(bare_after), "answer_passes": answer_passes,
        "in_distribution_check": True,
        "speedup": passes_per_s / bare, "engines": engines, "certification": settings,
        "bf16_disagreement": precision, "machine": _machine(device),
        "load": {"before": load_before, "after": _load()},
        "run_s": time.perf_counter() - began_run,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python scripts/bench_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench.json", figures)
    print(f"first_answer_s {figures['first_answer_s']:.3f}, certificate_s {figures['certificate_s']:.1f}, "
          f"passes_per_s {passes_per_s:.2f} = {figures['speedup']:.2f} x bare {bare:.2f}; "
          f"wrote {args.out / 'bench.json'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
