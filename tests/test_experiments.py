"""End-to-end runs of the [RC] experiment scripts on tiny settings (real code paths, real files)."""

from __future__ import annotations

import gzip
import itertools
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _experiment_common as common  # noqa: E402
import _experiment_evaluation as measure  # noqa: E402
import bench_certify  # noqa: E402
import cifar10_experiment  # noqa: E402
import mnist_experiment  # noqa: E402

METHODS = ("lipschitz", "smoothed_margin", "randomized_smoothing")

# Small enough for seconds on a shared CPU, large enough that every stage has work to do.
TINY_EVAL = [
    "--n0", "10", "--sm-n", "60", "--n", "120", "--pgd-steps", "3",
    "--pgd-smoothed-points", "3", "--pgd-classifier-draws", "60", "--batch-eval", "256", "--threads", "1",
    "--device", "cpu",
]  # fmt: skip


def clopper_pearson(successes: int, trials: int) -> list[float]:
    interval = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    return [interval.low, interval.high]


def check_one_set_of_points(evaluation: dict, test_labels: np.ndarray, points: list[int]) -> None:
    """Clean accuracy and every certified accuracy are on the same points, with Clopper-Pearson intervals."""
    count = evaluation["num_points"]
    assert count == len(points) == len(set(points))
    labels = np.asarray(evaluation["labels"])
    assert labels.tolist() == test_labels[points].tolist()
    clean = np.asarray(evaluation["clean_predictions"])
    assert len(clean) == count
    assert evaluation["clean_accuracy"] == pytest.approx(np.mean(clean == labels))
    clean_correct = int((clean == labels).sum())
    assert evaluation["clean_accuracy_interval"] == pytest.approx(clopper_pearson(clean_correct, count))
    # The Lipschitz certificate is the bare network's answer: point for point the clean prediction,
    # which it could not be if it had been computed on other points.
    assert evaluation["lipschitz"]["predictions"] == clean.tolist()
    for method in METHODS:
        predictions = np.asarray(evaluation[method]["predictions"])
        radii = np.asarray(evaluation[method]["certified_radii"])
        assert len(predictions) == len(radii) == count
        curve, intervals = evaluation[method]["curve"], evaluation[method]["curve_interval"]
        for r, value, interval in zip(evaluation["radii"], curve, intervals, strict=True):
            successes = int(((predictions == labels) & (radii >= r)).sum())
            assert value == pytest.approx(successes / count)
            assert interval == pytest.approx(clopper_pearson(successes, count))


def check_results(out: Path, losses: list[str], test_labels: np.ndarray, pixels: int) -> dict:
    """Shared checks on an experiment folder; returns summary.json."""
    summary = json.loads((out / "summary.json").read_text())
    points = summary["config"]["evaluation_points"]
    assert summary["losses"] == losses
    assert {"command", "config", "seconds", "cpu_seconds", "machine", "table", "plots"} <= set(summary)
    for name in losses:
        result = json.loads((out / f"{name}.json").read_text())
        evaluation = result["evaluation"]
        assert {
            "clean_accuracy",
            "lipschitz_constant",
            "radii",
            "noise_accuracy",
            "pgd_check",
            *METHODS,
        } <= set(evaluation)
        assert 0.0 <= evaluation["clean_accuracy"] <= 1.0
        # Orthogonal layers: the sound bound is 1 up to the construction's residual and float safety.
        assert 0.99 < evaluation["lipschitz_constant"] < 1.01
        for method in METHODS:
            curve = evaluation[method]["curve"]
            assert len(curve) == len(evaluation["radii"])
            assert all(a >= b for a, b in itertools.pairwise(curve)), f"{name}/{method} increases"
            assert curve[0] <= 1.0
        pgd = evaluation["pgd_check"]
        assert pgd["lipschitz"]["num_attacked"] > 0
        # The attack stays inside 0.99 r, up to the float32 rounding of the adversarial pixels (about
        # 2^-24 each, so sqrt(pixels) 2^-24 in L2), which is large relative to a tiny radius.
        attacked = [r for r in evaluation["lipschitz"]["certified_radii"] if r > 0]
        rounding = np.sqrt(pixels) * 2.0**-23 / min(attacked)
        assert pgd["lipschitz"]["max_budget_used"] <= 0.99 * (1 + 1e-4) + rounding
        check_one_set_of_points(evaluation, test_labels, points)
        headline = summary["results"][name]
        assert headline["num_points"] == len(points)
        assert headline["clean_accuracy"] == evaluation["clean_accuracy"]
        for method in METHODS:
            for radius in ("0.25", "0.5", "1.0"):
                figure = headline["certified_accuracy"][method][radius]
                index = evaluation["radii"].index(float(radius))
                assert figure["value"] == evaluation[method]["curve"][index]
                assert figure["interval"] == evaluation[method]["curve_interval"][index]
        for method in METHODS:
            assert pgd[method]["num_flipped"] == 0, f"{name}: PGD broke a {method} certificate: {pgd[method]}"
        assert len(result["training"]["loss_per_epoch"]) == summary["config"]["train"]["epochs"]
    table = (out / "table.md").read_text()
    for name in losses:
        assert f"| {name.upper()} |" in table
    for plot in summary["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return summary


def test_mnist_experiment_end_to_end_on_the_bundled_digits(tmp_path: Path) -> None:
    out = tmp_path / "mnist"
    argv = [
        "--losses", "mscr,mcr", "--epochs", "1", "--width", "64", "--holdout", "200", "--benchmark-n", "300",
        "--benchmark-num-test", "4", "--num-test", "8", "--out", str(out), *TINY_EVAL,
    ]  # fmt: skip
    summary = mnist_experiment.main(argv)
    test_labels = mnist_experiment.load_bundled_mnist(200, seed=0)["y_test"]
    check_results(out, ["mscr", "mcr"], test_labels, pixels=28 * 28)
    # --num-test 8 of ten classes: eight different digits, named in the table's note.
    assert len(set(test_labels[summary["config"]["evaluation_points"]])) == 8
    assert "the same points, 8 of the 200 held-out points (stratified by class, seed 0);" in summary["table"]
    for name in ("mscr", "mcr"):  # real digits: even one epoch learns something certifiable
        evaluation = json.loads((out / f"{name}.json").read_text())["evaluation"]
        assert evaluation["clean_accuracy"] > 0.5
        assert evaluation["lipschitz"]["curve"][0] > 0.0
    assert summary["config"]["num_train"] == 4800 and summary["config"]["num_test_total"] == 200
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["forward_pass_ratio"] == pytest.approx((10 + 300) / (10 + 60))
    assert bench["radii"] == [0.25, 0.5, 0.924]
    # The benchmark's points are the first four of the table's (a prefix of the stratified order).
    mscr = json.loads((out / "mscr.json").read_text())["evaluation"]
    assert bench["num_points"] == 4 and bench["labels"] == mscr["labels"][:4]
    for method in ("smoothed_margin", "randomized_smoothing"):
        accuracies = bench[method]["certified_accuracy"]
        assert all(0.0 <= b <= a <= 1.0 for a, b in itertools.pairwise(accuracies))
        predictions = np.asarray(bench[method]["predictions"])
        radii = np.asarray(bench[method]["certified_radii"])
        for r, interval in zip(bench["radii"], bench[method]["certified_accuracy_interval"], strict=True):
            successes = int(((predictions == np.asarray(bench["labels"])) & (radii >= r)).sum())
            assert interval == pytest.approx(clopper_pearson(successes, 4))
    assert "Forward-pass ratio" in (out / "table.md").read_text()
    assert "the first 4 of the table's points (a stratified prefix)" in (out / "table.md").read_text()

    # --resume reuses results computed with the same settings instead of training again.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "summary.json"}
    mnist_experiment.main([*argv, "--resume"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "summary.json"} == mtimes
    # ... but a benchmark asked with other settings is recomputed (the per-loss results are still reused).
    mnist_experiment.main([*argv, "--resume", "--benchmark-n", "200"])
    assert json.loads((out / "benchmark.json").read_text())["randomized_smoothing"]["n"] == 200
    assert (out / "mscr.json").stat().st_mtime_ns == mtimes["mscr.json"]


def test_mnist_summary_certifies_exactly_the_points_of_its_clean_accuracy(tmp_path: Path) -> None:
    """By default every held-out digit is evaluated, for the clean and every certified accuracy alike."""
    out = tmp_path / "mnist"
    argv = [
        "--losses", "mscr", "--epochs", "1", "--width", "32", "--holdout", "100", "--benchmark-n", "200",
        "--benchmark-num-test", "1000", "--pgd-steps", "2", "--out", str(out), *TINY_EVAL,
    ]  # fmt: skip
    summary = mnist_experiment.main(argv)
    test_labels = mnist_experiment.load_bundled_mnist(100, seed=0)["y_test"]
    assert sorted(summary["config"]["evaluation_points"]) == list(range(100))
    check_results(out, ["mscr"], test_labels, pixels=28 * 28)
    assert summary["results"]["mscr"]["num_points"] == 100
    assert "Every figure is in % of the same points, all 100 held-out points;" in summary["table"]
    # The benchmark asked for more points than there are: it takes all of the table's.
    bench = summary["benchmark"]
    assert bench["num_points"] == 100 and "the same 100 points as the table" in (out / "table.md").read_text()
    # The table cell is the JSON's figure and its interval: "value (low-high)" in per cent.
    evaluation = json.loads((out / "mscr.json").read_text())["evaluation"]
    index = evaluation["radii"].index(0.5)
    value = evaluation["lipschitz"]["curve"][index]
    low, high = evaluation["lipschitz"]["curve_interval"][index]
    assert f"| {100 * value:.1f} ({100 * low:.1f}-{100 * high:.1f}) |" in summary["table"]


def test_mixed_evaluation_sets_are_refused() -> None:
    def result(labels: list[int]) -> dict:
        return {"config": {"num_test_total": 10, "eval": {"seed": 0}},
                "evaluation": {"labels": labels, "num_points": len(labels)}}

    assert common.evaluated_points_description({"a": result([1, 2]), "b": result([1, 2])}) == (
        "2 of the 10 held-out points (stratified by class, seed 0)"
    )
    with pytest.raises(ValueError, match="'b' was evaluated on other points than 'a'"):
        common.evaluated_points_description({"a": result([1, 2]), "b": result([2, 1])})


def test_stratified_order_balances_every_prefix_and_is_seeded() -> None:
    labels = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 30, 30, 30, 30, 5])
    order = measure.stratified_order(labels, None, seed=1)
    assert sorted(order.tolist()) == list(range(len(labels)))
    for k in (1, 7, 10, 23, 50):  # while no class has run out, counts differ by at most one
        counts = np.bincount(labels[order[:k]], minlength=10)
        assert counts.max() - counts.min() <= 1, (k, counts)
    counts = np.bincount(labels[order[:100]], minlength=10)  # class 9 has only five
    assert counts[9] == 5 and counts[:9].max() - counts[:9].min() <= 1
    assert (measure.stratified_order(labels, 40, seed=1) == order[:40]).all()
    assert not (measure.stratified_order(labels, 40, seed=2) == order[:40]).all()
    with pytest.raises(ValueError, match="--num-test must be between 1 and the 275 held-out points, got 276"):
        measure.stratified_order(labels, 276, seed=0)


def test_intervals_are_clopper_pearson() -> None:
    correct = np.array([True] * 7 + [False] * 3)
    accuracy, interval = measure.accuracy_with_interval(correct)
    assert accuracy == 0.7
    assert interval == pytest.approx(clopper_pearson(7, 10))
    assert interval == pytest.approx([0.3475, 0.9333], abs=1e-4)  # the exact 95 % interval of 7 / 10
    predictions = np.array([1, 1, 1, -1, 0])
    radii = np.array([0.6, 0.2, 0.9, 0.0, 0.8])
    labels = np.array([1, 1, 0, 1, 0])
    curve, intervals = measure.certified_accuracy_with_intervals(predictions, radii, labels, [0.0, 0.5])
    assert curve == [0.6, 0.4]
    assert intervals == [pytest.approx(clopper_pearson(3, 5)), pytest.approx(clopper_pearson(2, 5))]


def test_bench_certify_reports_accuracy_on_the_certified_digits(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--points", "10", "--n", "50", "--cohen-n", "100", "--n0", "10", "--epochs", "2",
            "--json", str(out)]
    assert bench_certify.main(argv) == 0
    result = json.loads(out.read_text())
    indices = result["test_indices"]
    assert len(indices) == len(set(indices)) == 10
    from sklearn.datasets import load_digits

    assert sorted(load_digits().target[indices].tolist()) == list(range(10))  # one digit of each class
    # Lipschitz certificates never abstain: their answer is the clean prediction on the same digits.
    lipschitz = next(row for row in result["rows"] if row["method"] == "lipschitz")
    assert lipschitz["certified"] == 10
    assert lipschitz["certified_correct"] == round(10 * result["accuracy"])
    for row in result["rows"]:
        expected = clopper_pearson(row["certified_correct"], 10)
        assert row["certified_accuracy_interval"] == pytest.approx(expected)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def mnist_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8),
        "y_train": np.arange(60) % 10,
        "x_test": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_test": np.arange(20) % 10,
    }


def test_load_mnist_reads_idx_folders_and_npz(tmp_path: Path) -> None:
    arrays = mnist_arrays()
    for key, stem in mnist_experiment.IDX_FILES.items():
        write_idx(tmp_path / f"{stem}.gz", arrays[key])
    np.savez(tmp_path / "mnist.npz", **arrays)
    for source in (tmp_path, tmp_path / "mnist.npz"):
        data = mnist_experiment.load_mnist(source)
        assert data["x_train"].shape == (60, 1, 28, 28) and data["x_train"].dtype == np.float32
        np.testing.assert_allclose(data["x_test"][:, 0] * 255, arrays["x_test"], atol=1e-4)
        assert data["y_test"].tolist() == arrays["y_test"].tolist()


def test_load_mnist_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(mnist_experiment.MnistDataError, match="missing MNIST file train-images-idx3-ubyte"):
        mnist_experiment.load_mnist(tmp_path)
    arrays = mnist_arrays()
    arrays["y_test"] = arrays["y_test"] + 5
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(mnist_experiment.MnistDataError, match=r"test label 10 is outside 0\.\.9"):
        mnist_experiment.load_mnist(tmp_path / "bad.npz")
    np.savez(
        tmp_path / "objects.npz",
        x_train=np.array([{"a": 1}], dtype=object),
        y_train=[0],
        x_test=[0],
        y_test=[0],
    )
    with pytest.raises(mnist_experiment.MnistDataError, match="without pickles"):
        mnist_experiment.load_mnist(tmp_path / "objects.npz")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")
    with pytest.raises(mnist_experiment.MnistDataError, match="truncated IDX header"):
        mnist_experiment._read_idx(tmp_path / "idx" / "train-images-idx3-ubyte")


def write_cifar_stand_in(path: Path, num_train: int = 48, num_test: int = 16) -> None:
    """A stand-in with CIFAR-10's shapes and dtypes (random pixels: only the code path is under test)."""
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(num_train) % 10,
        x_test=rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(num_test) % 10,
    )


def test_cifar10_experiment_end_to_end_on_a_stand_in(tmp_path: Path) -> None:
    data, out = tmp_path / "cifar_stand_in.npz", tmp_path / "cifar"
    write_cifar_stand_in(data)
    argv = [
        "--data", str(data), "--losses", "mscr,sce", "--epochs", "1", "--channels", "2,2,4,4",
        "--dense-width", "16", "--batch-size", "16", "--out", str(out), *TINY_EVAL,
    ]  # fmt: skip
    summary = cifar10_experiment.main([*argv, "--num-test", "8"])
    check_results(out, ["mscr", "sce"], np.arange(16) % 10, pixels=3 * 32 * 32)
    assert summary["config"]["channels"] == [2, 2, 4, 4] and summary["config"]["num_train"] == 48


def test_cifar10_thesis_network_shapes_and_bound() -> None:
    from painwatch.robust import export_plain, lipschitz_upper_bound

    model = cifar10_experiment.cifar_bcop_net(dense_width=32).eval()
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert lipschitz_upper_bound(export_plain(model), (3, 32, 32)) < 1.0 + 1e-3


def test_cifar10_data_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(cifar10_experiment.Cifar10DataError, match="cifar-10-batches-py"):
        cifar10_experiment.load_cifar10(tmp_path)
    with pytest.raises(cifar10_experiment.Cifar10DataError, match="not found"):
        cifar10_experiment.load_cifar10(tmp_path / "nowhere")
    np.savez(
        tmp_path / "wrong.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.zeros(4, np.int64),
        x_test=np.zeros((4, 32, 32, 3), np.uint8), y_test=np.zeros(4, np.int64),
    )  # fmt: skip
    with pytest.raises(cifar10_experiment.Cifar10DataError, match=r"train images must be \(N, 32, 32, 3\)"):
        cifar10_experiment.load_cifar10(tmp_path / "wrong.npz")


def test_bad_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--losses: unknown"):
        mnist_experiment.main(["--losses", "hinge", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--alpha must be in"):
        mnist_experiment.main(["--alpha", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--channels"):
        cifar10_experiment.main(["--data", str(tmp_path), "--channels", "8,8", "--out", str(tmp_path)])


def test_stratified_split_is_disjoint_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(10), 50)
    train, test = common.stratified_split(labels, 100, seed=3)
    assert len(test) == 100 and len(train) == 400 and not set(train) & set(test)
    assert np.bincount(labels[test]).tolist() == [10] * 10
    again, _ = common.stratified_split(labels, 100, seed=3)
    assert (again == train).all()
    with pytest.raises(ValueError, match="num_test"):
        common.stratified_split(labels, 500, seed=0)


def test_certified_accuracy_curve_counts_abstentions_as_wrong() -> None:
    predictions = np.array([1, 2, -1, 0])
    radii = np.array([0.3, 0.6, 0.0, 1.0])
    labels = np.array([1, 2, 2, 1])
    curve, _ = measure.certified_accuracy_with_intervals(predictions, radii, labels, [0.0, 0.5, 0.7])
    assert curve == [0.5, 0.25, 0.0]
