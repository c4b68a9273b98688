"""Spreading bulk work over a Ray cluster [Moritz18]: tasks that ask for resources and are retried when
their worker dies, and pools of actors that build their state (a loaded bundle) once.

Ray is imported only when a run asks for it (:class:`~painwatch.inference.bulk_settings.DistributedSettings`
with ``ray`` set); without it nothing here runs and ``ray`` is never imported. Callers keep their own
guarantees because every piece of work is a pure function of its inputs and seeds:

- which worker ran a piece, and in which order the pieces finished, does not change its result;
- a piece whose worker process dies (killed, out of memory, node lost) runs again: Ray's
  ``max_retries`` for tasks, ``max_restarts`` / ``max_task_retries`` for actors, up to
  ``DistributedSettings.retries`` times; beyond that :class:`WorkerLostError` says which piece;
- an exception raised by the work itself is not retried (it would happen again): the pieces not yet
  finished are cancelled and the exception is raised on the driver as its own class, so callers and the
  command line treat it as they would in a local run;
- every worker works in the driver's working folder when that folder exists on its node, so relative
  paths mean the same there; on a cluster, data and outputs must sit at the same paths on every node
  (shared storage), and every node needs the same painwatch version.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from painwatch.inference.bulk_settings import LOCAL_RAY, DistributedSettings

__all__ = ["ClusterError", "WorkerLostError", "import_ray", "map_on_actors", "ray_session", "run_tasks"]


class ClusterError(RuntimeError):
    """Ray cannot be used for this run: it is not installed, the cluster cannot be started or joined,
    or it lacks the resources one piece of work asks for."""


class WorkerLostError(RuntimeError):
    """A piece of work lost its worker process more often than ``DistributedSettings.retries`` allows."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or :class:`ClusterError` saying how to install it."""
    try:
        import ray
    except ImportError as error:
        raise ClusterError(
            f"--ray needs the ray package ({error}); install it with pip install 'painwatch[ray]'"
        ) from error
    return ray


@contextlib.contextmanager
def ray_session(
    cluster: DistributedSettings, *, log: Callable[[str], None] | None = None
) -> Iterator[ModuleType]:
    """Ray, connected for the duration of the block.

    A Ray session already open in this process (a notebook's, a test's) is used as it is and left open;
    otherwise ``cluster.ray`` is :data:`~painwatch.inference.bulk_settings.LOCAL_RAY` (start Ray on this
    machine, without its dashboard) or an address to join, and the session is closed afterwards.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if cluster.ray == LOCAL_RAY:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=cluster.ray, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"cannot start or join Ray at {cluster.ray!r}: {error}") from error
    try:
        if log is not None:
            resources = ray.cluster_resources()
            log(f"Ray {'on this machine' if cluster.ray == LOCAL_RAY else 'at ' + str(cluster.ray)}: "
                f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        yield ray
    finally:
        ray.shutdown()


def _enter(folder: str) -> None:
    # The driver's working folder, where it exists on this node: relative paths then mean the same.
    if os.path.isdir(folder):
        os.chdir(folder)


def _run_in_folder(function: Callable[..., Any], folder: str, call: Mapping[str, Any], **shared: Any) -> Any:
    _enter(folder)
    return function(**shared, **call)


def _result(ray: ModuleType, ref: Any, what: str, retries: int) -> Any:
    """The value of ``ref``; the work's own exception as itself, a lost worker as WorkerLostError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from error
        raise
    except ray.exceptions.RayError as error:
        raise WorkerLostError(
            f"{what} lost its worker {retries + 1} time(s), more than --retries {retries} allows: {error}"
        ) from error


def run_tasks(
    function: Callable[..., Any],
    calls: Sequence[Mapping[str, Any]],
    *,
    shared: Mapping[str, Any],
    cluster: DistributedSettings,
    num_cpus: float,
    num_gpus: float,
    describe: Callable[[Mapping[str, Any]], str] = lambda call: "a task",
    log: Callable[[str], None] | None = None,
) -> Iterator[Any]:
    """``function(**shared, **call)`` for every call, each a Ray task asking for ``num_cpus`` CPUs and
    ``num_gpus`` GPUs; yields the results as the tasks finish (in any order).

    ``shared`` values go into Ray's object store once and reach every task (large arrays are not copied
    per task). ``function`` must be importable by name on the workers (a module-level function of
    painwatch, or a partial of one) or picklable by value. See the module docstring for retries and
    errors; ``describe(call)`` names a piece of work in messages.
    """
    with ray_session(cluster, log=log) as ray:
        remote = ray.remote(_run_in_folder).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=cluster.retries, retry_exceptions=False
        )
        folder = os.getcwd()
        stored = {name: ray.put(value) for name, value in shared.items()}
        running = {remote.remote(function, folder, call, **stored): call for call in calls}
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                call = running.pop(done[0])
                yield _result(ray, done[0], describe(call), cluster.retries)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


class _Worker:
    """A Ray actor's body: builds its state once, then applies work to items."""

    def __init__(self, make_state: Callable[[], Any], folder: str) -> None:
        _enter(folder)
        self.state = make_state()

    def run(self, work: Callable[[Any, Any], Any], item: Any) -> Any:
        return work(self.state, item)


def _actor_shape(
    resources: Mapping[str, float], cluster: DistributedSettings, items: int
) -> tuple[int, float]:
    """How many actors to start and the GPUs each asks for, within what the cluster has."""
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    per_actor_gpus = cluster.worker_gpus if cluster.worker_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if per_actor_gpus > gpus:
        raise ClusterError(f"--worker-gpus {per_actor_gpus:g}: the Ray cluster has {gpus:g} GPUs")
    if cluster.worker_cpus > cpus:
        raise ClusterError(f"--worker-cpus {cluster.worker_cpus:g}: the Ray cluster has {cpus:g} CPUs")
    # Actors hold their resources while they live: more than fit would wait forever with work assigned.
    fit = math.floor(cpus / cluster.worker_cpus + 1e-9)
    if per_actor_gpus > 0:
        fit = min(fit, math.floor(gpus / per_actor_gpus + 1e-9))
    wanted = cluster.workers if cluster.workers is not None else fit
    return max(1, min(wanted, fit, items)), per_actor_gpus


def map_on_actors(
    make_state: Callable[[], Any],
    work: Callable[[Any, Any], Any],
    items: Sequence[Any],
    *,
    cluster: DistributedSettings,
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(i, work(state, items[i]))`` for every item, as Ray actors finish them (in any order).

    Each actor calls ``make_state()`` once (e.g. loads a bundle on its GPU) and then works through the
    items it is given, two at a time so that the next one is ready when one ends. As many actors start
    as ``cluster.workers`` says, or as the cluster's GPUs (or CPUs) hold, never more than fit nor more
    than there are items. A restarted actor builds its state again. Functions must be importable by
    name on the workers or picklable by value.
    """
    if not items:
        return
    with ray_session(cluster, log=log) as ray:
        count, gpus = _actor_shape(ray.cluster_resources(), cluster, len(items))
        if log is not None:
            log(f"{count} Ray actor(s), {cluster.worker_cpus:g} CPU(s) and {gpus:g} GPU(s) each, "
                f"for {len(items)} piece(s) of work")
        actor_class = ray.remote(_Worker).options(
            num_cpus=cluster.worker_cpus, num_gpus=gpus, max_restarts=cluster.retries,
            max_task_retries=cluster.retries,
        )
        folder = os.getcwd()
        actors = [actor_class.remote(make_state, folder) for _ in range(count)]
        waiting = list(range(len(items)))[::-1]
        running: dict[Any, tuple[Any, int]] = {}

        def give(actor: Any) -> None:
            if waiting:
                index = waiting.pop()
                running[actor.run.remote(work, items[index])] = (actor, index)

        for actor in actors:
            give(actor)
            give(actor)
        try:
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                actor, index = running.pop(done[0])
                result = _result(ray, done[0], f"piece {index + 1} of {len(items)}", cluster.retries)
                give(actor)
                yield index, result
        finally:
            for ref in running:
                ray.cancel(ref)
            for actor in actors:
                ray.kill(actor)
