"""The page answers at once and its certificates grow: first answers, the certification worker (queue,
join, cancel), the live table and its words, the time budget, and the page through AppTest (run, wait,
run again)."""

from __future__ import annotations

import io
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from painwatch import app as support
from painwatch.inference import CertificationProgress, Predictor

APP = Path(__file__).resolve().parent.parent / "app.py"
TIMEOUT_S = 120
SLOW_N = 20_000  # enough draws that certifying takes seconds even for the tiny network


def _png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _frames(count: int) -> list[support.Frame]:
    rng = np.random.default_rng(3)
    return [support.Frame(f"f{i}.png", f"f{i}.png", None, rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
            for i in range(count)]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    return bundle_factory(folder, certification={"n0": 16, "n": 100, "alpha": 0.01, "batch_size": 50})


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor.load(tiny_bundle, seed=0)


def test_first_answers_are_one_clean_pass_and_the_views_certify_as_the_frames(predictor) -> None:
    frames = [*_frames(2), support.Frame("odd.png", "odd.png", None, np.zeros((8, 8, 4), np.uint8))]
    kept, answers, views, problems = support.answer_frames(predictor, frames)
    assert [f.name for f in kept] == ["f0.png", "f1.png"] and [p.file for p in problems] == ["odd.png"]
    for frame, answer, view in zip(kept, answers, views, strict=True):
        assert answer == predictor.answer([frame.image], names=[frame.name])[0]
        assert answer.forward_passes == 1 and answer.label in predictor.classes
        assert math.isclose(sum(answer.probabilities.values()), 1.0, rel_tol=1e-9)
        assert torch.equal(predictor.preprocess(view), predictor.preprocess(frame.image))
    # certifying the view gives the frame's certificate exactly
    direct = predictor.predict([kept[0].image])[0]
    viewed = predictor.predict([views[0]])[0]
    assert (viewed.radius, viewed.noise_seed) == (direct.radius, direct.noise_seed)


def test_worker_certifies_in_order_joins_and_cancels(predictor) -> None:
    worker = support.CertificationWorker()
    frames = _frames(2)
    _, answers, views, _ = support.answer_frames(predictor, frames)
    names = [f.name for f in frames]
    quick = worker.submit("quick", predictor, views, names=names, answers=answers, owner="a")
    joined = worker.submit("quick", predictor, views, names=names, answers=answers, owner="b")
    assert joined is quick
    assert worker.wait("quick", TIMEOUT_S)
    done = worker.snapshot("quick")
    assert done.finished and done.frames_done == 2 and support.upload_fraction(done) == 1.0
    expected = predictor.predict(views, names=names)
    assert [r.radius for r in done.results] == [r.radius for r in expected]
    assert all(step.done and step.result is not None for step in done.progress)
    assert "All 2 frame(s) certified" in support.upload_progress_words(done)

    slow = predictor.with_budget(SLOW_N)
    job = worker.submit("slow", slow, views, names=names, answers=answers, owner="a")
    worker.submit("slow", slow, views, names=names, answers=answers, owner="b")
    deadline = time.monotonic() + TIMEOUT_S
    while worker.snapshot("slow").progress[0] is None and time.monotonic() < deadline:
        time.sleep(0.02)
    running = worker.snapshot("slow")
    assert running.state == "running" and not running.finished
    assert 0 < support.upload_fraction(running) < 1 and running.budget == 16 + SLOW_N
    assert "Certifying: 0 of 2 frame(s) done" in support.upload_progress_words(running)
    worker.release("slow", "a")  # another session still shows it: it goes on
    time.sleep(0.2)
    assert job.state == "running"
    # "b" moves on to other uploads: the job is cancelled between two passes
    worker.submit("other", predictor, views[:1], names=names[:1], answers=answers[:1], owner="b")
    assert worker.wait("slow", TIMEOUT_S) and job.state == "cancelled"
    assert "cancelled" in support.upload_progress_words(worker.snapshot("slow"))
    assert worker.wait("other", TIMEOUT_S) and worker.snapshot("other").finished
    with pytest.raises(ValueError, match="2 images, 1 names"):
        worker.submit("bad", predictor, views, names=names[:1], answers=answers, owner="a")


def test_live_rows_show_the_answer_then_the_certificate(predictor) -> None:
    frames = _frames(2)
    _, answers, views, _ = support.answer_frames(predictor, frames)
    result = replace(predictor.predict(views[:1])[0], name="f0.png")
    step = CertificationProgress(index=1, name="f1.png", draws=300, budget=1000, radius=0.12,
                                 noise_survival=0.8, interim_valid=True, done=False)
    snapshot = support.JobSnapshot(key="k", state="running", progress=(None, step), results=(result, None),
                                   budget=1000, interim_valid=True, time_left_s=14.0, passes_per_s=50.0)
    table = support.live_table(frames, answers, snapshot, grey_levels_per_unit=2.0, method="m")
    assert list(table.columns) == list(support.TABLE_COLUMNS)
    first, second = table.iloc[0], table.iloc[1]
    assert first["certified radius (L2)"] == result.radius and first["certified"] == 1.0
    assert first["status"] == support.status_of(result)
    assert second["class"] == answers[1].label and second["confidence"] == answers[1].confidence
    assert second["certified radius (L2)"] == 0.12 and second["radius (grey levels)"] == 0.24
    assert second["certified"] == pytest.approx(0.3) and "radius so far 0.12" in second["status"]
    # with the fixed bound no interim radius is shown: progress only
    fixed = replace(snapshot, interim_valid=False)
    row = support.live_table(frames, answers, fixed, grey_levels_per_unit=2.0, method="m").iloc[1]
    assert math.isnan(row["certified radius (L2)"]) and row["status"] == "certifying: 30% of 1000 draws"
    waiting = support.live_table(frames, answers, None, grey_levels_per_unit=2.0, method="m")
    assert list(waiting["status"]) == [support.STATUS_QUEUED] * 2
    assert "at most about 14 s left" in support.upload_progress_words(snapshot)
    assert "Anytime-valid" in support.bound_in_words(True, "soft_smoothing_sequential")
    assert "Fixed-budget" in support.bound_in_words(False, "randomized_smoothing")
    assert "Clopper-Pearson" in support.bound_in_words(False, "randomized_smoothing")
    assert "Exact bound" in support.bound_in_words(False, "lipschitz")


def test_time_budget_sets_the_draws_and_caps_the_slider(predictor) -> None:
    rate = predictor.engine.warm_up()
    roomy = support.choose_budget(predictor, requested=100, seconds=600)
    assert roomy.n == 100 and not roomy.limited_by_time
    tight = support.choose_budget(predictor, requested=100_000, seconds=1)
    assert tight.n == max(tight.low, min(tight.fits, 100_000)) and tight.limited_by_time
    assert "what a time budget of 1 s allows" in support.budget_words(tight) or tight.over_time
    assert support.sample_cap(100_000, None) == support.PAGE_MAX_DRAWS
    assert support.sample_cap(100_000, 2.0) == int(2.0 * support.MAX_SECONDS_PER_FRAME)
    assert support.sample_cap(500, rate) <= 500


def test_survival_in_words() -> None:
    sentence = support.describe_survival(0.973, sigma=0.06, alpha=0.001)
    assert "at least 97.3% of random pixel noise of 15 grey levels per pixel" in sentence
    assert "0.999" in sentence
    assert "No share" in support.describe_survival(None, sigma=0.06, alpha=0.001)


def test_page_answers_at_once_then_certificates_grow(monkeypatch, tiny_bundle) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(support.BUNDLE_ENV, str(tiny_bundle))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)
    at.run()
    at.select_slider(key="n").set_value(SLOW_N)
    at.button(key="apply").click()
    at.run()
    for seed in (1, 2):
        at.file_uploader[0].upload(f"frame_{seed}.png", _png(seed), "image/png")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    # At once: every frame's class and confidence, no certificate yet, no downloads.
    batch = at.session_state["batch"]
    assert batch.results is None and [a.label for a in batch.answers]
    table = at.dataframe[0].value
    assert list(table["class"]) == [a.label for a in batch.answers]
    assert all(s.startswith((support.STATUS_QUEUED, support.STATUS_CERTIFYING)) for s in table["status"])
    assert len(at.download_button) == 0
    text = " ".join(m.value for m in at.markdown)
    assert "Fixed-budget bound" in text
    assert any("noise draws per frame" in c.value for c in at.caption)
    # Wait, run again: the certificates are there, with downloads.
    deadline = time.monotonic() + TIMEOUT_S
    while at.session_state["batch"].results is None and time.monotonic() < deadline:
        time.sleep(0.5)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    results = at.session_state["batch"].results
    assert results is not None and all(r.n <= SLOW_N for r in results)
    assert [b.label for b in at.download_button] == ["Download CSV", "Download JSON"]
    table = at.dataframe[0].value
    assert list(table["certified"]) == [1.0, 1.0]
    assert list(table["certified radius (L2)"]) == [r.radius for r in results]


def test_downloads_carry_the_share_of_noise_and_the_engine(predictor) -> None:
    import csv

    frames = _frames(2)
    results = predictor.predict([f.image for f in frames], names=[f.name for f in frames])
    provenance = support.Provenance.from_predictor(predictor)
    rows = list(csv.DictReader(io.StringIO(support.results_csv(frames, results, provenance).decode())))
    for row, result in zip(rows, results, strict=True):
        expected = "" if result.noise_survival is None else repr(result.noise_survival)
        assert row["noise_survival"] == expected
        assert (row["runtime"], row["precision"]) == (predictor.runtime, predictor.precision)
    assert any(r.noise_survival is not None and 0 < r.noise_survival <= 1 for r in results)


def test_a_failing_job_says_why_and_is_not_retried_on_every_look(predictor) -> None:
    class Broken:
        """The tiny predictor, except that certifying raises."""

        settings, engine, interim_valid = predictor.settings, predictor.engine, False

        def certify_steps(self, images, names, *, answers):
            raise RuntimeError("the model file vanished")

    worker = support.CertificationWorker()
    frames = _frames(1)
    _, answers, views, _ = support.answer_frames(predictor, frames)
    job = worker.submit("broken", Broken(), views, names=["f0.png"], answers=answers, owner="a")
    assert worker.wait("broken", TIMEOUT_S) and job.state == "failed"
    snapshot = worker.snapshot("broken")
    assert "RuntimeError: the model file vanished" in support.upload_progress_words(snapshot)
    assert worker.submit("broken", Broken(), views, names=["f0.png"], answers=answers, owner="a") is job
