"""Bulk prediction with certificates over a researcher's archive: :func:`predict_bulk`.

The frames of every input (folders of images and clips, manifest CSVs, image files, clips sampled at
``fps``) are listed in a fixed order, cut into chunks (still images, or frames of one clip, so that a
worker decodes a clip once per chunk), and answered by a :class:`~painwatch.inference.Predictor`: here,
or on Ray actors that each load the bundle once (:mod:`painwatch.inference.distributed`).

Guarantees:

- One row per frame (:mod:`painwatch.inference.rows`: the page's download columns, then the rest of
  the FrameResult), keyed by ``(file, time_s)``; floats at full precision. When the run is complete the
  rows are in listing order, so the file does not depend on which worker finished first.
- Same noise seeds, same rows: every frame's noise seed is drawn from the operating system's entropy
  (deployment), or fixed by ``--seed`` (a hash of the seed and the frame's pixels), or taken from an
  earlier results file (``--noise-seeds``). A Ray run and a local run with the same seeds give the
  same rows.
- Resumable: the results file is rewritten atomically after every chunk (a reader sees the previous
  file or the new one, never a truncated row); frames already in it are skipped, after checking that
  it was made with the same bundle and certification settings.
- Bad files never stop a run: every frame that cannot be answered, and every input that cannot be
  listed, is named with the reason in ``RESULTS.problems.csv``.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from painwatch.data import (
    IMAGE_EXTENSIONS,
    MANIFEST_NAME,
    VIDEO_EXTENSIONS,
    Box,
    check_box,
    crop_face,
    read_image,
    read_video_frames,
    sample_times,
)
from painwatch.inference.bulk_settings import BulkSettings, DistributedSettings, EngineSettings
from painwatch.inference.distributed import map_on_actors
from painwatch.inference.predict import Predictor
from painwatch.inference.rows import DETAIL_COLUMNS, csv_columns, csv_value, result_row
from painwatch.io import atomic_write_text
from painwatch.robust import method_spec
from painwatch.runtime import resolve_device

PROBLEM_COLUMNS: tuple[str, ...] = ("file", "time_s", "where", "problem")
"""Columns of ``RESULTS.problems.csv``: the file, the frame's time in its clip, where it was listed."""

#: The columns whose values must match between a results file and the run that continues it.
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "bundle_weights_sha256", "method", "sigma", "alpha", "n_budget", "seed", "runtime", "precision",
)

FACE_MARGIN = 0.1
"""Fraction of a manifest's face box added on each side, as for training frames."""


class BulkError(ValueError):
    """A results or noise-seed file cannot be used (another format, bundle or settings); names it."""


def time_text(time_s: float | None) -> str:
    """A frame time as written in the ``time_s`` column: every digit, empty for still images."""
    return "" if time_s is None else repr(float(time_s))


@dataclass(frozen=True)
class FrameRef:
    """One frame to answer: ``file`` (absolute path of an image or clip), ``time_s`` (seconds into the
    clip; None for a still image), the face ``box`` (pixels, or None for the whole frame) and where it
    was listed (for messages)."""

    file: str
    time_s: float | None = None
    box: Box | None = None
    where: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the frame's row: ``(file, time_s)`` as written in the results file."""
        return self.file, time_text(self.time_s)

    @property
    def name(self) -> str:
        return self.file if self.time_s is None else f"{self.file} @ {self.time_s:.3f} s"


@dataclass(frozen=True)
class BulkProblem:
    """A frame or an input that could not be answered, and why."""

    file: str
    problem: str
    time_s: float | None = None
    where: str = ""

    def row(self) -> dict[str, str]:
        return {"file": self.file, "time_s": time_text(self.time_s), "where": self.where,
                "problem": self.problem}


# ----------------------------------------------------------------------------------------- listing
def _absolute(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return (path if path.is_absolute() else base / path).absolute()


def _clip_frames(clip: Path, *, fps: float, max_frames: int | None, box: Box | None, where: str,
                 problems: list[BulkProblem]) -> list[FrameRef]:
    try:
        times = sample_times(clip, fps, max_frames=max_frames)
    except ValueError as error:  # ImageReadError included
        problems.append(BulkProblem(str(clip), getattr(error, "reason", str(error)), where=where))
        return []
    return [FrameRef(str(clip), float(t), box, where) for t in times]


def _row_box(row: Mapping[str, str | None], where: str) -> Box | None:
    values = [(row.get(name) or "").strip() for name in ("x0", "y0", "x1", "y1")]
    if not any(values):
        return None
    if not all(values):
        raise ValueError(f"face box needs all of x0, y0, x1, y1, got {values}")
    return check_box(values, name=f"face box of {where}")


def _manifest_frames(manifest: Path, *, fps: float, max_frames: int | None,
                     problems: list[BulkProblem]) -> list[FrameRef]:
    """The frames a manifest lists: ``path`` (an image, or a clip: its frame at ``time_s`` or, without
    one, the clip sampled at ``fps``) or ``video`` (with or without ``time_s``); optional face box."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
        columns = set(csv.DictReader(io.StringIO(text)).fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        problems.append(BulkProblem(str(manifest), f"cannot be read as a CSV manifest ({error})"))
        return []
    if "path" not in columns and "video" not in columns:
        problems.append(BulkProblem(str(manifest), "a manifest needs a 'path' or a 'video' column"))
        return []
    base, frames = manifest.parent, []
    for number, row in enumerate(rows, start=2):
        where = f"{manifest} row {number}"
        image, video = (row.get("path") or "").strip(), (row.get("video") or "").strip()
        time_value = (row.get("time_s") or "").strip()
        try:
            box = _row_box(row, where)
            time_s = float(time_value) if time_value else None
        except ValueError as error:
            problems.append(BulkProblem(image or video or str(manifest), str(error), where=where))
            continue
        target = _absolute(base, image or video) if (image or video) else None
        if target is None:
            problems.append(BulkProblem(str(manifest), "the row has neither a path nor a video", where=where))
        elif image and target.suffix.lower() not in VIDEO_EXTENSIONS:
            frames.append(FrameRef(str(target), None, box, where))
        elif time_s is not None:
            frames.append(FrameRef(str(target), time_s, box, where))
        else:
            frames += _clip_frames(target, fps=fps, max_frames=max_frames, box=box, where=where,
                                   problems=problems)
    return frames


def _folder_files(root: Path) -> list[Path]:
    def hidden(path: Path) -> bool:
        return any(part.startswith(".") for part in path.relative_to(root).parts)

    return sorted(path for path in root.rglob("*") if path.is_file() and not hidden(path))


def list_frames(
    inputs: Iterable[str | Path], *, fps: float, max_frames_per_clip: int | None = None
) -> tuple[list[FrameRef], list[BulkProblem]]:
    """Every frame of ``inputs``, in order (folders sorted, manifests in row order, clips in time), and
    every input that could not be listed. A frame listed twice is answered once.

    Folders are searched recursively (hidden files skipped); a folder holding a ``manifest.csv`` is read
    through it. Paths are made absolute (relative to this process's working folder, or to a manifest's
    folder). Clips are decoded once here to find their sampled times (:func:`painwatch.data.sample_times`).
    """
    frames: list[FrameRef] = []
    problems: list[BulkProblem] = []
    options = {"fps": fps, "max_frames": max_frames_per_clip, "problems": problems}
    for given in inputs:
        path = Path(given).expanduser().absolute()
        if not path.exists():
            problems.append(BulkProblem(str(path), "does not exist", where=str(given)))
        elif path.is_dir() and (path / MANIFEST_NAME).is_file():
            frames += _manifest_frames(path / MANIFEST_NAME, **options)
        elif path.is_dir():
            for file in _folder_files(path):
                frames += _file_frames(file, where=str(given), **options)
        else:
            frames += _file_frames(path, where=str(given), **options)
    unique: dict[tuple[str, str], FrameRef] = {}
    for frame in frames:
        if frame.key in unique:
            first = unique[frame.key].where
            problems.append(BulkProblem(frame.file, f"listed again ({frame.where}); answered once, as listed "
                                        f"first ({first})", frame.time_s, frame.where))
        else:
            unique[frame.key] = frame
    return list(unique.values()), problems


def _file_frames(file: Path, *, where: str, fps: float, max_frames: int | None,
                 problems: list[BulkProblem]) -> list[FrameRef]:
    suffix = file.suffix.lower()
    if suffix == ".csv":
        return _manifest_frames(file, fps=fps, max_frames=max_frames, problems=problems)
    if suffix in IMAGE_EXTENSIONS:
        return [FrameRef(str(file), None, None, where)]
    if suffix in VIDEO_EXTENSIONS:
        return _clip_frames(file, fps=fps, max_frames=max_frames, box=None, where=where, problems=problems)
    problems.append(BulkProblem(str(file), f"not an image, a clip or a manifest (suffix "
                                f"{suffix or 'none'!r}); skipped", where=where))
    return []


def make_chunks(frames: Sequence[FrameRef], size: int) -> list[list[FrameRef]]:
    """Consecutive groups of at most ``size`` frames; a group holds still images or frames of one clip."""
    chunks: list[list[FrameRef]] = []
    for frame in frames:
        if chunks:
            last = chunks[-1][-1]
            same_kind = (frame.time_s is None) == (last.time_s is None)
            same_clip = frame.time_s is None or frame.file == last.file
            if len(chunks[-1]) < size and same_kind and same_clip:
                chunks[-1].append(frame)
                continue
        chunks.append([frame])
    return chunks


# ------------------------------------------------------------------------------------- answering
@dataclass(frozen=True)
class ChunkWork:
    """A chunk to answer and, per frame, the noise seed to use (None: the predictor's policy)."""

    frames: tuple[FrameRef, ...]
    noise_seeds: tuple[int | None, ...]


@dataclass
class ChunkOutcome:
    """What a chunk gave: encoded result rows (column -> cell text) and the frames that failed."""

    rows: list[dict[str, str]] = field(default_factory=list)
    problems: list[BulkProblem] = field(default_factory=list)


def _read_chunk(frames: Sequence[FrameRef]) -> list[np.ndarray | str]:
    """Each frame's face crop (uint8 RGB), or the reason it cannot be had."""
    if frames[0].time_s is not None:
        try:
            decoded: dict[float, np.ndarray] = read_video_frames(frames[0].file, [f.time_s for f in frames])
        except ValueError as error:  # ImageReadError included
            return [getattr(error, "reason", str(error))] * len(frames)
        images: list[np.ndarray | str] = [decoded.get(float(f.time_s), f"no frame at t = {f.time_s} s: past "
                                                      f"the end of the clip") for f in frames]
    else:
        images = []
        for frame in frames:
            try:
                images.append(read_image(frame.file))
            except ValueError as error:
                images.append(getattr(error, "reason", str(error)))
    crops: list[np.ndarray | str] = []
    for frame, image in zip(frames, images, strict=True):
        if isinstance(image, np.ndarray) and frame.box is not None:
            try:
                check_box(frame.box, image.shape, name="face box")
                image = crop_face(image, frame.box, FACE_MARGIN)
            except ValueError as error:
                image = str(error)
        crops.append(image)
    return crops


def predict_chunk(predictor: Predictor, work: ChunkWork) -> ChunkOutcome:
    """Answer a chunk with ``predictor``: one encoded row per frame, a problem per frame that cannot be
    read or preprocessed (the rest of the chunk is answered all the same)."""
    outcome = ChunkOutcome()
    classes = predictor.classes
    provenance = {"classes": classes, "budget": int(predictor.settings.n), "seed": predictor.seed,
                  "weights_sha256": str(predictor.metadata.weights_sha256)}
    for frame, image, seed in zip(work.frames, _read_chunk(work.frames), work.noise_seeds, strict=True):
        if isinstance(image, str):
            outcome.problems.append(BulkProblem(frame.file, image, frame.time_s, frame.where))
            continue
        try:
            (result,) = predictor.predict([image], [frame.name], noise_seeds=None if seed is None else [seed])
        except ValueError as error:
            outcome.problems.append(BulkProblem(frame.file, str(error), frame.time_s, frame.where))
            continue
        row = result_row(result, frame=frame.name, file=frame.file, time_s=frame.time_s, **provenance)
        outcome.rows.append({key: str(csv_value(value)) for key, value in row.items()})
    return outcome


def load_predictor(settings: BulkSettings, engine: EngineSettings | None = None) -> Predictor:
    """The Predictor of a bulk run, on ``settings.device`` as this process sees it (a Ray actor given a
    GPU sees it as ``cuda``), with the runtime and precision of ``engine`` (default: auto)."""
    engine = engine or EngineSettings()
    return Predictor.load(settings.bundle, method=settings.method, sigma=settings.sigma, alpha=settings.alpha,
                          n=settings.n, seed=settings.seed, device=resolve_device(settings.device),
                          runtime=engine.runtime, precision=engine.precision)


def expected_provenance(predictor: Predictor) -> dict[str, str]:
    """The :data:`PROVENANCE_COLUMNS` cells every row of ``predictor`` carries."""
    s = predictor.settings
    noisy = method_spec(s.method).needs_noise
    return {"bundle_weights_sha256": str(predictor.metadata.weights_sha256), "method": s.method_name,
            "sigma": str(csv_value(float(s.sigma) if noisy else 0.0)),
            "alpha": str(csv_value(float(s.alpha))) if noisy else "", "n_budget": str(int(s.n)),
            "seed": str(csv_value(predictor.seed)), "runtime": predictor.runtime,
            "precision": predictor.precision}


# ----------------------------------------------------------------------------------------- files
def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, str]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in columns})
    return buffer.getvalue()


class ResultsFile:
    """The results CSV: rows by frame key, rewritten atomically whenever rows are added.

    An existing file is continued: it must have the same columns and every row the same provenance as
    this run (:data:`PROVENANCE_COLUMNS`; ``alpha`` only for methods with noise), else
    :class:`BulkError` names the difference.
    """

    def __init__(self, path: Path, columns: Sequence[str], provenance: Mapping[str, str]) -> None:
        self.path, self.columns = path, list(columns)
        self.lines: dict[tuple[str, str], str] = {}
        if path.exists():
            self._read(provenance)

    def _read(self, provenance: Mapping[str, str]) -> None:
        try:
            with open(self.path, encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames != self.columns:
                    raise BulkError(f"{self.path} has other columns than painwatch predict writes for this "
                                    f"bundle; choose a new --out")
                rows = list(reader)
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise BulkError(f"cannot read {self.path} to continue it: {error}") from error
        for number, row in enumerate(rows, start=2):
            for column, value in provenance.items():
                if (column != "alpha" or value) and row[column] != value:
                    raise BulkError(
                        f"{self.path} row {number} was made with {column} = {row[column]!r}, this run has "
                        f"{value!r}: continue it with the same bundle and settings, or choose a new --out")
            self.lines[(row["file"], row["time_s"])] = _csv_text(self.columns, [row], header=False)

    def add(self, rows: Sequence[Mapping[str, str]]) -> None:
        """Add rows (replacing rows of the same frames) and rewrite the file atomically."""
        for row in rows:
            self.lines[(row["file"], row["time_s"])] = _csv_text(self.columns, [row], header=False)
        self.write()

    def order(self, keys: Sequence[tuple[str, str]]) -> None:
        """Put the rows of ``keys`` first, in that order (rows of frames not listed now stay after)."""
        listed = [key for key in keys if key in self.lines]
        rest = [key for key in self.lines if key not in set(listed)]
        self.lines = {key: self.lines[key] for key in [*listed, *rest]}

    def write(self) -> None:
        atomic_write_text(self.path, _csv_text(self.columns, [], header=True) + "".join(self.lines.values()))


def read_noise_seeds(path: Path) -> dict[tuple[str, str], int]:
    """The recorded noise seed of every frame of an earlier results CSV, by frame key ``(file, time_s)``.
    Rows without a seed (methods without noise) are left out. Raises :class:`BulkError` naming the file
    and row of anything malformed."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"file", "time_s", "noise_seed"} - set(reader.fieldnames or ())
            if missing:
                raise BulkError(f"--noise-seeds {path} lacks the column(s) {', '.join(sorted(missing))}")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BulkError(f"cannot read --noise-seeds {path}: {error}") from error
    seeds = {}
    for number, row in enumerate(rows, start=2):
        text = (row["noise_seed"] or "").strip()
        if not text:
            continue
        try:
            seeds[(row["file"], row["time_s"])] = int(text)
        except ValueError:
            raise BulkError(f"--noise-seeds {path} row {number}: noise_seed {text!r} is not an "
                            f"integer") from None
    return seeds


# ------------------------------------------------------------------------------------------- run
@dataclass
class BulkOutcome:
    """What :func:`predict_bulk` did."""

    out: Path
    frames_listed: int
    frames_skipped: int
    frames_answered: int
    problems: list[BulkProblem]
    problems_file: Path | None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def predict_bulk(
    settings: BulkSettings,
    *,
    cluster: DistributedSettings | None = None,
    engine: EngineSettings | None = None,
    log: Callable[[str], None] = _log,
) -> BulkOutcome:
    """Answer every frame of ``settings.inputs`` into ``settings.out`` (see the module docstring), here
    or, when ``cluster`` says so, on Ray actors that each load the bundle once; ``engine`` says what
    computes the answers and noise draws (a results file made by another engine is not continued).

    Raises:
        painwatch.models.BundleError, painwatch.inference.SettingsError: a bad bundle or override
            (before any frame is answered).
        BulkError: the results file or the noise-seed file cannot be used.
    """
    predictor = load_predictor(settings, engine)  # checks the bundle and the overrides before any work
    columns = [*csv_columns(predictor.classes), *DETAIL_COLUMNS]
    results = ResultsFile(settings.out, columns, expected_provenance(predictor))
    reused = read_noise_seeds(settings.noise_seeds) if settings.noise_seeds is not None else {}
    frames, problems = list_frames(settings.inputs, fps=settings.fps,
                                   max_frames_per_clip=settings.max_frames_per_clip)
    pending = [frame for frame in frames if frame.key not in results.lines]
    skipped = len(frames) - len(pending)
    log(f"{len(frames)} frame(s) listed from {len(settings.inputs)} input(s); {skipped} already in "
        f"{settings.out}, {len(pending)} to answer" + (f"; {len(problems)} problem(s)" if problems else ""))
    works = [ChunkWork(tuple(chunk), tuple(reused.get(frame.key) for frame in chunk))
             for chunk in make_chunks(pending, settings.chunk_frames)]
    _write_problems(settings.problems_file, problems)
    answered = 0
    bar = tqdm(total=len(pending), desc="predicting", unit="frame", file=sys.stderr,
               disable=not settings.progress, dynamic_ncols=True)
    try:
        # closing: a failure here stops the Ray actors at once, not when the traceback is collected.
        with closing(_outcomes(predictor, settings, engine, works, cluster, log)) as outcomes:
            for _, outcome in outcomes:
                results.add(outcome.rows)
                answered += len(outcome.rows)
                if outcome.problems:
                    problems += outcome.problems
                    _write_problems(settings.problems_file, problems)
                bar.update(len(outcome.rows) + len(outcome.problems))
    finally:
        bar.close()
    results.order([frame.key for frame in frames])
    results.write()
    log(f"{answered} frame(s) answered now, {len(results.lines)} row(s) in {settings.out}"
        + (f"; {len(problems)} problem(s) in {settings.problems_file}" if problems else ""))
    return BulkOutcome(settings.out, len(frames), skipped, answered, problems,
                       settings.problems_file if problems else None)


def _outcomes(
    predictor: Predictor, settings: BulkSettings, engine: EngineSettings | None,
    works: Sequence[ChunkWork], cluster: DistributedSettings | None, log: Callable[[str], None],
) -> Iterator[tuple[int, ChunkOutcome]]:
    if cluster is not None and cluster.enabled:
        # Each actor loads its own predictor; the one loaded here only checked the bundle and settings.
        yield from map_on_actors(partial(load_predictor, settings, engine), predict_chunk, works,
                                 cluster=cluster, log=log)
        return
    for index, work in enumerate(works):
        yield index, predict_chunk(predictor, work)


def _write_problems(path: Path, problems: Sequence[BulkProblem]) -> None:
    if problems:
        atomic_write_text(path, _csv_text(PROBLEM_COLUMNS, [p.row() for p in problems], header=True))
    else:
        path.unlink(missing_ok=True)  # a list left by an earlier run: its frames are listed again now
