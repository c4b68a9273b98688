"""LOIO folds and certification frames on Ray (docs/design.md, "Beyond one machine").

:func:`fold_results` runs the folds of a LOIO evaluation one after the other here, or as Ray tasks that
ask for ``--fold-cpus`` / ``--fold-gpus`` each; :func:`measure_on_cluster` shares the frames of a
certification over Ray actors that each load the bundle once. Neither changes a result: a fold depends
only on its seed and the data, a frame's measurements only on the seeds and its position (the callers
guarantee it), so a Ray run gives the predictions and measurements of a local run with the same
settings. The functions they run (``run_fold``, ``measure``) are handed in, so this module imports
neither :mod:`painwatch.evaluation.loio` nor :mod:`painwatch.evaluation.certify`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from painwatch.data import FrameRecord
from painwatch.data.splits import Fold
from painwatch.evaluation.settings import LoioSettings
from painwatch.inference.bulk_settings import DistributedSettings
from painwatch.inference.distributed import map_on_actors, run_tasks
from painwatch.runtime import resolve_device

CERTIFY_SHARD_FRAMES = 4
"""Frames per actor call when certifying on Ray: a frame costs thousands of forward passes, so small
shards keep every actor busy to the end at no noticeable overhead."""

#: Measurements fields that are the same in every shard (checked) and fields that add up; every other
#: field holds one entry per frame and is joined in frame order.
_PER_RUN_FIELDS = ("sigmas", "noise_draws")
_SUMMED_FIELDS = ("forward_passes",)


def _fold_task(
    run_fold: Callable[..., dict[str, Any]],
    settings: LoioSettings,
    records: Sequence[FrameRecord],
    fold: Fold,
    *,
    run_dir: Path,
    device: str,
    features: np.ndarray | None,
    descriptors: tuple[Any, dict[str, np.ndarray]] | None,
) -> dict[str, Any]:
    # The device is resolved on the worker: "auto" is the GPU Ray gave this task, if any.
    return run_fold(settings, records, fold, run_dir=run_dir, device=str(resolve_device(device)),
                    features=features, descriptors=descriptors)


def fold_results(
    run_fold: Callable[..., dict[str, Any]],
    records: Sequence[FrameRecord],
    folds: Sequence[Fold],
    *,
    settings: LoioSettings,
    run_dir: Path,
    device: str,
    features: np.ndarray | None,
    descriptors: tuple[Any, dict[str, np.ndarray]] | None = None,
    cluster: DistributedSettings | None = None,
    log: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """The result of ``run_fold(settings, records, fold, run_dir=..., device=..., features=...,
    descriptors=...)`` for every fold: here in fold order, or (``cluster.enabled``) as Ray tasks in the
    order they finish.

    On Ray each fold is a task asking for ``cluster.fold_cpus`` CPUs and ``cluster.fold_gpus`` GPUs,
    retried when its worker dies (:mod:`painwatch.inference.distributed`); the records, the cached
    features and the in-distribution descriptors go into Ray's object store once; the device is
    ``settings.train.device`` as the worker sees it (``device``, resolved on this machine, is used only
    here). ``run_fold`` writes the fold's checkpoint and ``result.json`` on the worker, so the run folder
    should be on storage every node shares.
    """
    if cluster is None or not cluster.enabled:
        for fold in folds:
            yield run_fold(settings, records, fold, run_dir=run_dir, device=device, features=features,
                           descriptors=descriptors)
        return
    yield from run_tasks(
        _fold_task,
        [{"fold": fold} for fold in folds],
        shared={"run_fold": run_fold, "settings": settings, "records": list(records), "run_dir": run_dir,
                "device": settings.train.device, "features": features,
                "descriptors": descriptors},
        cluster=cluster,
        num_cpus=cluster.fold_cpus,
        num_gpus=cluster.fold_gpus,
        describe=lambda call: f"fold {call['fold'].index} ({call['fold'].test_individual})",
        log=log,
    )


def concatenate_measurements(parts: Sequence[Any]) -> Any:
    """The measurements of consecutive shards of frames as one, as if measured in one go: per-frame
    fields (lists, arrays by rows, mappings of lists) joined in order, forward passes added, the
    per-run fields (sigmas, noise draws) checked to agree."""
    first = parts[0]
    values: dict[str, Any] = {}
    for field in dataclasses.fields(first):
        items = [getattr(part, field.name) for part in parts]
        if field.name in _PER_RUN_FIELDS:
            if any(item != items[0] for item in items):
                raise ValueError(f"shards disagree on {field.name}: {items}")
            values[field.name] = items[0]
        elif field.name in _SUMMED_FIELDS:
            values[field.name] = sum(items)
        elif all(item is None for item in items):
            values[field.name] = None
        elif isinstance(items[0], np.ndarray):
            values[field.name] = np.concatenate(items, axis=0)
        elif isinstance(items[0], Mapping):
            values[field.name] = {key: [entry for item in items for entry in item[key]] for key in items[0]}
        else:
            values[field.name] = [entry for item in items for entry in item]
    return type(first)(**values)


def _measure_shard(
    predictors: Any, shard: tuple[int, list[FrameRecord]], *, measure: Callable[..., Any],
    options: Mapping[str, Any],
) -> Any:
    start, records = shard
    return measure(predictors, records, start=start, progress=False, **options)


def measure_on_cluster(
    measure: Callable[..., Any],
    make_predictors: Callable[[], Any],
    records: Sequence[FrameRecord],
    *,
    cluster: DistributedSettings,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Any:
    """``measure(predictors, records, **options)`` with the frames shared over Ray actors.

    Each actor builds its predictors once with ``make_predictors()`` (loading the bundle on the GPU Ray
    gave it, if any) and measures consecutive shards of :data:`CERTIFY_SHARD_FRAMES` frames, each told
    its first frame's position (``start``), so that its seeds are those of a run in one go; the shards
    are joined in frame order (:func:`concatenate_measurements`).
    """
    shards = [(start, list(records[start:start + CERTIFY_SHARD_FRAMES]))
              for start in range(0, len(records), CERTIFY_SHARD_FRAMES)]
    work = partial(_measure_shard, measure=measure, options=options)
    parts: dict[int, Any] = {}
    with tqdm(total=len(records), desc="certifying", unit="frame", disable=not progress,
              file=sys.stderr) as bar:
        for index, part in map_on_actors(make_predictors, work, shards, cluster=cluster, log=log):
            parts[index] = part
            bar.update(len(shards[index][1]))
    if not parts:
        raise ValueError("there are no frames to certify")
    return concatenate_measurements([parts[index] for index in sorted(parts)])


