"""The veterinarian's page: page logic (painwatch.app_support) and the page itself through AppTest.

A tiny real bundle (timm ``test_resnet`` at 32 px, small sample budget) is built once per module;
frames are real PNG/JPEG/TIFF bytes and a real AVI clip, uploaded through Streamlit's test uploader.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import harness
import numpy as np
import pytest
import torch
from PIL import Image

from painwatch import app as support
from painwatch.data import centre_square
from painwatch.models import GateVerdict

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = REPO_ROOT / "app.py"
APP_TIMEOUT_S = 120
TINY_N = 100  # the bundle bounds' lower end: the smallest budget a user may pick


# --------------------------------------------------------------------------- real test files


def _face_like(seed: int, size: int = 48) -> np.ndarray:
    """A small RGB picture with some structure (not a photograph: content does not matter here)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = (np.sin(xx / (3 + seed)) + np.cos(yy / 4)) * 60 + 120
    picture = np.stack([base, base * 0.8, base * 0.6], axis=-1) + rng.normal(0, 10, (size, size, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    if mode is not None:
        picture = picture.convert(mode)
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


def _avi_clip(path: Path, frames: int = 10, fps: float = 5.0, size: int = 40) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    assert writer.isOpened(), "OpenCV cannot write MJPG AVI here"
    for index in range(frames):
        writer.write(cv2.cvtColor(_face_like(index, size), cv2.COLOR_RGB2BGR))
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_uploads() -> list[support.Upload]:
    return [
        support.Upload("frame_a.png", _encode(_face_like(1), "PNG")),
        support.Upload("frame_b.jpg", _encode(_face_like(2), "JPEG")),
        support.Upload("frame_c.tiff", _encode(_face_like(3), "TIFF")),
    ]


@pytest.fixture(scope="module")
def bad_uploads() -> list[support.Upload]:
    jpeg = _encode(_face_like(4), "JPEG")
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, format="PNG")  # 64 megapixels, a few hundred kB
    return [
        support.Upload("notes.png", b"this is a text file, not an image"),
        support.Upload("cut.jpg", jpeg[: len(jpeg) // 2]),
        support.Upload("empty.png", b""),
        support.Upload("bomb.png", bomb.getvalue()),
        support.Upload("report.pdf", b"%PDF-1.4"),
        support.Upload("strip.png", _encode(np.zeros((2, 400, 3), np.uint8), "PNG")),
    ]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Path:
    """A real bundle: tiny timm backbone, 32 px input, smallest sample budget the bounds allow."""
    folder = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    return bundle_factory(folder, certification={"n0": 16, "n": TINY_N, "alpha": 0.01, "batch_size": 50})


# --------------------------------------------------------------------------- page logic


def test_bundle_path_precedence() -> None:
    env = {support.BUNDLE_ENV: "/from/env"}
    assert support.bundle_path_from_args(["--bundle", "/from/args"], env) == (Path("/from/args"), "--bundle")
    assert support.bundle_path_from_args(["-q", "tests/x.py"], env) == (Path("/from/env"), support.BUNDLE_ENV)
    assert support.bundle_path_from_args([], {}) == (support.DEFAULT_BUNDLE, "default")
    # An abbreviation of --bundle belongs to someone else (e.g. a test runner): never taken as ours.
    assert support.bundle_path_from_args(["--bund", "/x"], {})[1] == "default"


def test_bundle_problem_says_how_to_build(tmp_path: Path, tiny_bundle: Path) -> None:
    missing = support.bundle_problem(tmp_path / "nope")
    # Words a veterinarian can act on: who to ask, no developer commands.
    assert missing is not None and "Ask whoever set up painwatch" in missing
    assert "make " not in missing and "painwatch demo" not in missing and "`streamlit" not in missing
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.json").write_text("{}")
    half = support.bundle_problem(tmp_path / "half")
    assert half is not None and "weights.safetensors" in half
    assert support.bundle_problem(tiny_bundle) is None


def test_decode_keeps_good_files_and_names_every_bad_one(good_uploads, bad_uploads) -> None:
    mixed = [good_uploads[0], *bad_uploads, *good_uploads[1:]]
    frames, problems = support.decode_uploads(mixed, fps=1.0)
    assert [f.name for f in frames] == ["frame_a.png", "frame_b.jpg", "frame_c.tiff"]
    assert all(f.image.dtype == np.uint8 and f.image.shape == (48, 48, 3) for f in frames)
    assert all(f.time_s is None for f in frames)
    by_file = {p.file: p.problem for p in problems}
    assert set(by_file) == {"notes.png", "cut.jpg", "empty.png", "bomb.png", "report.pdf", "strip.png"}
    assert "empty" in by_file["empty.png"]
    assert "not an image" in by_file["notes.png"]
    assert "truncated" in by_file["cut.jpg"].lower()
    assert "8000x8000" in by_file["bomb.png"] and "above the limit" in by_file["bomb.png"]
    assert "unsupported file type '.pdf'" in by_file["report.pdf"]
    assert "400 x 2 pixels" in by_file["strip.png"] and "elongated" in by_file["strip.png"]
    assert all(p.severity == "error" for p in problems)


def test_decode_size_limit_and_odd_colour_modes() -> None:
    picture = _face_like(5)
    uploads = [
        support.Upload("cmyk.jpg", _encode(picture, "JPEG", mode="CMYK")),
        support.Upload("grey16.png", _encode((picture[..., 0].astype(np.uint16) * 257), "PNG")),
        support.Upload("palette.png", _encode(picture, "PNG", mode="P")),
        support.Upload("big.png", _encode(picture, "PNG")),
    ]
    limit = len(uploads[3].data) - 1
    frames, problems = support.decode_uploads(uploads, fps=1.0, max_image_bytes=limit)
    assert [f.name for f in frames] == ["cmyk.jpg", "grey16.png", "palette.png"]
    assert all(f.image.shape == (48, 48, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [(p.file, p.severity) for p in problems] == [("big.png", "error")]
    assert "larger than" in problems[0].problem


def test_decode_rejects_bad_arguments(good_uploads) -> None:
    with pytest.raises(ValueError, match="fps"):
        support.decode_uploads(good_uploads, fps=0)
    with pytest.raises(ValueError, match="max_frames_per_clip"):
        support.decode_uploads(good_uploads, fps=1.0, max_frames_per_clip=0)


def test_decode_clip_sampled_and_cut_with_warning(tmp_path: Path) -> None:
    clip = _avi_clip(tmp_path / "clip.avi", frames=10, fps=5.0)  # 2 s
    frames, problems = support.decode_uploads([support.Upload("clip.avi", clip)], fps=1.0)
    assert problems == []
    assert [f.time_s for f in frames] == pytest.approx([0.0, 1.0])
    assert [f.name for f in frames] == ["clip.avi @ 0.00 s", "clip.avi @ 1.00 s"]
    assert all(f.source == "clip.avi" for f in frames)

    frames, problems = support.decode_uploads(
        [support.Upload("clip.avi", clip)], fps=5.0, max_frames_per_clip=4
    )
    assert len(frames) == 4
    assert len(problems) == 1 and problems[0].severity == "warning"
    assert "only the first 4 frames" in problems[0].problem

    frames, problems = support.decode_uploads([support.Upload("broken.mp4", b"\x00" * 2048)], fps=1.0)
    assert frames == [] and len(problems) == 1 and problems[0].file == "broken.mp4"


def test_duplicate_names_stay_apart(good_uploads) -> None:
    frames, _ = support.decode_uploads([good_uploads[0], good_uploads[0]], fps=1.0)
    assert [f.name for f in frames] == ["frame_a.png", "frame_a.png (2)"]


def test_overlay_saliency_shapes_and_checks() -> None:
    image = _face_like(6)
    saliency = np.zeros((6, 6))
    saliency[2:4, 2:4] = 1.0
    out = support.overlay_saliency(image, saliency)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)
    with pytest.raises(ValueError, match="saliency"):
        support.overlay_saliency(image, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="image"):
        support.overlay_saliency(image[..., 0], saliency)


# --------------------------------------------------------------------------- with the real Predictor


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path):
    from painwatch.inference import Predictor

    return Predictor.load(tiny_bundle, seed=0)


@pytest.fixture(scope="module")
def expected(predictor, good_uploads):
    """The good uploads decoded, and the Predictor's answers for them (seed 0), computed once."""
    frames, problems = support.decode_uploads(good_uploads, fps=1.0)
    assert problems == []
    return frames, predictor.predict([f.image for f in frames], names=[f.name for f in frames])


def test_classify_frames_isolates_a_refused_frame(predictor, expected) -> None:
    frames, results = expected
    clip_frame = support.Frame("clip.avi @ 1.00 s", "clip.avi", 1.0, frames[0].image)
    refused = support.Frame("odd.png", "odd.png", None, np.zeros((8, 8, 4), np.uint8))  # RGBA array
    calls: list[tuple[int, int]] = []
    kept, answers, problems = support.classify_frames(
        predictor, [frames[0], refused, clip_frame], progress=lambda done, total: calls.append((done, total))
    )
    assert [f.name for f in kept] == [frames[0].name, "clip.avi @ 1.00 s"]
    assert [(p.file, p.severity) for p in problems] == [("odd.png", "error")]
    assert "could not be classified" in problems[0].problem
    assert calls == [(1, 3), (2, 3), (3, 3)]
    # Frame by frame gives the batch call's answers (noise seeded per frame), with the clip time set.
    assert answers[0].radius == results[0].radius and answers[0].label == results[0].label
    assert answers[0].time_s is None and answers[1].time_s == 1.0
    assert answers[1].radius == results[0].radius


def test_model_view_is_exactly_what_the_model_sees(predictor) -> None:
    # The page keeps the model's view (uint8) instead of the frame; fed back, it must give the same input.
    frame = np.concatenate([_face_like(7, 48), _face_like(8, 48)], axis=1)  # 48 x 96, not square
    seen = predictor.preprocess(frame)
    view = support.tensor_to_image(seen)
    assert view.shape == (32, 32, 3)
    assert torch.equal(predictor.preprocess(view), seen)


def test_thumbnail_outlines_the_centre_square() -> None:
    wide = np.zeros((300, 1200, 3), np.uint8)
    thumb = support.thumbnail_with_crop(wide, max_side=480)
    assert thumb.shape == (120, 480, 3)
    assert centre_square(120, 480) == (0, 180, 120)
    assert thumb[60, 180].tolist() == [255, 255, 255]  # left edge of the outline
    assert thumb[60, 100].tolist() == [0, 0, 0]  # outside: untouched
    square = _face_like(9, 40)
    assert np.array_equal(support.thumbnail_with_crop(square), square)  # small and square: as is
    with pytest.raises(ValueError, match="uint8"):
        support.thumbnail_with_crop(square.astype(np.float32))


def test_downloads_have_right_columns_and_values(predictor, expected) -> None:
    frames, results = expected
    provenance = support.Provenance.from_predictor(predictor)
    sha = predictor.metadata.weights_sha256

    rows = list(csv.DictReader(io.StringIO(support.results_csv(frames, results, provenance).decode())))
    assert list(rows[0]) == support.csv_columns(("no_pain", "pain"))
    assert [r["frame"] for r in rows] == [f.name for f in frames]
    for row, result in zip(rows, results, strict=True):
        assert row["label"] == result.label
        assert float(row["radius_l2"]) == result.radius
        assert float(row["prob_pain"]) == result.probabilities["pain"]
        assert row["bundle_weights_sha256"] == sha
        assert int(row["n"]) == result.n and float(row["sigma"]) == result.sigma
        assert int(row["n_budget"]) == predictor.settings.n == TINY_N

    problems = [support.FileProblem("x", "y")]
    document = json.loads(support.results_json(frames, results, provenance, problems=problems))
    assert document["bundle"]["weights_sha256"] == sha
    assert document["certification"]["n"] == TINY_N and document["certification"]["seed"] == 0
    assert [f["frame"] for f in document["frames"]] == [f.name for f in frames]
    assert document["frames"][0]["radius"] == results[0].radius
    assert document["problems"] == [{"file": "x", "problem": "y", "severity": "error"}]

    summary = support.summarize(results)
    assert summary.frames == 3 and summary.pain + summary.no_pain + summary.abstained == 3


# --------------------------------------------------------------------------- the page (AppTest)


def _app(monkeypatch: pytest.MonkeyPatch, bundle: Path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv(support.BUNDLE_ENV, str(bundle))
    at = AppTest.from_file(str(APP), default_timeout=APP_TIMEOUT_S)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _certified(at, timeout: float = APP_TIMEOUT_S):
    return harness.run_until_certified(at, timeout)


def test_page_without_bundle_says_how_to_build_it(monkeypatch, tmp_path: Path) -> None:
    at = _app(monkeypatch, tmp_path / "no-bundle-here")
    messages = " ".join(e.value for e in at.error)
    assert "No model bundle" in messages and "Ask whoever set up painwatch" in messages
    assert "make app" not in messages
    assert len(at.file_uploader) == 0


def test_page_table_equals_predictor_and_bad_files_are_named(
    monkeypatch, tiny_bundle, predictor, expected, good_uploads, bad_uploads
) -> None:
    at = _app(monkeypatch, tiny_bundle)
    assert len(at.file_uploader) == 1
    uploader = at.file_uploader[0]
    for upload in [*good_uploads, *bad_uploads[:3]]:
        uploader.upload(upload.name, upload.data, "application/octet-stream")
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]

    errors = " ".join(e.value for e in at.error)
    for name in ("notes.png", "cut.jpg", "empty.png"):
        assert name in errors
    table = at.dataframe[0].value
    # Still frames only: no time column, and no file column repeating the frame names.
    assert list(table.columns) == [c for c in support.TABLE_COLUMNS if c not in ("time (s)", "file")]
    assert list(table["frame"]) == ["frame_a.png", "frame_b.jpg", "frame_c.tiff"]

    # The page draws every frame's noise unpredictably and records its seed: the Predictor given those
    # seeds gives the page's answers exactly.
    page_results = at.session_state["batch"].results
    seeds = [r.noise_seed for r in page_results]
    assert all(isinstance(seed, int) for seed in seeds) and len(set(seeds)) == len(seeds)
    frames = expected[0]
    again = predictor.predict([f.image for f in frames], names=[f.name for f in frames], noise_seeds=seeds)
    for (_, row), result in zip(table.iterrows(), again, strict=True):
        assert row["class"] == (result.label if result.class_index >= 0 else "abstain")
        assert row["certified radius (L2)"] == result.radius
        assert row["radius (grey levels)"] == result.radius_grey_levels
        assert row["method"] == result.method
        if result.class_index >= 0:
            assert row["confidence"] == result.confidence
    assert any("frames analysed" in m.value for m in at.markdown)
    labels = [b.label for b in at.download_button]
    assert labels == ["Download CSV", "Download JSON"]
    assert len(at.image) >= 2  # the frame and its Grad-CAM overlay
    assert len(at.get("vega_lite_chart")) == 0  # no clip, no time course


def test_page_clip_gives_time_course(monkeypatch, tiny_bundle, tmp_path: Path) -> None:
    at = _app(monkeypatch, tiny_bundle)
    at.file_uploader[0].upload("clip.avi", _avi_clip(tmp_path / "clip.avi"), "video/x-msvideo")
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert list(table.columns) == list(support.TABLE_COLUMNS)
    assert list(table["time (s)"]) == pytest.approx([0.0, 1.0])
    assert set(table["file"]) == {"clip.avi"}
    assert len(at.get("vega_lite_chart")) == 1  # the time course
    assert any("Time course" in m.value for m in at.markdown)


def test_page_settings_apply_and_refused_method_keeps_uploads(monkeypatch, tiny_bundle, good_uploads) -> None:
    at = _app(monkeypatch, tiny_bundle)
    at.file_uploader[0].upload(good_uploads[0].name, good_uploads[0].data, "image/png")
    at.slider(key="sigma").set_value(0.3)  # inside the bundle's bounds
    at.button(key="apply").click()  # the settings form's submit button
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["batch"].provenance.certification["sigma"] == pytest.approx(0.3)
    assert at.session_state["batch"].results[0].sigma == pytest.approx(0.3)

    # Only the methods this network can be certified with are offered: a ResNet has no sound Lipschitz
    # bound, so neither Lipschitz method is (and the help names only those offered).
    method = at.selectbox(key="method")
    assert list(method.options) == ["randomized_smoothing", "soft_smoothing"]
    assert "lipschitz" not in method.help and "majority vote" in method.help
    method.set_value("soft_smoothing")
    at.button(key="apply").click()
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["batch"].results[0].method.startswith("soft_smoothing")
    assert len(at.file_uploader) == 1 and len(at.file_uploader[0].value) == 1


def test_page_refuses_too_large_file(monkeypatch, tiny_bundle, good_uploads) -> None:
    at = _app(monkeypatch, tiny_bundle)
    at.file_uploader[0].upload("huge.png", b"\0" * (support.MAX_IMAGE_BYTES + 1), "image/png")
    at.file_uploader[0].upload(good_uploads[0].name, good_uploads[0].data, "image/png")
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]
    message = " ".join(e.value for e in at.error)
    assert "huge.png" in message and "larger than the 30.0 MB allowed for one frame" in message
    assert list(at.dataframe[0].value["frame"]) == [good_uploads[0].name]


def test_server_config_listens_locally_and_limits_uploads() -> None:
    import tomllib

    config = tomllib.loads((REPO_ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    # The server refuses anything bigger than the page's largest per-file limit.
    assert config["server"]["maxUploadSize"] * support.MEGABYTE == max(support.MAX_CLIP_BYTES,
                                                                       support.MAX_IMAGE_BYTES)


def test_page_switching_bundle_resets_settings_to_its_defaults(monkeypatch, tiny_bundle, tmp_path) -> None:
    from painwatch.models import create_model, default_certification, save_bundle

    other = tmp_path / "other-bundle"
    certification = default_certification(sigma=0.5)
    certification.update({"n0": 16, "n": 200, "alpha": 0.001})
    save_bundle(other, create_model("test_resnet", num_classes=2, input_size=32, seed=1),
                {"certification": certification})
    at = _app(monkeypatch, tiny_bundle)
    assert at.slider(key="sigma").value == pytest.approx(0.25)
    at.slider(key="sigma").set_value(0.3)
    at.button(key="apply").click()
    at.run()
    assert at.slider(key="sigma").value == pytest.approx(0.3)

    at.text_input[0].set_value(str(other))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.slider(key="sigma").value == pytest.approx(0.5)
    assert at.select_slider(key="n").value == 200
    assert at.select_slider(key="alpha").value == pytest.approx(0.001)


FAILED_GATE = GateVerdict(
    gate_file="default.toml",
    passed=False,
    date="2026-11-25T13:54:17+00:00",
    results=(
        {"name": "min_accuracy", "detail": "accuracy (point estimate) >= 0.6", "passed": False,
         "threshold": 0.6, "value": 0.425},
        {"name": "max_ece", "detail": "ece (point estimate) <= 0.2", "passed": True, "threshold": 0.2,
         "value": 0.09},
    ),
    details={"held_out": True, "individuals": ["syn-m06", "syn-m07"], "num_frames": 40, "thresholds": {},
             "report": "report.html"},
)


def test_gate_lines() -> None:
    assert support.gate_lines(None) == ("not run", [])
    headline, failed = support.gate_lines(FAILED_GATE)
    assert headline == "default.toml: FAILED on 2026-11-25 13:54 UTC (40 frames of 2 held-out individuals)"
    assert failed == ["accuracy (point estimate) >= 0.6: got 0.425"]
    passed = GateVerdict(gate_file="strict.toml", passed=True)
    assert support.gate_lines(passed) == ("strict.toml: passed", [])


def test_page_shows_a_failed_gate_with_its_failed_checks(monkeypatch, tiny_bundle, tmp_path) -> None:
    import shutil

    from painwatch.models import record_gate_verdict

    gated = tmp_path / "gated-bundle"
    shutil.copytree(tiny_bundle, gated)
    record_gate_verdict(gated, FAILED_GATE)
    record_gate_verdict(gated, GateVerdict(gate_file="strict.toml", passed=True, date="2026-11-26T09:00:00"))
    at = _app(monkeypatch, gated)
    message = " ".join(e.value for e in at.error)
    assert "Certification gate default.toml: FAILED on 2026-11-25 13:54 UTC" in message
    # Every gate file's verdict is shown: a later gate does not hide an earlier one.
    assert any("Certification gate strict.toml: passed" in s.value for s in at.success)
    assert "accuracy (point estimate) >= 0.6: got 0.425" in message
    assert "ece" not in message  # passed checks are not listed as failures


def test_page_answers_a_lipschitz_bundle_in_one_pass_and_says_so(monkeypatch, tmp_path, good_uploads) -> None:
    from painwatch.models import create_model, save_bundle

    folder = tmp_path / "lip-bundle"
    save_bundle(folder, create_model("lip-sll-tiny", input_size=32, seed=0))  # default: lipschitz
    at = _app(monkeypatch, folder)
    at.file_uploader[0].upload(good_uploads[0].name, good_uploads[0].data, "image/png")
    _certified(at)  # the worker reads the certificate from the answer's logits, on its own thread
    result = at.session_state["batch"].results[0]
    assert (result.method, result.forward_passes, result.alpha) == ("lipschitz", 1, 0.0)
    captions = " ".join(c.value for c in at.caption)
    assert "1 network evaluation each" in captions  # the time per frame
    assert "method lipschitz: one network evaluation per frame, no noise" in captions
    assert "Method lipschitz: 1 network evaluation, no noise" in captions


# --------------------------------------------------------------------------- the in-distribution check


@pytest.fixture(scope="module")
def checked_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's network with an in-distribution check fitted on structured frames."""
    from painwatch.data import eval_transform
    from painwatch.models import (
        InDistributionSpec,
        create_model,
        default_certification,
        descriptor_pass,
        fit_in_distribution,
        save_bundle,
    )
    from painwatch.models.in_distribution import default_layers

    model = create_model("test_resnet", num_classes=2, input_size=32, seed=0).eval()
    spec = InDistributionSpec(layers=default_layers(model))
    transform = eval_transform(32)

    def describe(seeds: range) -> dict:
        frames = torch.stack([transform(_face_like(s % 9)) for s in seeds])
        return descriptor_pass(model, frames, spec.layers)[1]

    check = fit_in_distribution(describe(range(40)), [f"m{s % 4}" for s in range(40)],
                                describe(range(40, 70)), spec=spec)
    certification = default_certification(sigma=0.25)
    certification.update({"n0": 16, "n": TINY_N, "alpha": 0.01, "batch_size": 50})
    folder = tmp_path_factory.mktemp("checked") / "checked-bundle"
    save_bundle(folder, model, {"certification": certification}, in_distribution=check)
    return folder


def test_page_says_why_a_picture_unlike_the_training_frames_is_refused(monkeypatch, checked_bundle) -> None:
    at = _app(monkeypatch, checked_bundle)
    assert not any("cannot tell when a picture is not a macaque face" in w.value for w in at.warning)
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    at.file_uploader[0].upload("noise.png", _encode(noise, "PNG"), "image/png")
    at.file_uploader[0].upload("frame_a.png", _encode(_face_like(1), "PNG"), "image/png")
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    statuses = dict(zip(table["frame"], table["status"], strict=True))
    assert statuses["noise.png"] == "refused: not like the training face crops"
    assert statuses["frame_a.png"] != statuses["noise.png"]
    # The frame view (first frame: the noise) says why in words, with the score and the threshold.
    assert any(m.value == "### Refused" for m in at.markdown)
    captions = " ".join(c.value for c in at.caption)
    assert "does not look like the macaque face crops the model was trained on" in captions
    assert "above the threshold" in captions
    result = at.session_state["batch"].results[0]
    rows = list(csv.DictReader(io.StringIO(support.results_csv(
        at.session_state["batch"].frames, at.session_state["batch"].results,
        at.session_state["batch"].provenance).decode())))
    assert rows[0]["abstain_reason"] == result.abstain_reason
    assert float(rows[0]["in_distribution_score"]) == result.in_distribution_score


def test_page_warns_that_an_old_bundle_cannot_refuse_other_pictures(monkeypatch, tiny_bundle) -> None:
    at = _app(monkeypatch, tiny_bundle)
    warnings = " ".join(w.value for w in at.warning)
    assert "This model cannot tell when a picture is not a macaque face" in warnings
    assert "made before painwatch fitted an in-distribution check" in warnings
def test_page_words_a_vet_can_act_on(monkeypatch, tmp_path, bundle_factory, good_uploads) -> None:
    training = {"individuals": ["syn-m01"], "synthetic_data": True, "noise_sigma": 0.25}
    synthetic = bundle_factory(tmp_path / "synthetic-bundle", training=training,
                               certification={"n0": 16, "n": TINY_N, "alpha": 0.01, "batch_size": 50})
    at = _app(monkeypatch, synthetic)
    warnings = " ".join(w.value for w in at.warning)
    assert "SYNTHETIC" in warnings  # said where the gate verdict is shown
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "*g*" not in sidebar and "grey levels of 255 per pixel for this model" in sidebar
    assert "per pixel" in at.slider(key="sigma").label
    uploader = at.file_uploader[0]
    assert uploader.proto.max_upload_size_mb == support.MAX_CLIP_BYTES // support.MEGABYTE
    assert f"{support.MAX_IMAGE_BYTES // support.MEGABYTE} MB" in uploader.help
    uploader.upload("report.pdf", b"%PDF-1.4", "application/pdf")  # the uploader lets every type through
    uploader.upload(good_uploads[0].name, good_uploads[0].data, "image/png")
    _certified(at)
    assert not at.exception, [e.value for e in at.exception]
    errors = " ".join(e.value for e in at.error)
    assert "report.pdf" in errors and "unsupported file type '.pdf'" in errors
    status = at.dataframe[0].value["status"].tolist()
    words = ("robust to small pixel changes", "no guarantee", "refused")
    assert all(value.startswith(words) for value in status)
    page_text = " ".join(m.value for m in at.markdown)
    assert "not mean the answer is correct" in page_text
    assert "certified" not in status
