"""A small demo bundle for trying the page: train on most individuals, certify on the others.

:func:`build_demo_bundle` trains a small backbone (fast on a CPU) on most individuals of the data with
Gaussian noise augmentation (:func:`painwatch.training.bundle.train_bundle`), then certifies it on the
held-out individuals with the default gate (:func:`painwatch.evaluation.certify.run_certification`) and
writes the verdict into the bundle, so the page can show a real gate status. The certification report
goes next to the bundle (``BUNDLE-report/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from painwatch.data import held_out_individuals, is_synthetic, load_records
from painwatch.evaluation.certify import CertificationRun, run_certification
from painwatch.evaluation.settings import CertifySettings, DemoSettings
from painwatch.training.bundle import TrainedBundle, train_bundle


@dataclass(frozen=True)
class DemoBundle:
    """What :func:`build_demo_bundle` made: the trained bundle, the held-out individuals, the gate run."""

    trained: TrainedBundle
    held_out: list[str]
    certification: CertificationRun


def build_demo_bundle(
    settings: DemoSettings, *, log: Callable[[str], None] = lambda message: None
) -> DemoBundle:
    """Train, certify and record the verdict (whatever it is: a demo model trained in a minute on
    synthetic frames may well fail the deployment gate).

    Raises ``ValueError`` (bad data, settings, an existing non-bundle output folder) before training,
    and ``FloatingPointError`` when training diverges.
    """
    records = load_records(settings.data)
    evaluation = held_out_individuals([r.individual for r in records], settings.held_out, settings.seed)
    training = [r for r in records if r.individual not in set(evaluation)]
    config = settings.train_config()
    log(
        f"demo bundle: training {config.arch} ({config.input_size} px, {config.epochs} epochs, noise sigma "
        f"{config.noise_sigma}) on {len({r.individual for r in training})} individuals; certifying on "
        f"{', '.join(evaluation)}"
    )
    trained = train_bundle(training, config, settings.out, data_source=str(settings.data),
                           synthetic=is_synthetic(settings.data), progress=settings.progress, log=log)
    run = run_certification(CertifySettings(
        bundle=settings.out, data=settings.data, out=settings.out.parent / f"{settings.out.name}-report",
        gate=settings.gate, individuals=tuple(evaluation), max_frames=settings.max_frames, n=settings.n,
        noise_draws=8, bootstrap_reps=500, seed=settings.seed, progress=settings.progress,
        main_method_only=True,
    ))
    return DemoBundle(trained=trained, held_out=evaluation, certification=run)
