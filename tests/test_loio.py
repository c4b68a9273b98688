"""Leave-one-individual-out: splits by individual, resume after a crash, the CLI end to end, reports."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from painwatch import CLASS_NAMES
from painwatch.cli import main
from painwatch.data import fold_seed, load_records, loio_folds
from painwatch.evaluation.loio import LoioError, run_loio
from painwatch.evaluation.loio_checks import DESCRIPTORS_FILE, cached_descriptors
from painwatch.evaluation.report import Report, table_to_html, table_to_markdown
from painwatch.evaluation.settings import LoioSettings
from painwatch.io import atomic_write_json, atomic_write_text, to_json_text
from painwatch.training import TrainConfig

TINY = {"arch": "test_resnet", "input_size": 32, "batch_size": 8}
TRAIN_FIELDS = frozenset(TrainConfig.__dataclass_fields__)


def _settings(data: Path, out: Path, **values) -> LoioSettings:
    """LoioSettings of ``values``: the TrainConfig fields among them make up the folds' training."""
    train = TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS})
    return LoioSettings(data=str(data), out=str(out), train=train,
                        **{k: v for k, v in values.items() if k not in TRAIN_FIELDS})


def _write_tiny_dataset(
    root: Path, individuals: int = 4, frames_per_class: int = 4, seed: int = 0, obvious: bool = False
) -> Path:
    """Folder layout DATA/<individual>/<label>/*.png with 40x40 frames: pain frames carry a dark band
    (a crude 'squeezed eyes' cue) at an individual-specific height; every frame has its own noise.
    ``obvious``: pain frames are also much darker overall, a cue any backbone's pooled features carry."""
    rng = np.random.default_rng(seed)
    for i in range(individuals):
        base = rng.integers(60, 200, size=3)
        for label in CLASS_NAMES:
            folder = root / f"macaque_{i:02d}" / label
            folder.mkdir(parents=True)
            for k in range(frames_per_class):
                image = np.clip(base + rng.normal(0, 25, size=(40, 40, 3)), 0, 255)
                if label == "pain":
                    row = 12 + i % 3
                    image[row : row + 6, 6:34] *= 0.25
                    if obvious:
                        image *= 0.3
                Image.fromarray(image.astype(np.uint8)).save(folder / f"frame_{k}.png")
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_dataset(tmp_path_factory.mktemp("data") / "frames")


# ----------------------------------------------------------------------------------------------- splits
@pytest.mark.parametrize(("num_individuals", "inner_individuals"), [(3, None), (7, 2), (21, None), (21, 4)])
def test_split_never_puts_one_individual_on_two_sides(num_individuals: int, inner_individuals) -> None:
    rng = np.random.default_rng(num_individuals)
    groups = [f"m{g}" for g in rng.integers(0, num_individuals, size=400)]
    groups += [f"m{g}" for g in range(num_individuals)]  # every individual present
    folds = loio_folds(groups, inner_val_individuals=inner_individuals, seed=3)
    assert len(folds) == num_individuals
    assert [fold.test_individual for fold in folds] == sorted(set(groups))
    tested = np.concatenate([fold.test for fold in folds])
    assert sorted(tested.tolist()) == list(range(len(groups)))  # each frame tested exactly once
    for fold in folds:
        parts = {name: set(fold.individuals(groups, name)) for name in ("train", "validation", "test")}
        assert parts["test"] == {fold.test_individual}
        assert not parts["train"] & parts["validation"]
        assert not parts["train"] & parts["test"]
        assert not parts["validation"] & parts["test"]
        assert parts["train"] and parts["validation"]
        if inner_individuals is not None:
            assert len(parts["validation"]) == inner_individuals
        every = np.concatenate([fold.train, fold.validation, fold.test])
        assert sorted(every.tolist()) == list(range(len(groups)))
    again = loio_folds(groups, inner_val_individuals=inner_individuals, seed=3)
    assert all(np.array_equal(a.validation, b.validation) for a, b in zip(folds, again, strict=True))


def test_default_inner_split_is_a_fifth_of_the_individuals_rounded_up() -> None:
    groups = [f"m{i:02d}" for i in range(21) for _ in range(2)]
    folds = loio_folds(groups)
    assert {len(fold.individuals(groups, "validation")) for fold in folds} == {4}


def test_split_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least 3 individuals"):
        loio_folds(["a", "a", "b"])
    with pytest.raises(ValueError, match=r"inner_val_individuals must be in \[1, 1\]"):
        loio_folds(["a", "b", "c"], inner_val_individuals=2)
    with pytest.raises(ValueError, match="inner_val_fraction"):
        loio_folds(["a", "b", "c"], inner_val_fraction=1.5)


def test_fold_seeds_differ_and_are_stable() -> None:
    seeds = [fold_seed(0, k) for k in range(21)]
    assert len(set(seeds)) == 21
    assert seeds == [fold_seed(0, k) for k in range(21)]
    assert fold_seed(1, 0) != fold_seed(0, 0)


# ------------------------------------------------------------------------------------------- resume
def _head_settings(data: Path, out: Path, **overrides) -> LoioSettings:
    values = {
        **TINY,
        "epochs": 1,
        "cache_features": True,
        "head_epochs": 5,
        "inner_val_individuals": 1,
        "bootstrap_reps": 50,
        "progress": False,
    }
    values.update(overrides)
    return _settings(data, out, **values)


def test_resume_after_a_crash_gives_identical_metrics(tiny_data: Path, tmp_path: Path) -> None:
    reference = run_loio(_head_settings(tiny_data, tmp_path / "straight"), log=lambda _: None)
    assert reference.complete and reference.folds_run_now == 4

    class SimulatedCrashError(RuntimeError):
        pass

    def crash_after_two(result: dict) -> None:
        if result["fold"] == 1:
            raise SimulatedCrashError("simulated crash")

    crashed = tmp_path / "crashed"
    messages: list[str] = []
    with pytest.raises(SimulatedCrashError):
        run_loio(_head_settings(tiny_data, crashed), on_fold_done=crash_after_two, log=messages.append)
    assert any("extracted once" in message for message in messages)
    assert sorted(p.parent.name for p in crashed.glob("folds/*/result.json")) == ["fold_00", "fold_01"]
    assert not (crashed / "metrics.json").exists()
    # One more fold with --max-folds, then the rest.
    messages.clear()
    partial = run_loio(_head_settings(tiny_data, crashed, max_folds=1), resume=True, log=messages.append)
    assert any("read from the cache" in message for message in messages)  # features computed once per run
    assert (partial.folds_done, partial.folds_run_now, partial.complete) == (3, 1, False)
    resumed = run_loio(_head_settings(tiny_data, crashed), resume=True, log=lambda _: None)
    assert resumed.complete and resumed.folds_run_now == 1
    assert resumed.metrics["evaluation"] == reference.metrics["evaluation"]
    straight_csv = (tmp_path / "straight" / "predictions.csv").read_text()
    assert (crashed / "predictions.csv").read_text() == straight_csv


def test_an_obvious_cue_is_learned_end_to_end(tmp_path: Path) -> None:
    # Guards the wiring: frames, labels, folds, logits and temperatures must stay aligned.
    data = _write_tiny_dataset(tmp_path / "data", individuals=4, frames_per_class=5, seed=1, obvious=True)
    outcome = run_loio(_head_settings(data, tmp_path / "run", head_epochs=20), log=lambda _: None)
    pooled = outcome.metrics["evaluation"]["pooled"]
    assert pooled["accuracy"] >= 0.9
    assert pooled["roc_auc"] >= 0.95


def test_resume_refuses_different_settings_and_names_them(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_loio(_head_settings(tiny_data, out, max_folds=1), log=lambda _: None)
    with pytest.raises(LoioError, match=r"seed: the run has 0, now 5") as error:
        run_loio(_head_settings(tiny_data, out, seed=5, head_l2=0.5), resume=True, log=lambda _: None)
    assert "head_l2" in str(error.value)
    with pytest.raises(LoioError, match="pass --resume"):
        run_loio(_head_settings(tiny_data, out), log=lambda _: None)
    # Settings that cannot change a fold may differ.
    outcome = run_loio(
        _head_settings(tiny_data, out, bootstrap_reps=20, max_folds=1), resume=True, log=lambda _: None
    )
    assert outcome.folds_done == 2


def test_resume_refuses_changed_data(tmp_path: Path) -> None:
    data = _write_tiny_dataset(tmp_path / "data", individuals=3, frames_per_class=2)
    out = tmp_path / "run"
    run_loio(_head_settings(data, out, max_folds=1), log=lambda _: None)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # the same frames elsewhere: resuming is fine
    assert run_loio(_head_settings(moved, out, max_folds=1), resume=True, log=lambda _: None).folds_done == 2
    extra = data / "macaque_00" / "pain" / "extra.png"
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(extra)
    with pytest.raises(LoioError, match="data_hash"):
        run_loio(_head_settings(data, out), resume=True, log=lambda _: None)


# ---------------------------------------------------------------------------------------------- CLI
FINE_TUNE_ARGS = [
    "--arch",
    "test_resnet",
    "--input-size",
    "32",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--inner-val-individuals",
    "1",
    "--bootstrap-reps",
    "40",
    "--quiet",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def fine_tuned_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("loio") / "run"
    argv = ["loio", str(tiny_data), "--out", str(out), *FINE_TUNE_ARGS]
    assert main(argv) == 0
    return out, argv


def test_cli_end_to_end_fine_tuning(fine_tuned_run, capsys: pytest.CaptureFixture) -> None:
    out, argv = fine_tuned_run
    for name in (
        "config.json",
        "metrics.json",
        "predictions.csv",
        "report.md",
        "report.html",
        "confusion_matrix.png",
        "roc.png",
        "reliability.png",
        "per_individual.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "folds" / "fold_03" / "model" / "weights.safetensors").is_file()

    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 32
    for row in rows:  # each frame is predicted by the fold that left its individual out
        assert row["individual"] == f"macaque_{int(row['fold']):02d}"
    for row in rows:
        probabilities = [float(row[f"prob_{name}"]) for name in CLASS_NAMES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert int(row["predicted"]) == int(np.argmax(probabilities))
        assert row["correct"] == str(int(row["predicted"] == row["label"]))

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["frames_used"] == 32
    evaluation = metrics["evaluation"]
    assert evaluation["num_individuals"] == 4
    labels = np.array([int(r["label"]) for r in rows])
    predicted = np.array([int(r["predicted"]) for r in rows])
    assert evaluation["pooled"]["accuracy"] == pytest.approx(float(np.mean(labels == predicted)))
    assert len(metrics["folds"]) == 4
    html = (out / "report.html").read_text()
    assert "64%" in html and "61%" in html and "69%" in html  # published numbers beside ours
    markdown = (out / "report.md").read_text()
    assert "32 frames of 4 individuals" in markdown
    assert "random weights" in markdown  # no ImageNet weights given: the report says what to expect

    # A second run into the same folder without --resume is refused with a clear message.
    capsys.readouterr()
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_fine_tuning_resume_reproduces_the_straight_run(
    fine_tuned_run, tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    straight, _ = fine_tuned_run
    out = tmp_path / "run"
    argv = ["loio", str(tiny_data), "--out", str(out), *FINE_TUNE_ARGS]
    assert main([*argv, "--max-folds", "2"]) == 0
    assert "2 of 4 folds done" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()
    assert main([*argv, "--resume"]) == 0
    assert "resuming: 2 of 4 folds already done" in capsys.readouterr().err
    assert (out / "predictions.csv").read_text() == (straight / "predictions.csv").read_text()
    ours = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert ours == json.loads((straight / "metrics.json").read_text())["evaluation"]


def test_cli_reports_bad_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _write_tiny_dataset(tmp_path / "data", individuals=3, frames_per_class=2)
    for frame in (data / "macaque_01" / "pain").iterdir():
        frame.unlink()
    (data / "macaque_01" / "pain").rmdir()
    assert main(["loio", str(data), "--out", str(tmp_path / "run"), "--quiet"]) == 2  # a usage error
    error = capsys.readouterr().err
    assert "macaque_01" in error and "no_pain" in error
    assert not (tmp_path / "run").exists()


def test_cli_rejects_noise_with_cached_features(tiny_data: Path, tmp_path: Path, capsys) -> None:
    argv = ["loio", str(tiny_data), "--out", str(tmp_path / "r"), "--cache-features", "--noise-sigma", "0.1"]
    assert main(argv) == 2
    assert "--cache-features" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ reports
def test_tables_escape_markup() -> None:
    rows = [{"individual": "<script>alert(1)</script>", "note": "a|b", "value": 0.12345, "missing": None}]
    html = table_to_html(rows, caption="x & y")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "x &amp; y" in html and "0.123" in html and "—" in html
    markdown = table_to_markdown(rows)
    assert "a\\|b" in markdown and "<script>" not in markdown
    assert markdown.splitlines()[1] == "|---|---|---|---|"


def test_report_renders_both_formats_and_rejects_paths(tmp_path: Path) -> None:
    report = Report("Title <b>")
    report.heading("Section").paragraph("1 < 2 & 3").table([{"a": 1}]).image("plot.png", 'a "plot"')
    paths = report.write(tmp_path)
    html = paths["html"].read_text()
    assert "<title>Title &lt;b&gt;</title>" in html and "1 &lt; 2 &amp; 3" in html
    assert 'src="plot.png"' in html and 'alt="a &quot;plot&quot;"' in html
    assert '![a "plot"](plot.png)' in paths["markdown"].read_text()
    with pytest.raises(ValueError, match="file name beside the report"):
        report.image("../elsewhere/plot.png", "x")


def test_atomic_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    atomic_write_text(tmp_path / "sub" / "a.txt", "two")
    content = {"x": float("nan"), "y": np.float32(0.5), "z": np.arange(2)}
    atomic_write_json(tmp_path / "sub" / "b.json", content)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt", "b.json"]
    assert (tmp_path / "sub" / "a.txt").read_text() == "two"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": None, "y": 0.5, "z": [0, 1]}
    with pytest.raises(TypeError, match="cannot write a object"):
        to_json_text({"bad": object()})


def test_save_figure_writes_png_and_releases_pyplot_figures(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from painwatch.evaluation.report import new_figure, save_figure

    figure, axis = new_figure()
    axis.plot([0, 1], [0, 1])
    assert save_figure(figure, tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pyplot_figure, axis = plt.subplots()
    save_figure(pyplot_figure, tmp_path / "b.png")
    assert not plt.fignum_exists(pyplot_figure.number)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_command_module_imports_stay_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, painwatch.cli; painwatch.cli.build_parser(); "
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.split() == ["False", "False"]  # `painwatch --help` must not pay for torch or matplotlib


def test_cli_offline_pretrained_weights_give_a_clear_error(tiny_data: Path, tmp_path: Path, capsys) -> None:
    argv = [
        "loio",
        str(tiny_data),
        "--out",
        str(tmp_path / "r"),
        "--arch",
        "test_resnet",
        "--input-size",
        "32",
        "--pretrained",
        "--cache-features",
        "--quiet",
    ]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "weights" in error and "test_resnet" in error
    # No fold finished: the same folder can be used again at once, with corrected settings.
    fixed = [arg for arg in argv if arg != "--pretrained"]
    assert main([*fixed, "--max-folds", "1", "--head-epochs", "2"]) == 0
    assert (tmp_path / "r" / "folds" / "fold_00" / "result.json").is_file()


def test_noise_trained_fold_is_calibrated_on_clean_validation_logits(tmp_path: Path) -> None:
    from painwatch.calibration import fit_temperature, negative_log_likelihood
    from painwatch.data import load_records
    from painwatch.models import load_bundle
    from painwatch.training.batches import predict_logits

    data = _write_tiny_dataset(tmp_path / "data", individuals=3, frames_per_class=6, seed=2, obvious=True)
    settings = _settings(
        data,
        tmp_path / "run",
        **TINY,
        epochs=3,
        lr=3e-3,
        noise_sigma=0.3,
        inner_val_individuals=1,
        max_folds=1,
        progress=False,
        device="cpu",
    )
    run_loio(settings, log=lambda _: None)
    result = json.loads((tmp_path / "run" / "folds" / "fold_00" / "result.json").read_text())
    records = load_records(data)
    validation = [r for r in records if r.individual in result["validation_individuals"]]
    model = load_bundle(tmp_path / "run" / "folds" / "fold_00" / "model").model
    clean_logits = predict_logits(model, validation, batch_size=8, device="cpu")
    labels = [r.label for r in validation]
    assert result["temperature"] == pytest.approx(fit_temperature(clean_logits, labels), rel=1e-5)
    clean_nll = negative_log_likelihood(clean_logits, labels, 1.0)
    assert result["validation"]["nll_before_scaling"] == pytest.approx(clean_nll, rel=1e-6)


# ------------------------------------------------------------- training options shared with `train`
# A non-default value for every training option; a new option must be added here (the test checks).
TRAINING_ARGV = {
    "--arch": ["--arch", "test_resnet"],
    "--input-size": ["--input-size", "32"],
    "--weights": ["--weights", "backbone.safetensors"],
    "--pretrained": ["--pretrained"],
    "--epochs": ["--epochs", "3"],
    "--batch-size": ["--batch-size", "8"],
    "--lr": ["--lr", "0.002"],
    "--weight-decay": ["--weight-decay", "0.01"],
    "--schedule": ["--schedule", "constant"],
    "--warmup-epochs": ["--warmup-epochs", "0.5"],
    "--patience": ["--patience", "2"],
    "--monitor": ["--monitor", "val_balanced_accuracy"],
    "--class-balance": ["--class-balance", "sampler"],
    "--noise-sigma": ["--noise-sigma", "0.1"],
    "--augment": ["--augment", "0.5"],
    "--validate-clean": ["--validate-clean"],
    "--loss": ["--loss", "ce+mc_margin"],
    "--margin": ["--margin", "2.5"],
    "--offset-temperature": ["--offset-temperature", "0.5"],
    "--num-draws": ["--num-draws", "2"],
    "--margin-weight": ["--margin-weight", "0.5"],
    "--label-smoothing": ["--label-smoothing", "0.1"],
    "--drop-rate": ["--drop-rate", "0.2"],
    "--max-grad-norm": ["--max-grad-norm", "1.5"],
    "--seed": ["--seed", "7"],
    "--device": ["--device", "cpu"],
    "--num-workers": ["--num-workers", "1"],
    "--no-amp": ["--no-amp"],
}
HEAD_ARGV = {"--head-epochs": ["--head-epochs", "7"], "--head-l2": ["--head-l2", "0.5"]}
TRAINING_ARGV_FLAT = [value for values in TRAINING_ARGV.values() for value in values]


def _command_parser(command: str):
    from painwatch.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    return subparsers.choices[command]


def _training_group(parser) -> dict[str, object]:
    group = next(g for g in parser._action_groups if g.title == "training options")
    return {action.option_strings[0]: action.default for action in group._group_actions}


def test_train_and_loio_expose_the_same_training_options() -> None:
    from painwatch.cli.options import config_from_args

    train_options = _training_group(_command_parser("train"))
    loio_options = _training_group(_command_parser("loio"))
    assert {k: v for k, v in loio_options.items() if k not in HEAD_ARGV} == train_options  # same defaults
    assert set(loio_options) == set(TRAINING_ARGV) | set(HEAD_ARGV)
    # Outside the shared group each command declares only its own options.
    own = {
        "train": {"-h", "--help", "--out", "--val-fraction", "--individuals", "--quiet"},
        "loio": {"-h", "--help", "--out", "--resume", "--cache-features", "--inner-val-individuals"}
        | {"--inner-val-fraction", "--bootstrap-reps", "--max-folds", "--quiet"}
        | {"--ray", "--fold-cpus", "--fold-gpus", "--retries"},  # where the folds run (DistributedSettings)
    }
    for command, expected in own.items():
        parser = _command_parser(command)
        options = {s for a in parser._actions for s in a.option_strings}
        assert options - set(loio_options) == expected
        # Defaults on both commands give TrainConfig's defaults.
        args = parser.parse_args(["data", "--out", "out"])
        assert config_from_args(TrainConfig, args) == TrainConfig()
    assert LoioSettings(data="", out="").fold_config(0) == TrainConfig()


def test_every_training_option_is_declared_once_in_its_field() -> None:
    """The options come from TrainConfig's fields: a field's help and default are the option's."""
    import dataclasses

    from painwatch.cli.options import flag_of

    group = next(g for g in _command_parser("loio")._action_groups if g.title == "training options")
    actions = {action.dest: action for action in group._group_actions}
    for field in dataclasses.fields(TrainConfig):
        if not field.metadata["cli"]:
            assert field.name not in actions, field.name
            continue
        action = actions[field.name]
        assert action.option_strings == [flag_of(field)] and action.help == field.metadata["help"]
        default = field.default
        if field.metadata["zero_means_none"] and default is None:
            default = 0
        assert action.default == default, field.name


def test_loio_forwards_every_training_option_like_train() -> None:
    from painwatch.cli.loio import settings_from_args
    from painwatch.cli.options import config_from_args

    head_argv = [value for values in HEAD_ARGV.values() for value in values]
    loio_args = _command_parser("loio").parse_args(["data", "--out", "run", *TRAINING_ARGV_FLAT, *head_argv])
    settings = settings_from_args(loio_args)
    fold_config = settings.fold_config(seed=123)
    defaults = TrainConfig()
    changed = {f for f in fold_config.to_dict() if getattr(fold_config, f) != getattr(defaults, f)}
    # Every field reaches the fold's TrainConfig except the two speed-only ones without an option.
    assert changed == set(defaults.to_dict()) - {"eval_batch_size", "channels_last"}
    assert (fold_config.margin, fold_config.num_draws, fold_config.augment) == (2.5, 2, 0.5)
    assert (fold_config.schedule, fold_config.warmup_epochs, fold_config.max_grad_norm) == (
        "constant",
        0.5,
        1.5,
    )
    assert (fold_config.validate_under_noise, fold_config.amp, fold_config.seed) == (False, False, 123)
    assert settings.train.seed == 7 and settings.train.weights_path == "backbone.safetensors"
    # ... and they mean what they mean for `painwatch train`.
    train_args = _command_parser("train").parse_args(["data", "--out", "bundle", *TRAINING_ARGV_FLAT])
    train_config = config_from_args(TrainConfig, train_args, head_epochs=7, head_l2=0.5)
    assert settings.fold_config(seed=7, device="cpu") == train_config
    assert settings.train == train_config
    # 0 switches off patience and gradient clipping on both commands.
    off = _command_parser("loio").parse_args(["d", "--out", "r", "--patience", "0", "--max-grad-norm", "0"])
    off_config = settings_from_args(off).train
    assert (off_config.patience, off_config.max_grad_norm) == (None, None)


def test_new_training_options_reach_the_fold_training(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import painwatch.evaluation.loio
    from painwatch.models import load_bundle

    seen: list = []
    real_fit = painwatch.evaluation.loio.fit

    def spy(model, train_records, val_records, *, config, **kwargs):
        seen.append((config, train_records))
        return real_fit(model, train_records, val_records, config=config, **kwargs)

    monkeypatch.setattr(painwatch.evaluation.loio, "fit", spy)
    out = tmp_path / "run"
    argv = ["loio", str(tiny_data), "--out", str(out), *FINE_TUNE_ARGS, "--max-folds", "1"]
    options = ["--loss", "ce+mc_margin", "--noise-sigma", "0.1", "--margin", "2.5", "--num-draws", "2"]
    options += ["--augment", "0", "--schedule", "constant", "--warmup-epochs", "0", "--lr", "0.002"]
    options += ["--drop-rate", "0.2", "--label-smoothing", "0.1", "--validate-clean"]
    assert main([*argv, *options]) == 0
    ((config, train_records),) = seen
    assert (config.loss, config.noise_sigma, config.margin, config.num_draws) == ("ce+mc_margin", 0.1, 2.5, 2)
    assert (config.augment, config.schedule, config.warmup_epochs) == (0.0, "constant", 0.0)
    assert (config.drop_rate, config.label_smoothing, config.validate_under_noise) == (0.2, 0.1, False)
    assert all(hasattr(r, "path") for r in train_records)  # records: fit applies config.augment itself
    result = json.loads((out / "folds" / "fold_00" / "result.json").read_text())
    assert [epoch["lr"] for epoch in result["history"]] == [0.002]  # constant schedule, no warm-up
    assert result["history"][0]["val_noise_sigma"] == 0.0  # --validate-clean
    training = load_bundle(out / "folds" / "fold_00" / "model").metadata.training
    assert (training["margin"], training["num_draws"], training["augment"]) == (2.5, 2, 0.0)
    saved = json.loads((out / "config.json").read_text())["settings"]
    assert (saved["margin"], saved["schedule"], saved["drop_rate"]) == (2.5, "constant", 0.2)


def test_resume_refuses_a_changed_training_option(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["loio", str(tiny_data), "--out", str(out), "--arch", "test_resnet", "--input-size", "32"]
    argv += ["--cache-features", "--head-epochs", "2", "--inner-val-individuals", "1", "--quiet"]
    assert main([*argv, "--max-folds", "1"]) == 0
    capsys.readouterr()
    for change, difference in (
        (["--margin", "2"], "margin: the run has 1.0, now 2.0"),
        (["--num-draws", "8"], "num_draws: the run has 4, now 8"),
        (["--augment", "0.5"], "augment: the run has 1.0, now 0.5"),
        (["--schedule", "onecycle"], "schedule: the run has 'cosine', now 'onecycle'"),
        (["--label-smoothing", "0.1"], "label_smoothing: the run has 0.0, now 0.1"),
        (["--validate-clean"], "validate_under_noise: the run has True, now False"),
    ):
        assert main([*argv, "--resume", *change]) == 2, change
        error = capsys.readouterr().err
        assert "refusing to resume" in error and difference in error, error
    # A run saved before these options existed was trained with their defaults: it resumes with them
    # and refuses other values the same way.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("schedule", "warmup_epochs", "monitor", "margin", "num_draws", "margin_weight", "augment"):
        del config["settings"][key]
    atomic_write_json(config_path, config)
    assert main([*argv, "--resume", "--margin", "2"]) == 2
    assert "margin: the run has 1.0, now 2.0" in capsys.readouterr().err
    assert main([*argv, "--resume", "--max-folds", "1"]) == 0
    assert len(list(out.glob("folds/*/result.json"))) == 2


# ------------------------------------------------------------------------------ in-distribution check
@pytest.fixture(scope="module")
def roomy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 frames per individual: an inner-validation individual has enough frames for a threshold."""
    root = tmp_path_factory.mktemp("roomy") / "frames"
    return _write_tiny_dataset(root, individuals=4, frames_per_class=10)


def _check_outputs(out: Path, metrics: dict) -> None:
    summary = metrics["in_distribution"]
    assert summary["available"] and summary["threshold"] is None  # each fold had its own
    assert [row["individual"] for row in summary["per_individual"]] == [f"macaque_{i:02d}" for i in range(4)]
    assert all(row["frames"] == 20 for row in summary["per_individual"])
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    refused = [int(row["refused_not_like_training"]) for row in rows]
    assert summary["refused"] == sum(refused) and summary["share"] == pytest.approx(np.mean(refused))
    for fold in sorted(out.glob("folds/*/result.json")):
        entry = json.loads(fold.read_text())["in_distribution"]
        assert entry["available"] and entry["calibration_frames"] == 20 and entry["level"] == 0.05
        assert entry["validation_refused"] <= 20 - 19  # the 20th smallest of 20: at most one refused
        scores = np.asarray(entry["test_scores"])
        assert entry["test_refused"] == (scores > entry["threshold"]).tolist()
    assert "In-distribution check" in (out / "report.md").read_text()


def test_each_cached_features_fold_fits_and_calibrates_its_own_check(roomy_data: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = _head_settings(roomy_data, out)
    outcome = run_loio(settings, log=lambda _: None)
    _check_outputs(out, outcome.metrics)
    # The frozen backbone's descriptors are computed once per run and read back when they fit the run.
    cache = out / DESCRIPTORS_FILE
    written = cache.stat().st_mtime_ns
    with safe_open(str(out / "features.safetensors"), framework="np") as handle:
        keys = handle.metadata()
    records = load_records(roomy_data)
    _, first = cached_descriptors(settings.train, records, out, device="cpu", metadata=keys)
    _, second = cached_descriptors(settings.train, records, out, device="cpu", metadata=keys)
    assert cache.stat().st_mtime_ns == written
    assert all(np.array_equal(first[k], second[k]) and len(first[k]) == 80 for k in first)


def test_each_fine_tuned_fold_fits_and_calibrates_its_own_check(roomy_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    settings = _settings(roomy_data, out, **TINY, epochs=1, inner_val_individuals=1, bootstrap_reps=20,
                         progress=False, device="cpu")
    outcome = run_loio(settings, log=lambda _: None)
    _check_outputs(out, outcome.metrics)
    checkpoint = out / "folds" / "fold_00" / "model" / "in_distribution.safetensors"
    assert checkpoint.is_file()  # the fold's model carries the check it was measured with


def test_folds_with_too_few_validation_frames_have_no_check(fine_tuned_run) -> None:
    out, _ = fine_tuned_run
    summary = json.loads((out / "metrics.json").read_text())["in_distribution"]
    assert summary["available"] is False and "no fold had an in-distribution check" in summary["note"]
    entry = json.loads((out / "folds" / "fold_00" / "result.json").read_text())["in_distribution"]
    assert "8 inner-validation frames are too few" in entry["note"]
