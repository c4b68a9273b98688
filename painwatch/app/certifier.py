"""Certification off the page's script thread: one worker thread per process, a queue of jobs (one per
set of uploads), every frame's progress readable at any moment, a job cancelled when its uploads change.

The page answers at once from one clean pass per frame (:meth:`painwatch.inference.Predictor.answer`)
and hands the frames to :class:`CertificationWorker` (docs/design.md, "The answer at once and a
certificate that grows"). The worker certifies one job at a time, in submission order, through
:meth:`~painwatch.inference.Predictor.certify_steps` (several frames per forward pass), and keeps each
job's progress and results keyed by the uploads digest, so that every browser session showing the same
uploads reads the same job. A job belongs to the sessions that submitted it; when the last of them
moves on to other uploads it is cancelled between two forward passes. Nothing here imports Streamlit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["JOB_STATES", "CertificationJob", "CertificationWorker", "JobSnapshot"]

JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "cancelled", "failed")
"""Where a job stands: waiting for the worker, being certified, finished, given up, or broken."""


@dataclass(frozen=True)
class JobSnapshot:
    """One job at one moment (a copy: the worker goes on while the page draws it).

    ``progress[i]`` is frame ``i``'s latest :class:`~painwatch.inference.CertificationProgress` (None
    before its first draw); ``results[i]`` its :class:`~painwatch.inference.FrameResult` once done;
    ``time_left_s`` the draws still allowed for the unfinished frames over the engine's measured
    passes per second (an upper bound: sampling may stop early), NaN before anything was timed.
    """

    key: str
    state: str
    progress: tuple[Any, ...]
    results: tuple[Any, ...]
    budget: int
    interim_valid: bool
    time_left_s: float
    passes_per_s: float
    error: str | None = None
    ahead: int = 0
    seconds: float = math.nan
    """Seconds the worker spent certifying this job's frames (NaN until it is done)."""

    @property
    def finished(self) -> bool:
        """True once every frame has its result."""
        return self.state == "done"

    @property
    def frames_done(self) -> int:
        return sum(result is not None for result in self.results)


@dataclass
class CertificationJob:
    """The certification of one set of frames (see :class:`CertificationWorker`)."""

    key: str
    predictor: Any
    images: list[np.ndarray]
    names: list[str]
    answers: list[Any]
    owners: set[str] = field(default_factory=set)
    state: str = "queued"
    error: str | None = None
    progress: list[Any] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    seconds: float = math.nan

    def __post_init__(self) -> None:
        self.progress = [None] * len(self.images)
        self.results = [None] * len(self.images)

    @property
    def budget(self) -> int:
        """Draws allowed per frame: the selection draws and the estimation budget."""
        return int(self.predictor.settings.n0 + self.predictor.settings.n)

    def snapshot(self, ahead: int = 0) -> JobSnapshot:
        with self.lock:
            progress, results, state = tuple(self.progress), tuple(self.results), self.state
            seconds = self.seconds
        rate = float(self.predictor.engine.draws_per_s)
        left = sum(self.budget - (step.draws if step is not None else 0)
                   for step, result in zip(progress, results, strict=True) if result is None)
        time_left = left / rate if math.isfinite(rate) and rate > 0 else (0.0 if left == 0 else math.nan)
        return JobSnapshot(key=self.key, state=state, progress=progress, results=results, budget=self.budget,
                           interim_valid=bool(self.predictor.interim_valid), time_left_s=time_left,
                           passes_per_s=rate, error=self.error, ahead=ahead, seconds=seconds)


class CertificationWorker:
    """One background thread certifying submitted jobs in order; see the module docstring.

    ``max_jobs`` finished or cancelled jobs are kept (the most recent), so that a page coming back to
    the same uploads finds their results; older ones are dropped.
    """

    def __init__(self, max_jobs: int = 16) -> None:
        self._jobs: OrderedDict[str, CertificationJob] = OrderedDict()
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._max_jobs = max_jobs
        self._thread: threading.Thread | None = None

    def submit(
        self,
        key: str,
        predictor: Any,
        images: Sequence[np.ndarray],
        *,
        names: Sequence[str],
        answers: Sequence[Any],
        owner: str,
    ) -> CertificationJob:
        """Queue the certification of ``images`` (uint8 RGB, as the Predictor takes them) under ``key``,
        for ``owner`` (a browser session); the same key again joins the job already there (unless it was
        cancelled: a failed job stays failed, and says why, instead of failing again on every look).
        Every other job of ``owner`` is released (:meth:`release`)."""
        if not (len(images) == len(names) == len(answers)):
            raise ValueError(f"got {len(images)} images, {len(names)} names and {len(answers)} answers")
        with self._lock:
            for other in [k for k, job in self._jobs.items() if owner in job.owners and k != key]:
                self._release_locked(other, owner)
            job = self._jobs.get(key)
            if job is None or job.state == "cancelled":
                job = CertificationJob(key, predictor, list(images), list(names), list(answers))
                self._jobs[key] = job
                self._queue.append(key)
                self._forget_old_locked()
            job.owners.add(owner)
            self._jobs.move_to_end(key)
            self._start_locked()
            self._wake.notify_all()
            return job

    def job(self, key: str) -> CertificationJob | None:
        with self._lock:
            return self._jobs.get(key)

    def snapshot(self, key: str) -> JobSnapshot | None:
        """The job of ``key`` now (None when there is none), with the number of jobs queued before it."""
        with self._lock:
            job = self._jobs.get(key)
            ahead = self._queue.index(key) if key in self._queue else 0
        return None if job is None else job.snapshot(ahead)

    def release(self, key: str, owner: str) -> None:
        """``owner`` no longer shows the job of ``key``; with no owner left an unfinished job is cancelled."""
        with self._lock:
            self._release_locked(key, owner)

    def release_all(self, owner: str) -> None:
        """:meth:`release` every job of ``owner`` (its uploads were removed)."""
        with self._lock:
            for key in [k for k, job in self._jobs.items() if owner in job.owners]:
                self._release_locked(key, owner)

    def wait(self, key: str, timeout: float) -> bool:
        """Block until the job of ``key`` has ended (done, cancelled or failed) or ``timeout`` seconds
        passed; True when it ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(key)
            if job is None or job.state in ("done", "cancelled", "failed"):
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------------------------ worker

    def _release_locked(self, key: str, owner: str) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        job.owners.discard(owner)
        if not job.owners and job.state in ("queued", "running"):
            job.cancelled.set()
            if job.state == "queued":
                job.state = "cancelled"
                if key in self._queue:
                    self._queue.remove(key)

    def _forget_old_locked(self) -> None:
        ended = [k for k, job in self._jobs.items() if job.state in ("done", "cancelled", "failed")]
        while len(self._jobs) > self._max_jobs and ended:
            self._jobs.pop(ended.pop(0), None)

    def _start_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._serve, name="painwatch-certifier", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                job = self._jobs[self._queue[0]]
                job.state = "running"
            try:
                self._certify(job)
            except Exception as error:  # the page shows it; the worker goes on with the next job
                with job.lock:
                    job.state, job.error = "failed", f"{type(error).__name__}: {error}"
            with self._lock:
                if self._queue and self._queue[0] == job.key:
                    self._queue.popleft()

    @staticmethod
    def _certify(job: CertificationJob) -> None:
        started = time.perf_counter()
        steps = job.predictor.certify_steps(job.images, job.names, answers=job.answers)
        try:
            for step in steps:
                if job.cancelled.is_set():
                    with job.lock:
                        job.state = "cancelled"
                    return
                with job.lock:
                    job.progress[step.index] = step
                    if step.done:
                        job.results[step.index] = step.result
            with job.lock:
                job.state, job.seconds = "done", time.perf_counter() - started
        finally:
            steps.close()
            job.images = []  # the results stay; the frames are not needed any more
