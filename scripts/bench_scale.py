"""Benchmark painwatch on Ray against a local run on the same machine, and the per-unit costs that
say what a cluster would give.

Measured in one run; each piece of work runs three ways: one process with one torch thread (the
compute of one Ray worker), one process with torch's default threads (what a plain run gets), and Ray
with ``--workers`` one-CPU workers (each with one thread, as Ray sets it):

1. A 21-fold ``--cache-features`` LOIO on the demo set (``painwatch demo-data data/demo``). Wall time
   of the whole run and of its fold phase (after the one feature extraction, which every run does on
   the driver, the Ray run with one thread); the per-fold cost; and a check that all give the same
   ``predictions.csv`` (byte for byte) and ``metrics.json`` "evaluation".
2. Bulk prediction (``painwatch predict``) of ``--frames`` held-out frames of the demo set with the
   demo bundle (``painwatch demo-bundle``) and ``--seed 0``; on Ray, actors that each load the bundle
   once. Wall time, the per-frame cost at the bundle's budget (1 000 forward passes), and a check that
   the results files are the same byte for byte.
3. ResNet50 at 224 px on this machine, with one thread and with the default threads: the cost of one
   forward pass (inference) and of one training image (forward, backward, AdamW step) per image, best
   of ``--repeats`` batches.

From these, ``bench.md`` tabulates the time of the clinical work on ``k`` one-core workers: 21 folds
of a ResNet50 fine-tuned for ``--study-epochs`` epochs on the demo set's sizes, and 10 000 frames x
1 000 forward passes, as ``ceil(21 / k)`` fold costs and ``10 000 / k`` frame costs (one-thread costs)
plus the measured Ray start-up. Usage (from the repository root; the machine is shared, so run it niced)::

    nice -n 5 python scripts/bench_scale.py --data data/demo --bundle data/demo-bundle --out results/scale
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download anything

import torch

from painwatch.evaluation.loio import run_loio
from painwatch.evaluation.settings import LoioSettings
from painwatch.inference.bulk import predict_bulk
from painwatch.inference.bulk_settings import BulkSettings, DistributedSettings
from painwatch.io import atomic_write_json, atomic_write_text
from painwatch.models import read_metadata
from painwatch.training import TrainConfig

CLINICAL_FOLDS = 21
CLINICAL_FRAMES = 10_000
CLINICAL_PASSES = 1_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="the demo set (manifest.csv)")
    parser.add_argument("--bundle", type=Path, default=Path("data/demo-bundle"), help="the demo bundle")
    parser.add_argument("--out", type=Path, default=Path("results/scale"), help="where bench.json/.md go")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (CPUs of the local Ray)")
    parser.add_argument("--arch", default="resnet18", help="backbone of the cached-feature LOIO")
    parser.add_argument("--input-size", type=int, default=64, help="input side of the LOIO backbone")
    parser.add_argument("--frames", type=int, default=40, help="held-out frames for bulk prediction")
    parser.add_argument("--resnet50-batch", type=int, default=16, help="batch of the ResNet50 timings")
    parser.add_argument("--repeats", type=int, default=3, help="ResNet50 batches timed (the best is kept)")
    parser.add_argument("--study-epochs", type=int, default=10, help="epochs of a ResNet50 LOIO fold")
    parser.add_argument("--device", default="cpu",
                        help="device of the ResNet50 per-unit costs (cuda on a GPU node: a GPU's costs)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    return parser


class _Clock:
    """Timestamps of log messages, to cut a run into phases."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.marks: list[tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        self.marks.append((time.perf_counter() - self.started, message))

    def first(self, prefix: str) -> float:
        return next(t for t, m in self.marks if m.startswith(prefix))

    def last(self, prefix: str) -> float:
        return [t for t, m in self.marks if m.startswith(prefix)][-1]


def _loio(args: argparse.Namespace, out: Path, cluster: DistributedSettings | None) -> dict[str, Any]:
    train = TrainConfig(arch=args.arch, input_size=args.input_size, batch_size=32, seed=0)
    settings = LoioSettings(data=str(args.data), out=str(out), train=train, cache_features=True,
                            bootstrap_reps=200, progress=False)
    clock = _Clock()
    outcome = run_loio(settings, log=clock, cluster=cluster)
    wall = time.perf_counter() - clock.started
    folds = outcome.metrics["folds"]
    features_done = clock.first("features ")
    return {"wall_s": wall, "fold_phase_s": clock.last("fold ") - features_done,
            "feature_extraction_s": outcome.metrics["timing"]["feature_extraction_seconds_this_call"],
            "folds": len(folds), "mean_fold_s": sum(f["seconds"] for f in folds) / len(folds),
            "evaluation": outcome.metrics["evaluation"]}


def _held_out_manifest(args: argparse.Namespace, path: Path) -> int:
    """A manifest of ``--frames`` frames of the individuals the demo bundle was not trained on, spread
    over individuals and classes (paths absolute, boxes kept)."""
    trained = set(read_metadata(args.bundle).training.get("individuals") or [])
    with open(args.data / "manifest.csv", encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["individual"] not in trained]
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["individual"], row["label"]), []).append(row)
    chosen: list[dict[str, str]] = []
    while len(chosen) < min(args.frames, len(rows)):
        for queue in groups.values():
            if queue and len(chosen) < args.frames:
                chosen.append(queue.pop(0))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "x0", "y0", "x1", "y1"], lineterminator="\n")
        writer.writeheader()
        for row in chosen:
            writer.writerow({"path": str((args.data / row["path"]).absolute()),
                             **{k: row[k] for k in ("x0", "y0", "x1", "y1")}})
    return len(chosen)


def _bulk(
    args: argparse.Namespace, manifest: Path, out: Path, cluster: DistributedSettings | None
) -> dict[str, Any]:
    settings = BulkSettings(bundle=args.bundle, inputs=(str(manifest),), out=out, seed=0, device="cpu",
                            chunk_frames=4, progress=False)
    started = time.perf_counter()
    outcome = predict_bulk(settings, cluster=cluster, log=lambda _: None)
    wall = time.perf_counter() - started
    with open(out, encoding="utf-8", newline="") as handle:
        passes = [int(row["forward_passes"]) for row in csv.DictReader(handle)]
    return {"wall_s": wall, "frames": outcome.frames_answered, "per_frame_s": wall / outcome.frames_answered,
            "median_forward_passes": sorted(passes)[len(passes) // 2], "problems": len(outcome.problems)}


def _resnet50_costs(args: argparse.Namespace, threads: int) -> dict[str, float]:
    """Seconds per image of a ResNet50 forward pass (inference) and of a training step, at 224 px."""
    import timm

    device = torch.device(args.device)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, num_classes=2).to(device)
    x = torch.rand(args.resnet50_batch, 3, 224, 224, device=device)
    y = torch.randint(0, 2, (args.resnet50_batch,), device=device)

    def wait() -> None:  # CUDA runs asynchronously: time the work, not its launch
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.eval()
    forward = []
    with torch.inference_mode():
        model(x[:2])  # warm-up
        for _ in range(args.repeats):
            wait()
            started = time.perf_counter()
            model(x)
            wait()
            forward.append((time.perf_counter() - started) / len(x))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = []
    for _ in range(args.repeats):
        wait()
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        wait()
        step.append((time.perf_counter() - started) / len(x))
    return {"forward_s_per_image": min(forward), "train_s_per_image": min(step),
            "batch": args.resnet50_batch, "torch_threads": threads, "device": str(device)}


def _machine() -> dict[str, Any]:
    import ray

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "nice": os.nice(0), "load_average_start": list(os.getloadavg()),
            "shared": "yes: other jobs ran on the same cores during the benchmark"}


def _projection(result: dict[str, Any], epochs: int) -> list[dict[str, Any]]:
    """The clinical work on k one-core workers, from the measured one-thread per-unit costs."""
    r50 = result["resnet50"]["one_thread"]
    # The demo set's fold sizes: 16 training, 4 validation individuals, 1 left out; 40 frames each.
    n_train, n_val, n_test = 16 * 40, 4 * 40, 40
    fold_s = epochs * (n_train * r50["train_s_per_image"] + n_val * r50["forward_s_per_image"]) \
        + n_test * r50["forward_s_per_image"]
    frame_s = CLINICAL_PASSES * r50["forward_s_per_image"]
    startup = result["ray_start_s"]
    result["clinical_units"] = {"resnet50_fold_s": fold_s, "resnet50_frame_s": frame_s, "epochs": epochs}
    return [{"workers": k, "loio_s": math.ceil(CLINICAL_FOLDS / k) * fold_s + startup,
             "frames_s": CLINICAL_FRAMES * frame_s / k + startup} for k in (1, 2, 4, 8, 21, 64)]


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} d"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _table(result: dict[str, Any], command: str) -> str:
    loio, bulk, machine = result["loio"], result["bulk"], result["machine"]
    units, r50 = result["clinical_units"], result["resnet50"]
    default = machine["torch_threads"]
    lines = [
        "# painwatch on Ray against one process (`scripts/bench_scale.py`)", "",
        f"Command: `{command}`  ", f"Date: {result['date']}  ",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, no GPU, Python "
        f"{machine['python']}, torch {machine['torch']}, ray {machine['ray']}; shared with other jobs "
        f"(load average {machine['load_average_start'][0]:.1f} at the start, "
        f"{result['load_average_end'][0]:.1f} at the end), run with nice {machine['nice']}.", "",
        f"Ray: a local Ray with {result['workers']} CPUs ({result['workers']} one-CPU workers, one torch "
        f"thread each), started in {result['ray_start_s']:.1f} s. Local runs: one process with 1 thread, "
        f"and with torch's default {default} threads.", "",
        f"| work | local, 1 thread | local, {default} threads | Ray, {result['workers']} workers | "
        f"ratio (1 thread / Ray) | ratio ({default} threads / Ray) | same outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, entry, key in (
        (f"LOIO, 21 folds, cached {result['arch']} features: whole run", loio, "wall_s"),
        ("LOIO fold phase (after the feature extraction)", loio, "fold_phase_s"),
        (f"bulk prediction, {bulk['ray']['frames']} frames x {bulk['ray']['median_forward_passes']} "
         "forward passes (demo bundle)", bulk, "wall_s"),
    ):
        one, many, ray = entry["local_1"][key], entry["local_default"][key], entry["ray"][key]
        same = entry["same_outputs"] if key == "wall_s" else ""
        lines.append(f"| {label} | {one:.1f} s | {many:.1f} s | {ray:.1f} s | {one / ray:.2f} | "
                     f"{many / ray:.2f} | {same} |")
    lines += [
        "", "Per-unit costs measured here:", "",
        f"- a cached-feature fold: {loio['local_1']['mean_fold_s']:.2f} s (1 thread), "
        f"{loio['local_default']['mean_fold_s']:.2f} s ({default} threads), "
        f"{loio['ray']['mean_fold_s']:.2f} s (in a one-CPU Ray task);",
        f"- a frame of the demo bundle at 1 000 forward passes: {bulk['local_1']['per_frame_s']:.2f} s "
        f"(1 thread), {bulk['local_default']['per_frame_s']:.2f} s ({default} threads), "
        f"{bulk['ray']['per_frame_s']:.2f} s of wall time per frame on Ray (actor start-up included);",
        f"- ResNet50 at 224 px on {r50['one_thread'].get('device', 'cpu')}: "
        f"{r50['one_thread']['forward_s_per_image'] * 1e3:.0f} ms per forward pass "
        f"and {r50['one_thread']['train_s_per_image'] * 1e3:.0f} ms per training image with 1 thread; "
        f"{r50['default']['forward_s_per_image'] * 1e3:.0f} ms and "
        f"{r50['default']['train_s_per_image'] * 1e3:.0f} ms with {default};",
        f"- hence, on one core, a ResNet50 LOIO fold ({units['epochs']} epochs, 640 training, 160 "
        f"validation, 40 test frames) takes {_duration(units['resnet50_fold_s'])}, and a frame at 1 000 "
        f"passes {units['resnet50_frame_s']:.0f} s.", "",
        "The clinical work on k one-core workers (ceil(21 / k) fold costs, or 10 000 / k frame costs, plus "
        "the Ray start-up); for a GPU cluster, substitute one GPU's per-unit costs, measured by this "
        "script on one GPU node:", "",
        "| workers k | 21 ResNet50 folds | 10 000 frames x 1 000 passes |", "|---|---|---|",
    ]
    lines += [f"| {row['workers']} | {_duration(row['loio_s'])} | {_duration(row['frames_s'])} |"
              for row in result["projection"]]
    return "\n".join(lines) + "\n"


def _same(paths: list[Path]) -> bool:
    return len({path.read_bytes() for path in paths}) == 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import ray

    if not (args.data / "manifest.csv").is_file():
        sys.exit(f"{args.data} has no manifest.csv: run `painwatch demo-data {args.data}` first")
    if not (args.bundle / "model.json").is_file():
        sys.exit(f"{args.bundle} is not a bundle: run "
                 f"`painwatch demo-bundle --data {args.data} --out {args.bundle}`")
    work = Path(args.work or tempfile.mkdtemp(prefix="painwatch-scale-"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    default_threads = torch.get_num_threads()
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(),
                              "workers": args.workers, "arch": args.arch, "input_size": args.input_size}
    cluster = DistributedSettings(ray="local")  # the session opened below is used as it is
    manifest = work / "held_out.csv"
    _held_out_manifest(args, manifest)
    runs: dict[str, dict[str, Any]] = {"loio": {}, "bulk": {}}
    for name, threads in (("local_1", 1), ("local_default", default_threads)):
        torch.set_num_threads(threads)
        print(f"local runs with {threads} thread(s) ...", file=sys.stderr)
        runs["loio"][name] = _loio(args, work / f"loio-{name}", None)
        runs["bulk"][name] = _bulk(args, manifest, work / f"bulk-{name}.csv", None)
    torch.set_num_threads(1)  # the driver's feature extraction as in the one-thread run
    started = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
    result["ray_start_s"] = time.perf_counter() - started
    try:
        print("Ray runs ...", file=sys.stderr)
        runs["loio"]["ray"] = _loio(args, work / "loio-ray", cluster)
        runs["bulk"]["ray"] = _bulk(args, manifest, work / "bulk-ray.csv", cluster)
    finally:
        ray.shutdown()
    print("ResNet50 costs ...", file=sys.stderr)
    result["resnet50"] = {"one_thread": _resnet50_costs(args, 1),
                          "default": _resnet50_costs(args, default_threads)}
    names = ("local_1", "local_default", "ray")
    evaluations = [runs["loio"][name].pop("evaluation") for name in names]
    result["loio"] = {**runs["loio"], "same_outputs": bool(
        _same([work / f"loio-{name}" / "predictions.csv" for name in names])
        and all(evaluation == evaluations[0] for evaluation in evaluations))}
    result["bulk"] = {**runs["bulk"], "same_outputs": _same([work / f"bulk-{name}.csv" for name in names])}
    for entry in (result["loio"], result["bulk"]):
        entry["ratio_1_thread_over_ray"] = entry["local_1"]["wall_s"] / entry["ray"]["wall_s"]
        entry["ratio_default_threads_over_ray"] = entry["local_default"]["wall_s"] / entry["ray"]["wall_s"]
    result["load_average_end"] = list(os.getloadavg())
    result["projection"] = _projection(result, args.study_epochs)
    result["command"] = ("python scripts/bench_scale.py " + " ".join(argv if argv is not None
                                                                     else sys.argv[1:])).strip()
    atomic_write_json(args.out / "bench.json", result)
    atomic_write_text(args.out / "bench.md", _table(result, result["command"]))
    print(_table(result, result["command"]))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
