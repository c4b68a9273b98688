"""End-to-end runs of the thesis experiment scripts on tiny settings (real code paths, real files)."""

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

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import _experiment_common as common  # noqa: E402
import cifar10_experiment  # noqa: E402
import mnist_experiment  # noqa: E402

METHODS = ("lipschitz", "smoothed_margin", "randomized_smoothing")

# Small enough for seconds on a shared CPU, large enough that every stage has work to do.
TINY_EVAL = [
    "--num-test", "8", "--n0", "10", "--sm-n", "60", "--n", "120", "--pgd-steps", "3",
    "--pgd-smoothed-points", "3", "--pgd-classifier-draws", "60", "--batch-eval", "256", "--threads", "1",
    "--device", "cpu",
]  # fmt: skip


def check_results(out: Path, losses: list[str]) -> dict:
    """Shared checks on an experiment folder; returns summary.json."""
    summary = json.loads((out / "summary.json").read_text())
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
        # The attack stays inside 0.99 r (up to float32 rounding of the projection, ~1e-6 relative).
        assert pgd["lipschitz"]["max_budget_used"] <= 0.99 * (1 + 1e-4)
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
        "--benchmark-num-test", "4", "--out", str(out), *TINY_EVAL,
    ]  # fmt: skip
    summary = mnist_experiment.main(argv)
    check_results(out, ["mscr", "mcr"])
    for name in ("mscr", "mcr"):  # real digits: even one epoch learns something certifiable
        evaluation = json.loads((out / f"{name}.json").read_text())["evaluation"]
        assert evaluation["clean_accuracy"] > 0.5
        assert evaluation["lipschitz"]["curve"][0] > 0.0
    assert summary["config"]["num_train"] == 4800 and summary["config"]["num_test_total"] == 200
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["forward_pass_ratio"] == pytest.approx((10 + 300) / (10 + 60))
    assert bench["radii"] == [0.25, 0.5, 0.924]
    assert bench["radii"] == [0.25, 0.5, 0.924]
    for method in ("smoothed_margin", "randomized_smoothing"):
        accuracies = bench[method]["certified_accuracy"]
        assert all(0.0 <= b <= a <= 1.0 for a, b in itertools.pairwise(accuracies))
    assert "Forward-pass ratio" in (out / "table.md").read_text()

    # --resume reuses results computed with the same settings instead of training again.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "summary.json"}
    mnist_experiment.main([*argv, "--resume"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "summary.json"} == mtimes
    # ... but a benchmark asked with other settings is recomputed (the per-loss results are still reused).
    mnist_experiment.main([*argv, "--resume", "--benchmark-n", "200"])
    assert json.loads((out / "benchmark.json").read_text())["randomized_smoothing"]["n"] == 200
    assert (out / "mscr.json").stat().st_mtime_ns == mtimes["mscr.json"]


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
    summary = cifar10_experiment.main(argv)
    check_results(out, ["mscr", "sce"])
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
    assert common.certified_accuracy_curve(predictions, radii, labels, [0.0, 0.5, 0.7]) == [0.5, 0.25, 0.0]
