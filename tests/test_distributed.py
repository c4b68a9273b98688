"""Ray: LOIO folds as tasks, bulk prediction and certification on actors, the same results as locally,
and a worker killed mid-run whose work is retried. One local Ray with 2 CPUs serves the module.

The default run keeps one real Ray test (a fold's worker killed, the fold retried, every fold's logits
equal to a local run's, and no retry left: the error names the fold); ``-m slow`` runs the others."""

from __future__ import annotations

import json
import os
import signal
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from bulk_fixtures import write_archive, write_bundle, write_clip, write_frames_dataset
from safetensors.numpy import load_file

from painwatch.data import load_records, loio_folds, make_demo_dataset
from painwatch.evaluation.certify import measure, run_certification, shard_predictors
from painwatch.evaluation.distributed import concatenate_measurements, fold_results
from painwatch.evaluation.loio import run_fold, run_loio
from painwatch.evaluation.settings import CertifySettings, LoioSettings
from painwatch.inference import resolve_settings
from painwatch.inference.bulk import (
    ChunkWork,
    list_frames,
    load_predictor,
    make_chunks,
    predict_bulk,
    predict_chunk,
)
from painwatch.inference.bulk_settings import BulkSettings, DistributedSettings
from painwatch.inference.distributed import WorkerLostError, map_on_actors
from painwatch.models import read_metadata
from painwatch.training import TrainConfig

ON_RAY = DistributedSettings(ray="local")  # the module's Ray session is used as it is
TINY = TrainConfig(arch="test_resnet", input_size=32, batch_size=8, head_epochs=5)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_frames_dataset(tmp_path_factory.mktemp("ray") / "frames")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("ray") / "bundle")


def _loio(data: Path, out: Path) -> LoioSettings:
    return LoioSettings(data=str(data), out=str(out), train=TINY, cache_features=True,
                        inner_val_individuals=1, bootstrap_reps=50, progress=False)


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ LOIO
@pytest.mark.slow
def test_loio_on_ray_gives_the_local_predictions_and_metrics(
    ray_session, frames: Path, tmp_path: Path
) -> None:
    local = run_loio(_loio(frames, tmp_path / "local"), log=_quiet)
    messages: list[str] = []
    on_ray = run_loio(_loio(frames, tmp_path / "ray"), cluster=ON_RAY, log=messages.append)
    assert on_ray.complete and on_ray.folds_run_now == 4
    assert len([m for m in messages if m.startswith("fold ")]) == 4  # progress across folds on the driver
    predictions = [(tmp_path / run / "predictions.csv").read_bytes() for run in ("ray", "local")]
    assert predictions[0] == predictions[1]
    assert on_ray.metrics["evaluation"] == local.metrics["evaluation"]
    for fold in range(4):  # every fold's checkpoint and result.json, written by its Ray task
        assert (tmp_path / "ray" / "folds" / f"fold_{fold:02d}" / "head.safetensors").is_file()
        assert (tmp_path / "ray" / "folds" / f"fold_{fold:02d}" / "result.json").is_file()
    # --resume on Ray: nothing left to run, the same outputs.
    again = run_loio(_loio(frames, tmp_path / "ray"), resume=True, cluster=ON_RAY, log=_quiet)
    assert again.folds_run_now == 0 and again.metrics["evaluation"] == local.metrics["evaluation"]


def test_a_fold_whose_worker_dies_is_retried(ray_session, frames: Path, tmp_path: Path) -> None:
    reference = run_loio(_loio(frames, tmp_path / "reference"), log=_quiet)
    assert reference.complete
    settings = _loio(frames, tmp_path / "ray")
    records = load_records(frames)
    folds = loio_folds([r.individual for r in records], inner_val_individuals=1, seed=settings.train.seed)
    features = load_file(str(tmp_path / "reference" / "features.safetensors"))["features"]
    marker = tmp_path / "killed-once"

    def dies_on_its_first_attempt(settings, records, fold, **options):
        if fold.index == 1 and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-fold
        return run_fold(settings, records, fold, **options)

    (tmp_path / "ray").mkdir()
    results = list(fold_results(dies_on_its_first_attempt, records, folds, settings=settings,
                                run_dir=tmp_path / "ray", device="cpu", features=features, cluster=ON_RAY))
    assert marker.exists()  # fold 1 was killed once, then ran again
    assert sorted(r["fold"] for r in results) == [0, 1, 2, 3]
    for result in results:
        saved = tmp_path / "reference" / "folds" / f"fold_{result['fold']:02d}" / "result.json"
        assert result["test_logits"] == json.loads(saved.read_text())["test_logits"]  # as a local run

    marker.unlink()
    no_retries = DistributedSettings(ray="local", retries=0)
    with pytest.raises(WorkerLostError, match=r"fold 1 \(macaque_01\) lost its worker 1 time"):
        list(fold_results(dies_on_its_first_attempt, records, folds[:2], settings=settings,
                          run_dir=tmp_path / "ray", device="cpu", features=features, cluster=no_retries))


# ------------------------------------------------------------------------------------------ bulk frames
@pytest.mark.slow
def test_bulk_prediction_on_ray_gives_the_rows_of_a_local_run(
    ray_session, bundle: Path, tmp_path: Path
) -> None:
    archive = write_archive(tmp_path / "archive")
    common = {"bundle": bundle, "inputs": (str(archive),), "fps": 4, "n": 100, "seed": 0,
              "chunk_frames": 2, "device": "cpu", "progress": False}
    local = predict_bulk(BulkSettings(out=tmp_path / "local.csv", **common), log=_quiet)
    on_ray = predict_bulk(BulkSettings(out=tmp_path / "ray.csv", **common), cluster=ON_RAY, log=_quiet)
    assert on_ray.frames_answered == local.frames_answered == 13  # 3 faces + 10 clip frames
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert (tmp_path / "ray.problems.csv").read_bytes() == (tmp_path / "local.problems.csv").read_bytes()


@pytest.mark.slow
def test_an_actor_that_dies_is_restarted_and_its_work_done_again(
    ray_session, bundle: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "killed-once"

    def dies_on_its_first_call(predictor, work):  # defined here: Ray ships it by value
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the actor's process dies with work in hand
        return predict_chunk(predictor, work)

    clip = write_clip(tmp_path / "clip.avi")
    settings = BulkSettings(bundle=bundle, inputs=(str(clip),), out=tmp_path / "r.csv", fps=5, n=100,
                            seed=0, device="cpu", progress=False)
    listed, _ = list_frames(settings.inputs, fps=settings.fps)
    works = [ChunkWork(tuple(c), (None,) * len(c)) for c in make_chunks(listed, 3)]
    predictor = load_predictor(settings)
    expected = [predict_chunk(predictor, work).rows for work in works]
    got = dict(map_on_actors(partial(load_predictor, settings), dies_on_its_first_call, works,
                             cluster=DistributedSettings(ray="local", workers=1)))
    assert marker.exists()
    assert [got[i].rows for i in range(len(works))] == expected


# -------------------------------------------------------------------------------------- certification
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("ray") / "demo", individuals=3, frames_per_class=2,
                             image_size=48).parent


def test_measuring_in_shards_gives_the_measurements_of_one_go(bundle: Path, demo: Path) -> None:
    records = load_records(demo)[:5]
    main = resolve_settings(read_metadata(bundle).certification, n=100)
    predictors = shard_predictors(bundle, device="cpu", main=main, methods=[main.method], seed=0)
    options = {"main_method": main.method, "sigmas": [0.1, 0.25], "noise_draws": 4, "seed": 7,
               "progress": False}
    whole = measure(predictors, records, **options)
    shards = [measure(predictors, records[:2], **options),
              measure(predictors, records[2:], start=2, **options)]
    joined = concatenate_measurements(shards)
    assert joined.frames == whole.frames and joined.per_method == whole.per_method
    np.testing.assert_array_equal(joined.noise_correct, whole.noise_correct)
    np.testing.assert_array_equal(joined.corruption_correct, whole.corruption_correct)
    np.testing.assert_array_equal(np.asarray(joined.clean_probabilities),
                                  np.asarray(whole.clean_probabilities))
    assert (joined.forward_passes, joined.records, joined.sigmas) == (whole.forward_passes, whole.records,
                                                                      whole.sigmas)


@pytest.mark.slow
def test_certify_on_ray_gives_the_per_frame_results_of_a_local_run(
    ray_session, bundle: Path, demo: Path, tmp_path: Path
) -> None:
    common = {"bundle": bundle, "data": demo, "allow_overlap": True, "n": 100, "noise_sigmas": (0.1,),
              "noise_draws": 4, "bootstrap_reps": 20, "seed": 0, "device": "cpu", "progress": False,
              "write_bundle": False}
    local = run_certification(CertifySettings(out=tmp_path / "local", **common), warn=_quiet)
    on_ray = run_certification(CertifySettings(out=tmp_path / "ray", **common), warn=_quiet, cluster=ON_RAY)
    assert on_ray.report["frames"] == local.report["frames"]
    for key in ("network", "deployed", "certified_accuracy", "noise", "corruptions", "surface",
                "forward_passes"):
        assert on_ray.report[key] == local.report[key], key
    assert on_ray.passed == local.passed
