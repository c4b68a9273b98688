"""``painwatch predict``: listing an archive, one row per frame, noise seeds, resuming, bad files (no Ray)."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from bulk_fixtures import read_rows, write_archive, write_bundle, write_clip
from PIL import Image

from painwatch.cli import main
from painwatch.data import read_video_frame, read_video_frames
from painwatch.inference import Predictor
from painwatch.inference.bulk import BulkError, list_frames, make_chunks, predict_bulk
from painwatch.inference.bulk_settings import BulkSettings, DistributedSettings
from painwatch.inference.rows import CSV_COLUMNS_TAIL, DETAIL_COLUMNS, csv_columns

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--n", "100", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bulk") / "bundle")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_archive(tmp_path_factory.mktemp("bulk") / "archive")


def _predict(bundle: Path, inputs: list[Path], out: Path, *extra: str) -> int:
    return main(["predict", str(bundle), *map(str, inputs), "--out", str(out), *FAST, *extra])


# ------------------------------------------------------------------------------------------ listing
def test_listing_walks_folders_manifests_and_clips_and_names_what_it_skips(
    archive: Path, tmp_path: Path
) -> None:
    frames, problems = list_frames([archive], fps=4)
    still = [f for f in frames if f.time_s is None]
    clip = [f for f in frames if f.time_s is not None]
    assert [Path(f.file).name for f in still] == ["broken.jpg", "face_0.png", "face_1.png", "face_2.png"]
    np.testing.assert_allclose([f.time_s for f in clip], [0.0, 0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8, 2.0, 2.3],
                               atol=1e-9)  # the clip's sampling rule (painwatch.data.sample_times)
    assert all(Path(f.file).is_absolute() for f in frames)
    assert [Path(p.file).name for p in problems] == ["notes.txt"]  # broken.jpg fails when read, not here
    assert "not an image, a clip or a manifest" in problems[0].problem

    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,video,time_s,x0,y0,x1,y1,label\n"
        f"{archive}/faces/face_0.png,,,0,0,20,20,pain\n"            # an image with a face box
        f",{archive}/clips/clip.avi,1.25,,,,,\n"                     # one frame of a clip
        f"{archive}/faces/face_0.png,,,,,,,\n"                       # listed twice: answered once
        "missing.png,,,,,,,\n"                                       # fails when read
        f"{archive}/faces/face_1.png,,,5,5,3,9,\n"                   # an empty box
        f"{archive}/faces/face_2.png,,oops,,,,,\n"                   # a time that is not a number
        ",,,,,,,\n", encoding="utf-8")
    frames, problems = list_frames([manifest, tmp_path / "nowhere"], fps=1)
    assert [(Path(f.file).name, f.time_s, f.box) for f in frames] == [
        ("face_0.png", None, (0, 0, 20, 20)), ("clip.avi", 1.25, None), ("missing.png", None, None)]
    assert frames[2].file == str(tmp_path / "missing.png")  # relative to the manifest's folder
    messages = [f"{p.where}: {p.problem}" for p in problems]
    assert any("row 6" in m and "is empty" in m for m in messages)
    assert any("row 7" in m and "oops" in m for m in messages)
    assert any("row 8" in m and "neither a path nor a video" in m for m in messages)
    assert any("nowhere" in m and "does not exist" in m for m in messages)
    assert any("listed again" in m and "row 4" in m for m in messages)


def test_chunks_hold_still_images_or_one_clip(archive: Path) -> None:
    frames, _ = list_frames([archive / "faces", archive / "clips" / "clip.avi", archive / "faces"], fps=2)
    chunks = make_chunks(frames, 2)
    assert sum(map(len, chunks)) == len(frames)
    for chunk in chunks:
        assert len(chunk) <= 2
        assert len({(f.time_s is None, f.file if f.time_s is not None else "") for f in chunk}) == 1


def test_read_video_frames_gives_read_video_frame_for_every_time(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi")
    times = [0.0, 0.05, 0.1, 1.234, 2.4, 2.45, 0.1]
    frames = read_video_frames(clip, times)
    for time_s in times:
        np.testing.assert_array_equal(frames[time_s], read_video_frame(clip, time_s))
    assert 2.5 not in read_video_frames(clip, [2.5])  # past the end: no frame, the caller names it
    with pytest.raises(ValueError, match="finite number"):
        read_video_frames(clip, [-1.0])


# ---------------------------------------------------------------------------------------- answering
def test_one_row_per_frame_with_the_predictor_s_fields_and_problems_named(
    bundle: Path, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.csv"
    assert _predict(bundle, [archive], out, "--seed", "0", "--fps", "2") == 1  # some frames failed
    rows = read_rows(out)
    frames, _ = list_frames([archive], fps=2)
    answered = [f for f in frames if not f.file.endswith("broken.jpg")]
    assert [(r["file"], r["time_s"]) for r in rows] == [f.key for f in answered]  # listing order
    with open(out, encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == [*csv_columns(("no_pain", "pain")), *DETAIL_COLUMNS]
    assert set(CSV_COLUMNS_TAIL) < set(header)
    predictor = Predictor.load(bundle, n=100, seed=0)
    image = np.asarray(Image.open(archive / "faces" / "face_1.png").convert("RGB"))
    (expected,) = predictor.predict([image], ["x"])
    row = next(r for r in rows if r["file"].endswith("face_1.png"))
    assert (row["label"], float(row["radius_l2"]), int(row["noise_seed"])) == (
        expected.label, expected.radius, expected.noise_seed)  # floats at full precision
    assert float(row["confidence"]) == expected.confidence and row["seed"] == "0"
    assert row["classifier"] == expected.classifier and row["n_budget"] == "100"
    clip_rows = [r for r in rows if r["file"].endswith("clip.avi")]
    assert [r["frame"].rsplit(" @ ", 1)[1] for r in clip_rows][:2] == ["0.000 s", "0.500 s"]
    problems = read_rows(out.with_suffix(".problems.csv"))
    assert {Path(p["file"]).name for p in problems} == {"broken.jpg", "notes.txt"}
    assert "not an image" in next(p["problem"] for p in problems if p["file"].endswith("broken.jpg"))
    assert "problems:" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary file


def test_resuming_skips_answered_frames_and_gives_the_same_file(
    bundle: Path, archive: Path, tmp_path: Path
) -> None:
    inputs = [archive / "faces", archive / "clips"]
    straight = tmp_path / "straight.csv"
    assert _predict(bundle, inputs, straight, "--seed", "3", "--chunk-frames", "2") == 0
    lines = straight.read_text(encoding="utf-8").splitlines(keepends=True)
    # A run that stopped after some chunks: the header and the first rows, in some other order.
    partial = tmp_path / "partial.csv"
    partial.write_text(lines[0] + lines[5] + lines[2], encoding="utf-8")
    settings = BulkSettings(bundle=bundle, inputs=tuple(map(str, inputs)), out=partial, n=100, seed=3,
                            device="cpu", progress=False)
    outcome = predict_bulk(settings, log=lambda _: None)
    assert (outcome.frames_skipped, outcome.frames_answered) == (2, len(lines) - 3)
    assert partial.read_text(encoding="utf-8") == straight.read_text(encoding="utf-8")
    again = predict_bulk(settings, log=lambda _: None)
    assert (again.frames_answered, again.frames_skipped) == (0, len(lines) - 1)
    assert not straight.with_suffix(".problems.csv").exists()


def test_deployment_seeds_are_unpredictable_and_reusable(bundle: Path, archive: Path, tmp_path: Path) -> None:
    inputs = [archive / "faces"]
    first, second, again = tmp_path / "first.csv", tmp_path / "second.csv", tmp_path / "again.csv"
    assert _predict(bundle, inputs, first) == 0
    assert _predict(bundle, inputs, second) == 0
    seeds = [r["noise_seed"] for r in read_rows(first)]
    assert seeds != [r["noise_seed"] for r in read_rows(second)]  # the operating system's entropy
    assert {r["seed"] for r in read_rows(first)} == {""}
    assert _predict(bundle, inputs, again, "--noise-seeds", str(first)) == 0
    assert again.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")  # same seeds, same rows


def test_continuing_with_another_bundle_or_settings_is_refused(
    bundle: Path, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.csv"
    assert _predict(bundle, [archive / "faces"], out, "--seed", "0") == 0
    before = out.read_text(encoding="utf-8")
    assert _predict(bundle, [archive / "faces"], out, "--seed", "1") == 2
    assert "seed = '0', this run has '1'" in capsys.readouterr().err
    assert main(["predict", str(bundle), str(archive / "faces"), "--out", str(out), "--n", "200",
                 "--seed", "0", "--quiet"]) == 2
    assert "n_budget" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n", encoding="utf-8")
    assert _predict(bundle, [archive / "faces"], other) == 2
    assert "other columns" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == before
    with pytest.raises(BulkError, match="noise_seed 'x' is not an integer"):
        bad = tmp_path / "seeds.csv"
        bad.write_text("file,time_s,noise_seed\na.png,,x\n", encoding="utf-8")
        predict_bulk(BulkSettings(bundle=bundle, inputs=(str(archive),), out=tmp_path / "n.csv",
                                  noise_seeds=bad, progress=False), log=lambda _: None)


def test_the_engine_is_chosen_recorded_and_kept_when_continuing(
    bundle: Path, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.csv"
    assert _predict(bundle, [archive / "faces"], out, "--seed", "0", "--runtime", "torch",
                    "--precision", "fp32") == 0
    rows = read_rows(out)
    assert {(r["runtime"], r["precision"]) for r in rows} == {("torch", "fp32")}
    # The network as trained: the same rows as a Predictor told the same engine.
    predictor = Predictor.load(bundle, n=100, seed=0, runtime="torch", precision="fp32")
    image = np.asarray(Image.open(archive / "faces" / "face_1.png").convert("RGB"))
    (expected,) = predictor.predict([image], ["x"])
    row = next(r for r in rows if r["file"].endswith("face_1.png"))
    assert (row["label"], float(row["radius_l2"])) == (expected.label, expected.radius)
    before = out.read_text(encoding="utf-8")
    other = "openvino" if predictor.runtime == "torch" else "torch"
    assert _predict(bundle, [archive / "faces"], out, "--seed", "0", "--runtime", other,
                    "--precision", "fp32") == 2  # certificates about another engine's model
    assert f"runtime = 'torch', this run has '{other}'" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == before
    with pytest.raises(SystemExit):
        main(["predict", str(bundle), str(archive), "--out", str(out), "--runtime", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_settings_name_bad_values() -> None:
    with pytest.raises(ValueError, match="--fps"):
        BulkSettings(bundle=Path("b"), inputs=("x",), out=Path("o.csv"), fps=0)
    with pytest.raises(ValueError, match=r"--out must name a \.csv"):
        BulkSettings(bundle=Path("b"), inputs=("x",), out=Path("o.txt"))
    with pytest.raises(ValueError, match="--fold-gpus"):
        DistributedSettings(fold_gpus=-1)
    with pytest.raises(ValueError, match="--workers"):
        DistributedSettings(workers=0)


def test_ray_option_alone_means_a_local_ray_and_takes_an_address() -> None:
    from painwatch.cli import build_parser
    from painwatch.cli.options import config_from_args

    parser = build_parser()
    for tail, expected in (([], None), (["--ray"], "local"), (["--ray", "10.0.0.1:6379"], "10.0.0.1:6379")):
        args = parser.parse_args(["predict", "b", "i", "--out", "o.csv", *tail])
        assert config_from_args(DistributedSettings, args).ray == expected
    args = parser.parse_args(["loio", "data", "--out", "run", "--ray", "--fold-gpus", "0.5"])
    assert config_from_args(DistributedSettings, args).fold_gpus == 0.5


def _run_python(script: str) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_ray_the_command_line_and_a_local_bulk_run_leave_ray_alone(
    bundle: Path, archive: Path, tmp_path: Path
) -> None:
    _run_python(f"""
        import sys
        import painwatch.cli
        painwatch.cli.build_parser()
        assert "ray" not in sys.modules and "torch" not in sys.modules
        from painwatch.inference.bulk import predict_bulk
        from painwatch.inference.bulk_settings import BulkSettings, DistributedSettings
        predict_bulk(BulkSettings(bundle={str(bundle)!r}, inputs=({str(archive / "faces")!r},),
                                  out={str(tmp_path / "r.csv")!r}, n=100, progress=False),
                     cluster=DistributedSettings(), log=lambda _: None)
        assert "ray" not in sys.modules, "a local bulk run imported ray"
    """)
    assert len(read_rows(tmp_path / "r.csv")) == 3


@pytest.mark.slow
def test_without_ray_a_local_loio_run_leaves_ray_alone(tmp_path: Path) -> None:
    data = tmp_path / "frames"
    for index in range(3):
        for label in ("no_pain", "pain"):
            (data / f"m{index}" / label).mkdir(parents=True)
            for k in range(2):
                value = 60 + 40 * k + (90 if label == "pain" else 0)
                image = Image.fromarray(np.full((36, 36, 3), value + index, np.uint8))
                image.save(data / f"m{index}" / label / f"{k}.png")
    _run_python(f"""
        import sys
        from painwatch.evaluation.loio import run_loio
        from painwatch.evaluation.settings import LoioSettings
        from painwatch.training import TrainConfig
        train = TrainConfig(arch="test_resnet", input_size=32, batch_size=8, head_epochs=2)
        run_loio(LoioSettings(data={str(data)!r}, out={str(tmp_path / "run")!r}, train=train,
                              cache_features=True, inner_val_individuals=1, bootstrap_reps=5, progress=False),
                 log=lambda _: None)
        assert "ray" not in sys.modules, "a local LOIO run imported ray"
    """)
    assert (tmp_path / "run" / "metrics.json").is_file()
