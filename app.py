"""painwatch: the veterinarian's page.

Run with ``make app``, or ``streamlit run app.py -- --bundle PATH`` (or ``PAINWATCH_BUNDLE=PATH``).
The page is thin: classification and certification come from :class:`painwatch.inference.Predictor`;
uploads, tables, downloads and the background certification from :mod:`painwatch.app`. Every frame's
answer (one clean pass) is shown at once; its certificate grows in a worker thread that the page polls.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import streamlit as st

from painwatch import app as support
from painwatch.app import widgets
from painwatch.inference import ABSTAIN_REASONS, Predictor, SettingsError

st.set_page_config(page_title="painwatch: pain check for macaque faces", page_icon=":material/pets:",
                   layout="wide")
SIGNED_IN_USER = widgets.sign_in_gate()
"""Who is signed in (None on 127.0.0.1); beyond this machine nothing below runs without an account."""

SEED = None
"""No fixed seed: every frame's noise comes from the operating system's entropy, so nobody who sends a
frame can predict its draws; each result records its noise seed, which reproduces it."""


# --------------------------------------------------------------------------- cached resources


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def load_predictor(bundle: str, fingerprint: str, method: str | None, sigma: float | None,
                   alpha: float | None) -> Any:
    """The Predictor for a bundle and settings (the draw budget is set per upload with
    ``with_budget``); ``fingerprint`` changes when the bundle's files do."""
    del fingerprint  # part of the cache key only
    predictor = Predictor.load(bundle, method=method, sigma=sigma, alpha=alpha, seed=SEED)
    # Time the engine now, while the model loads: the time budget needs its speed, and the first
    # upload's answers should not wait for it.
    predictor.warm_up()
    return predictor


@st.cache_resource
def certification_worker() -> support.CertificationWorker:
    """The one certification worker of this process: every session's uploads queue there, and their
    certificates grow there while the pages poll it."""
    return support.CertificationWorker()


def session_token() -> str:
    """This browser session's name for the worker (which jobs it shows)."""
    return st.session_state.setdefault("session_token", uuid.uuid4().hex)


@st.cache_resource(show_spinner=False, max_entries=4)
def offered_methods(bundle: str, fingerprint: str) -> list[str]:
    """The certification methods this bundle's network can be certified with (the only ones offered)."""
    del fingerprint  # part of the cache key only
    return support.usable_methods(Path(bundle))


@st.cache_resource
def model_lock() -> threading.Lock:
    """One lock for every model call of every browser session.

    Streamlit serves sessions from parallel threads and they share the cached Predictor; Grad-CAM
    attaches hooks to the shared network, so calls of that network must not interleave. The engine
    that answers and certifies has its own copy of the network.
    """
    return threading.Lock()


@dataclass(frozen=True)
class Batch:
    """One analysed batch of uploads, kept in the session so that reruns do not recompute it."""

    key: str
    frames: list[support.Frame]  # images are display thumbnails (support.thumbnail_with_crop)
    views: list[Any]  # what the model saw: uint8 RGB at the model's input size
    answers: list[Any]  # the first answers (one clean pass each)
    problems: list[support.FileProblem]
    provenance: support.Provenance
    created: datetime
    budget: support.DrawBudget
    answer_seconds: float  # the first answers of every frame (decoding and waiting for the lock excluded)
    results: list[Any] | None = None  # the certified results, once every frame has one
    seconds: float = math.nan  # answers and certificates of every frame, once all are there


# --------------------------------------------------------------------------- sidebar


def sidebar_bundle() -> Path:
    default_path, source = support.bundle_path_from_args(sys.argv[1:], os.environ)
    st.sidebar.header("Model")
    typed = st.sidebar.text_input(
        "Model folder",
        value=str(default_path),
        help="The folder of the model this page answers with (it holds model.json and "
        f"weights.safetensors); chosen by {source}. Ask whoever set up painwatch before changing it.",
    )
    return Path(typed.strip() or str(default_path)).expanduser()


SETTING_KEYS = ("method", "sigma", "alpha", "n", "seconds")


def sidebar_settings(bundle: Path, metadata: Any) -> dict[str, Any]:
    """Certification settings within the bundle's bounds; applied together with one button.

    Another bundle has other defaults and bounds: its settings start from its own ``model.json``. Only the
    methods this bundle's network can be certified with are offered.
    """
    certification = metadata.certification
    if st.session_state.get("settings_bundle") != str(bundle):
        for key in SETTING_KEYS:
            st.session_state.pop(key, None)
        st.session_state["settings_bundle"] = str(bundle)
    bounds = certification.bounds
    sigma_lo, sigma_hi = (float(v) for v in bounds.get("sigma", [certification.sigma] * 2))
    alpha_lo, alpha_hi = (float(v) for v in bounds.get("alpha", [certification.alpha] * 2))
    n_lo, n_hi = (int(v) for v in bounds.get("n", [certification.n] * 2))

    st.sidebar.header("Certification")
    with st.sidebar.form("settings"):
        methods = offered_methods(str(bundle), support.bundle_fingerprint(bundle))
        if certification.method not in methods:
            methods = [certification.method, *methods]
        method = st.selectbox(
            "Method", methods, index=methods.index(certification.method), key="method",
            help="How the answer's robustness is established: "
            + "; ".join(f"{name}: {support.method_in_words(name)}" for name in methods) + ".",
        )
        sigma = st.slider(
            "Noise level σ per pixel (pixels 0–1)", min_value=sigma_lo, max_value=sigma_hi,
            value=min(max(float(certification.sigma), sigma_lo), sigma_hi), step=0.01, key="sigma",
            help="Random noise added to every pixel to smooth the model (0.06 is about 15 grey levels of "
            "255). Larger σ can certify larger radii but blurs the model's view of the face.",
        )
        alpha_choices = _log_choices(alpha_lo, alpha_hi, float(certification.alpha))
        alpha = st.select_slider(
            "Error probability α", options=alpha_choices, value=float(certification.alpha),
            format_func=lambda a: f"{a:g}", key="alpha",
            help="A sampled certificate is wrong with probability at most α.",
        )
        cap = support.sample_cap(n_hi, st.session_state.get("passes_per_s"))
        n_choices = _sample_choices(n_lo, cap, int(certification.n))
        n = st.select_slider(
            "Sample budget n (per frame)", options=n_choices, value=int(certification.n), key="n",
            help="At most this many noisy copies of each frame are used to certify it, on top of a few "
            "that pick the answer (sampling stops early when no radius can be certified). More samples: "
            f"larger, tighter radii, slower. At most {cap}: what "
            f"{support.MAX_SECONDS_PER_FRAME:g} s a frame allow on this machine.",
        )
        seconds = st.number_input(
            "Time budget per frame (seconds)", min_value=1.0, max_value=support.MAX_SECONDS_PER_FRAME,
            value=support.DEFAULT_SECONDS_PER_FRAME, step=5.0, key="seconds",
            help="Each frame is certified with at most the noise draws that fit in this time at the "
            "measured speed of the model (fewer than the sample budget when they do not fit). The answer "
            "itself comes at once.",
        )
        fps = st.number_input(
            "Clip sampling rate (frames per second)", min_value=0.1, max_value=30.0, value=1.0, step=0.5,
            key="fps",
            help=f"Clips are sampled at this rate; at most {support.MAX_FRAMES_PER_CLIP} frames per clip.",
        )
        st.form_submit_button("Apply settings", key="apply")
    with st.sidebar.expander("What the radius means", expanded=True):
        st.markdown(support.radius_note(metadata.input_shape, float(sigma)))
    return {"method": method, "sigma": float(sigma), "alpha": float(alpha), "n": int(n),
            "seconds": float(seconds), "fps": float(fps)}


def _log_choices(lo: float, hi: float, current: float) -> list[float]:
    steps = [1e-6, 1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1]
    return sorted({v for v in steps if lo <= v <= hi} | {current, lo, hi})


def _sample_choices(lo: int, hi: int, current: int) -> list[int]:
    steps = [100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000]
    return sorted({v for v in steps if lo <= v <= hi} | {current, lo, hi})


# --------------------------------------------------------------------------- model card


def show_model_card(predictor: Any) -> None:
    """The gate verdicts (one per gate file the model was checked against), whether the model was trained
    on synthetic frames, and the model card."""
    if predictor.metadata.synthetic:
        st.warning(f"**{support.SYNTHETIC_WARNING}**", icon=":material/science:")
    if not predictor.gates:
        st.warning(
            "**Certification gate: not run.** This model has not been checked against the deployment "
            "thresholds. Use its answers for research only.", icon=":material/warning:"
        )
    if predictor.in_distribution_note is not None:
        st.warning(support.NO_CHECK_WARNING.format(note=predictor.in_distribution_note),
                   icon=":material/warning:")
    for verdict in predictor.gates.values():
        headline, failed = support.gate_lines(verdict)
        if verdict.passed:
            st.success(f"**Certification gate {headline}.**", icon=":material/verified:")
        else:
            checks = "".join(f"\n- {line}" for line in failed)
            st.error(
                f"**Certification gate {headline}.** The model did not meet these deployment thresholds; do "
                f"not rely on its answers.{checks}", icon=":material/block:"
            )
    with st.expander("Model card", expanded=False):
        st.markdown(predictor.model_card())


# --------------------------------------------------------------------------- analysis


def analyse(predictor: Any, uploads: list[support.Upload], settings: dict[str, Any], key: str,
            budget: support.DrawBudget) -> Batch:
    """Decode the uploads and answer every frame at once (one clean pass each); certification is the
    worker's."""
    progress = st.progress(0.0, text="Reading files…")
    frames, problems = support.decode_uploads(uploads, settings["fps"])
    progress.progress(0.5, text=f"Answering {len(frames)} frame(s)…")
    with model_lock():
        started = time.perf_counter()
        frames, answers, views, refused = support.answer_frames(predictor, frames)
        answer_seconds = time.perf_counter() - started
    # Keep only what the page shows: the model's view and a thumbnail, not full-size frames
    # (300 full-HD clip frames would hold about 2 GB per browser session).
    frames = [replace(f, image=support.thumbnail_with_crop(f.image)) for f in frames]
    progress.empty()
    provenance = support.Provenance.from_predictor(predictor)
    return Batch(key, frames, views, answers, problems + refused, provenance, datetime.now(UTC), budget,
                 answer_seconds)


def show_problems(problems: list[support.FileProblem]) -> None:
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    if errors:
        lines = "\n".join(f"- **{p.file}**: {p.problem}" for p in errors)
        st.error(f"{len(errors)} file(s) could not be used; the others were analysed:\n{lines}")
    for problem in warnings:
        st.warning(f"**{problem.file}**: {problem.problem}")


def show_summary(batch: Batch) -> None:
    assert batch.results is not None
    summary = support.summarize(batch.results)
    st.subheader("Summary")
    st.markdown(f"**{summary.frames} frames analysed** from {len({f.source for f in batch.frames})} file(s).")
    cols = st.columns(4)
    share = summary.pain_share
    cols[0].metric("Pain frames", "–" if share is None else f"{share:.0%}",
                   help="Share of pain among frames with an answer (abstentions left out).")
    cols[1].metric("Pain / no pain", f"{summary.pain} / {summary.no_pain}")
    cols[2].metric("Refused", summary.abstained,
                   help="Frames the model would not answer; the table says why for each. Of them "
                   f"{summary.refused} do not look like the macaque face crops it was trained on.")
    cols[3].metric("Robust to small pixel changes", f"{summary.certified} of {summary.frames}",
                   help="Frames with a certified radius above 0. Robust is not the same as correct.")
    st.caption("Time: " + support.describe_cost(batch.results, batch.seconds))
    show_time_course(batch.frames, batch.results)


def show_time_course(frames: list[support.Frame], answers: list[Any]) -> None:
    course = support.time_course(frames, answers)
    if not course.empty:
        st.markdown("**Time course** (probability of pain over each clip)")
        st.altair_chart(_time_course_chart(course), width="stretch")


def _time_course_chart(course: Any) -> Any:
    """P(pain) over time per clip on a fixed 0-1 scale, with the 0.5 line and one dot per frame."""
    import altair as alt

    base = alt.Chart(course).encode(
        x=alt.X("time (s):Q", title="time in the clip (s)"),
        y=alt.Y("P(pain):Q", title="probability of pain", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("clip:N", title="clip"),
    )
    dots = base.mark_circle(size=60).encode(
        shape=alt.Shape("class:N", title="answer"),
        tooltip=["clip", alt.Tooltip("time (s):Q", format=".2f"), alt.Tooltip("P(pain):Q", format=".2f"),
                 "class"],
    )
    half = alt.Chart(course).mark_rule(strokeDash=[4, 4], color="#888888").encode(y=alt.datum(0.5))
    return alt.layer(base.mark_line(), dots, half).properties(height=260)


def show_table(batch: Batch, predictor: Any, snapshot: support.JobSnapshot | None) -> None:
    st.subheader("Results")
    if batch.results is not None:
        table = support.results_table(batch.frames, batch.results)
    else:
        table = support.live_table(
            batch.frames, batch.answers, snapshot, method=predictor.settings.method_name,
            grey_levels_per_unit=support.grey_levels_per_unit_radius(predictor.input_shape))
    if table["time (s)"].isna().all():
        # Still frames only: no times, and the file is the frame; blank or repeated columns only confuse.
        table = table.drop(columns=["time (s)", "file"])
    st.dataframe(
        table.style.map(_class_style, subset=["class"]).map(_status_style, subset=["status"]),
        hide_index=True,
        width="stretch",
        column_config={
            "time (s)": st.column_config.NumberColumn(format="%.2f", help="Frame time within the clip"),
            "confidence": st.column_config.ProgressColumn(
                min_value=0.0, max_value=1.0, format="%.2f",
                help="Calibrated probability of the predicted class"),
            "certified radius (L2)": st.column_config.NumberColumn(
                format="%.4f", help="L2 size of pixel noise (pixels 0–1) that cannot change the answer: the "
                "worst case. Empty while a fixed-budget certificate is still being drawn"),
            "radius (grey levels)": st.column_config.NumberColumn(
                format="%.2f", help="The radius spread evenly over all pixels, in grey levels of 255"),
            "noise kept (at least)": st.column_config.NumberColumn(
                format="percent", help="Share of random pixel noise at the certification σ that leaves the "
                "answer unchanged (at least, with probability 1 − α): the typical case"),
            "certified": st.column_config.ProgressColumn(
                min_value=0.0, max_value=1.0, format="percent",
                help="Share of the frame's noise-draw budget spent (100% once certified)"),
        },
    )
    cert = batch.provenance.certification
    engine = f"{predictor.runtime} at {predictor.precision}"
    if batch.results is None:
        st.caption(f"{support.budget_words(batch.budget)} Answers and noise draws computed by {engine}.")
        return
    csv_bytes = support.results_csv(batch.frames, batch.results, batch.provenance)
    json_bytes = support.results_json(batch.frames, batch.results, batch.provenance, problems=batch.problems,
                                      created=batch.created)
    stem = support.download_name("painwatch-results", batch.created)
    left, right, _ = st.columns([1, 1, 4])
    left.download_button("Download CSV", csv_bytes, file_name=f"{stem}.csv", mime="text/csv",
                         on_click="ignore", icon=":material/download:")
    right.download_button("Download JSON", json_bytes, file_name=f"{stem}.json", mime="application/json",
                          on_click="ignore", icon=":material/download:")
    if cert.get("method") == "lipschitz":
        st.caption(
            f"Bundle weights SHA-256 {batch.provenance.weights_sha256[:16]}…; method lipschitz: one network "
            "evaluation per frame, no noise, exact certificates. The downloads carry the full hash and the "
            "settings."
        )
        return
    st.caption(
        f"Bundle weights SHA-256 {batch.provenance.weights_sha256[:16]}…; method {cert.get('method')}, "
        f"σ = {cert.get('sigma'):g}, α = {cert.get('alpha'):g}, budget n = {cert.get('n')} per frame; "
        f"answers and noise draws computed by {engine}. Each frame's noise was drawn unpredictably; the "
        "downloads carry its noise seed (which reproduces the certificate), the full hash and the settings."
    )


CLASS_STYLES = {
    "pain": "background-color: #fde2e1; color: #8a1c1c; font-weight: 600",
    "no_pain": "background-color: #e3f4e8; color: #1d5e32",
    support.ABSTAIN_LABEL: "background-color: #eeeeee; color: #555555; font-style: italic",
}


def _class_style(value: str) -> str:
    return CLASS_STYLES.get(value, "")


def _status_style(value: str) -> str:
    if value == support.STATUS_ROBUST:
        return "color: #1d5e32"
    if value == support.ABSTAIN_STATUS["not_like_training_frames"]:
        return "color: #8a1c1c; font-style: italic"
    if value.startswith(support.STATUS_REFUSED):
        return "color: #555555; font-style: italic"
    return "color: #9a5b00"


def show_frame(batch: Batch, predictor: Any, snapshot: support.JobSnapshot | None) -> None:
    st.subheader("Frame view")
    names = [frame.name for frame in batch.frames]
    chosen = st.selectbox("Frame", names, key="frame_choice")
    index = names.index(chosen)
    frame, answer = batch.frames[index], batch.answers[index]
    result = batch.results[index] if batch.results is not None else (
        snapshot.results[index] if snapshot is not None else None)
    step = snapshot.progress[index] if snapshot is not None else None
    uploaded, heat, numbers = st.columns([1, 1, 1.2])
    uploaded.image(frame.image, width="stretch",
                   caption="The uploaded frame; the outlined centre square is what the model sees"
                   if frame.image.shape[0] != frame.image.shape[1] else "The uploaded frame")
    view = batch.views[index]
    saliency = _saliency(batch.key, index, predictor, view)
    heat.image(support.overlay_saliency(view, saliency), width="stretch",
               caption=f"What the model saw ({view.shape[1]} x {view.shape[0]} pixels) and where it looked "
               "(Grad-CAM; red = most influence)")
    with numbers:
        if result is None:
            _frame_in_progress(answer, step, snapshot, predictor)
            return
        if support.is_abstention(result):
            refused = result.abstain_code == "not_like_training_frames"
            st.markdown("### Refused" if refused else "### Abstained")
            st.caption(f"Why: {result.abstain_reason or 'the model would not commit to an answer'}.")
            if refused:
                st.caption(f"In-distribution score {result.in_distribution_score:.3g}, above the threshold "
                           f"{result.in_distribution_threshold:.3g} set on the training individuals' frames; "
                           "no answer was certified for it.")
        else:
            st.markdown(f"### {result.label}\nconfidence {result.confidence:.0%}")
        for name, probability in result.probabilities.items():
            st.progress(min(max(float(probability), 0.0), 1.0), text=f"{name}: {probability:.1%}")
        st.markdown(support.describe_radius(float(result.radius), float(result.radius_grey_levels),
                                            method=str(result.method), alpha=float(result.alpha)))
        if result.sigma > 0:
            st.markdown(support.describe_survival(result.noise_survival, sigma=float(result.sigma),
                                                  alpha=float(result.alpha)))
        if result.method == "lipschitz":
            st.caption(f"Method lipschitz: {result.forward_passes} network evaluation, no noise. Answer from "
                       f"{result.classifier}.")
        else:
            st.caption(f"Method {result.method}, σ = {result.sigma:g}, {result.n} noise draws, "
                       f"{result.forward_passes} network evaluations ({result.runtime} at "
                       f"{result.precision}). Answer from the {result.classifier}.")


def _frame_in_progress(answer: Any, step: Any, snapshot: support.JobSnapshot | None, predictor: Any) -> None:
    """The first answer of a frame whose certificate is still growing, and how far it has come."""
    if answer.refused:  # decided on its clean pass: no noise is drawn for it
        st.markdown("### Refused")
        st.caption(f"Why: {ABSTAIN_REASONS[answer.abstain_code]}.")
        return
    st.markdown(f"### {answer.label}\nconfidence {answer.confidence:.0%} (first answer, not yet certified)")
    for name, probability in answer.probabilities.items():
        st.progress(min(max(float(probability), 0.0), 1.0), text=f"{name}: {probability:.1%}")
    fraction = step.fraction if step is not None else 0.0
    st.progress(fraction, text=support.frame_status(step, None, predictor.interim_valid))
    if step is not None and predictor.interim_valid and step.radius > 0:
        grey = step.radius * support.grey_levels_per_unit_radius(predictor.input_shape)
        settings = predictor.settings
        st.markdown("So far: " + support.describe_radius(step.radius, grey, method=settings.method_name,
                                                          alpha=settings.alpha))
        st.markdown(support.describe_survival(step.noise_survival, sigma=predictor.settings.sigma,
                                              alpha=predictor.settings.alpha))
    st.caption(support.bound_in_words(predictor.interim_valid, predictor.settings.method_name))


def _saliency(batch_key: str, index: int, predictor: Any, image: Any) -> Any:
    cache = st.session_state.setdefault("saliency_cache", {})
    key = (batch_key, index)
    if key not in cache:
        with st.spinner("Computing the heat map…"):
            cache.clear()  # keep one map per session: they are cheap to recompute
            with model_lock():
                cache[key] = predictor.saliency(image)
    return cache[key]


# --------------------------------------------------------------------------- page


def main() -> None:
    st.title("painwatch")
    st.markdown(
        "Pain check for **Japanese macaque** face frames. Upload frames or short clips; for each frame "
        "you get the predicted class (**pain** / **no_pain**), the model's confidence, and a "
        "**certified radius**: how much image noise the answer provably survives. "
        + support.ROBUST_IS_NOT_CORRECT
    )
    bundle = sidebar_bundle()
    problem = support.bundle_problem(bundle)
    if problem is not None:
        st.error(problem, icon=":material/inventory_2:")
        return
    try:
        metadata = support.read_bundle_metadata(bundle)
    except support.BundleError as error:
        st.error(f"The model cannot be used: {error}", icon=":material/inventory_2:")
        return
    settings = sidebar_settings(bundle, metadata)
    card_slot = st.container()

    # The uploader is drawn on every run, before anything can fail, so that uploads survive a
    # setting the model refuses.
    # Every file reaches the page (no type filter in the browser), so that a file of the wrong type is
    # named in the error box below with the types accepted; the uploader's own limit is the clip limit.
    files = st.file_uploader(
        "Frames (jpg, png, bmp, tiff) or short clips (mp4, avi, mov)",
        accept_multiple_files=True,
        key="uploads",
        max_upload_size=support.MAX_CLIP_BYTES // support.MEGABYTE,
        help=support.UPLOAD_HELP,
    )
    try:
        predictor = load_predictor(str(bundle), support.bundle_fingerprint(bundle), settings["method"],
                                   settings["sigma"], settings["alpha"])
    except support.BundleError as error:
        card_slot.error(f"The model cannot be used: {error}", icon=":material/inventory_2:")
        return
    except SettingsError as error:
        card_slot.error(f"These certification settings cannot be used: {error}", icon=":material/tune:")
        return
    with card_slot:
        show_model_card(predictor)

    worker = certification_worker()
    if not files:
        worker.release_all(session_token())  # files removed: stop certifying them
        st.session_state.pop("batch", None)  # and let go of their results
        st.info("Drop frames or clips above to analyse them.", icon=":material/upload:")
        return
    budget = support.choose_budget(predictor, requested=settings["n"], seconds=settings["seconds"])
    st.session_state["passes_per_s"] = budget.passes_per_s
    predictor = predictor.with_budget(budget.n)
    uploads = [support.Upload(f.name, f.getvalue()) for f in files]
    key = support.uploads_digest(uploads, {**settings, "bundle": support.bundle_fingerprint(bundle)})
    batch: Batch | None = st.session_state.get("batch")
    if batch is None or batch.key != key:
        batch = analyse(predictor, uploads, settings, key, budget)
        st.session_state["batch"] = batch
    if batch.results is None:
        # Joins the job already there for these uploads; any other job of this session is let go.
        worker.submit(key, predictor, batch.views, names=[f.name for f in batch.frames],
                      answers=batch.answers, owner=session_token())
    show_problems(batch.problems)
    if not batch.frames:
        st.warning("None of the uploaded files could be analysed.")
        return
    snapshot = worker.snapshot(key)
    polling = batch.results is None and snapshot is not None and snapshot.state in ("queued", "running")
    st.fragment(run_every=support.POLL_S if polling else None)(show_results)(key, predictor, polling)


def show_results(key: str, predictor: Any, polling: bool) -> None:
    """The results as they stand: redrawn every :data:`support.POLL_S` seconds while certificates grow
    (the page polls the worker), once more in full when they are all there."""
    batch: Batch | None = st.session_state.get("batch")
    if batch is None or batch.key != key:
        return
    snapshot = certification_worker().snapshot(key)
    if batch.results is None and snapshot is not None and snapshot.finished:
        results = [replace(result, time_s=frame.time_s)
                   for frame, result in zip(batch.frames, snapshot.results, strict=True)]
        batch = replace(batch, results=results, seconds=batch.answer_seconds + snapshot.seconds)
        st.session_state["batch"] = batch
    if polling and (snapshot is None or snapshot.state not in ("queued", "running")):
        st.rerun()  # certification ended: draw the whole page once more, without polling
    if batch.results is None:
        show_progress(batch, snapshot, predictor)
        show_time_course(batch.frames, batch.answers)
    else:
        show_summary(batch)
    show_table(batch, predictor, snapshot)
    show_frame(batch, predictor, snapshot)
    if batch.results is not None:
        widgets.save_check_section(batch.frames, batch.results, batch.provenance,
                                   model_card=predictor.model_card_dict(), batch_key=batch.key,
                                   analysed_at=batch.created, problems=batch.problems, user=SIGNED_IN_USER)


def show_progress(batch: Batch, snapshot: support.JobSnapshot | None, predictor: Any) -> None:
    """Where the upload's certification stands, and the bound in use, in words."""
    st.subheader("Answers (certifying)")
    if snapshot is None:
        st.info("Waiting for the certification worker…")
        return
    words = support.upload_progress_words(snapshot)
    if snapshot.state in ("failed", "cancelled"):
        st.error(words)
    else:
        st.progress(support.upload_fraction(snapshot), text=words)
    st.markdown(support.bound_in_words(predictor.interim_valid, predictor.settings.method_name))


widgets.navigation(main, SIGNED_IN_USER)
