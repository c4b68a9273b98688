"""The engine that answers and certifies (fixed-shape passes, runtimes, precisions) and certification
across frames (painwatch.inference.certifying): a frame's certificate never depends on its neighbours."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from painwatch.inference import Predictor, SettingsError
from painwatch.inference.certifying import certify_frames
from painwatch.inference.engine import (
    EngineError,
    TorchEngine,
    bf16_supported,
    choose_engine,
    make_engine,
    network_fingerprint,
    openvino_available,
)
from painwatch.inference.settings import PredictorSettings
from painwatch.models import create_model
from painwatch.models.in_distribution import default_layers, descriptor_pass
from painwatch.robust import certify

SIZE = 32
RUNTIMES = ["torch", pytest.param("openvino", marks=pytest.mark.skipif(not openvino_available(),
                                                                         reason="openvino not installed"))]


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    return create_model("test_resnet", num_classes=2, input_size=SIZE, seed=0).eval()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(network: torch.nn.Module, runtime: str) -> None:
    engine = make_engine(network, (3, SIZE, SIZE), runtime=runtime, precision="fp32", pass_rows=4)
    torch.manual_seed(0)
    images = torch.rand(7, 3, SIZE, SIZE)
    others = torch.rand(7, 3, SIZE, SIZE)
    alone = engine(images[2:3])
    mixed = engine(torch.cat([others[:3], images[2:3], others[3:]]))
    assert torch.equal(alone[0], mixed[3])
    assert engine(images).shape == (7, 2) and engine.runtime == runtime
    # fp32 in every runtime computes the bundle's network (within float rounding)
    with torch.no_grad():
        assert torch.allclose(engine(images), network(images), atol=1e-4)
    assert engine.passes_per_s > 0


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not bf16_supported(torch.device("cpu")), reason="no native bf16 on this CPU"))])
def test_the_answer_pass_gives_the_descriptors_of_descriptor_pass(network: torch.nn.Module, runtime: str,
                                                                  precision: str) -> None:
    layers = (*default_layers(network), "pooled", "logits")
    engine = make_engine(network, (3, SIZE, SIZE), runtime=runtime, precision=precision, pass_rows=4,
                         descriptors=layers)
    torch.manual_seed(1)
    images = torch.rand(3, 3, SIZE, SIZE)
    expected_logits, expected = descriptor_pass(network, images, layers)
    logits, descriptors = engine.answer_described(images, layers)
    assert list(descriptors) == list(layers)
    # fp32: the same numbers up to float rounding; bf16 (8-bit mantissa): within a few per cent of the scale
    tolerance = 1e-5 if precision == "fp32" else 3e-2
    assert torch.allclose(logits, expected_logits, atol=tolerance * float(expected_logits.abs().max()))
    assert torch.allclose(logits, engine.answer(images), atol=1e-6 if precision == "fp32" else 3e-2)
    for layer in layers:
        assert descriptors[layer].dtype == np.float64 and descriptors[layer].shape == expected[layer].shape
        scale = float(np.abs(expected[layer]).max())
        assert np.allclose(descriptors[layer], expected[layer], atol=tolerance * scale), layer
    # a descriptor set the engine was not prepared for is prepared on first use
    _, one = engine.answer_described(images[:1], layers[:1])
    assert np.allclose(one[layers[0]], expected[layers[0]][:1], atol=tolerance * float(
        np.abs(expected[layers[0]]).max()))
    with pytest.raises(ValueError, match="expected images"):
        engine.answer_described(images[:, :1], layers)


def test_choose_engine_names_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(EngineError, match="'tensorrt'"):
        choose_engine(cpu, runtime="tensorrt")
    with pytest.raises(EngineError, match="'fp8'"):
        choose_engine(cpu, precision="fp8")
    monkeypatch.setattr("painwatch.inference.engine.bf16_supported", lambda device: False)
    assert choose_engine(cpu, runtime="torch")[1] == "fp32"  # auto falls back
    with pytest.raises(EngineError, match="bf16"):
        choose_engine(cpu, runtime="torch", precision="bf16")
    monkeypatch.setattr("painwatch.inference.engine.openvino_available", lambda: False)
    assert choose_engine(cpu) == ("torch", "fp32")
    with pytest.raises(EngineError, match="pip install openvino"):
        choose_engine(cpu, runtime="openvino")


def test_fingerprint_follows_the_weights(network: torch.nn.Module) -> None:
    other = create_model("test_resnet", num_classes=2, input_size=SIZE, seed=1).eval()
    assert network_fingerprint(network) == network_fingerprint(network)
    assert network_fingerprint(network) != network_fingerprint(other)


@pytest.mark.parametrize("method", ["soft_smoothing_sequential", "randomized_smoothing",
                                    "randomized_smoothing_sequential"])
def test_certifying_frames_together_equals_each_alone(network: torch.nn.Module, method: str) -> None:
    engine = make_engine(network, (3, SIZE, SIZE), runtime="torch", precision="fp32", pass_rows=16)
    sequential = method.endswith("_sequential")
    base = method.removesuffix("_sequential")
    bound = "anytime" if base == "soft_smoothing" else "fixed"
    settings = PredictorSettings(method=base, sigma=0.25, alpha=0.01, n0=8, n=40, batch_size=8,
                                 sequential=sequential, bound=bound)
    torch.manual_seed(1)
    frames = [torch.rand(3, SIZE, SIZE) for _ in range(4)]

    def run(frames_per_pass: int) -> dict[int, object]:
        generators = [torch.Generator().manual_seed(10 + i) for i in range(len(frames))]
        steps = list(certify_frames(engine, frames, generators, settings=settings, num_classes=2,
                                    temperature=1.0, frames_per_pass=frames_per_pass))
        done = {s.index: s for s in steps if s.done}
        assert sorted(done) == list(range(len(frames)))
        # progress grows for every frame and never passes the budget
        for index in done:
            draws = [s.draws for s in steps if s.index == index]
            assert draws == sorted(draws) and draws[-1] <= settings.n0 + settings.n
        return done

    together, alone = run(3), run(1)
    # the rounds were timed: the time budget's rate counts drawing the noise as well as the passes
    assert math.isfinite(engine.draws_per_s) and engine.draws_per_s > 0
    for index, step in together.items():
        assert step.outcome.certificate == alone[index].outcome.certificate
        assert step.noise_survival == alone[index].noise_survival
        options = {"sigma": 0.25, "alpha": 0.01, "n0": 8, "n": 40, "batch_size": 8,
                   "stop_early": sequential, "rel_tol": settings.rel_tol, "min_radius": settings.min_radius,
                   "score_temperature": settings.score_temperature}
        expected = certify(settings.method_name, engine, frames[index],
                           generator=torch.Generator().manual_seed(10 + index), **options)
        assert step.outcome.certificate == expected.certificate


def test_predictor_results_do_not_depend_on_the_other_frames(bundle_factory, tmp_path: Path) -> None:
    folder = bundle_factory(tmp_path / "tiny", certification={"n0": 16, "n": 100, "alpha": 0.01,
                                                              "batch_size": 8})
    predictor = Predictor.load(folder, seed=5)
    assert predictor.frames_per_pass == predictor.engine.pass_rows // 8 > 1  # frames share passes
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    together = predictor.predict(images)
    alone = [predictor.predict([image])[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        assert (a.class_index, a.radius, a.bound) == (b.class_index, b.radius, b.bound)
        assert a.noise_seed == b.noise_seed
    # the recorded noise seed reproduces the result exactly, also among other frames
    seeds = [together[1].noise_seed, together[0].noise_seed]
    again = predictor.predict([images[1], images[0]], noise_seeds=seeds)
    assert (again[1].radius, again[0].radius) == (together[0].radius, together[1].radius)
    assert all(r.runtime == predictor.runtime and r.precision == predictor.precision for r in together)


def test_budget_from_time_and_bad_budgets(bundle_factory, tmp_path: Path) -> None:
    folder = bundle_factory(tmp_path / "tiny", certification={"n0": 16, "n": 100, "alpha": 0.01,
                                                              "batch_size": 50})
    predictor = Predictor.load(folder, seed=5)
    short, long = predictor.draw_budget(0.5), predictor.draw_budget(5.0)
    assert 0 <= short <= long and long > 0
    with pytest.raises(ValueError, match="-1"):
        predictor.draw_budget(-1)
    assert predictor.with_budget(predictor.settings.n) is predictor
    bounds = predictor.metadata.certification.bounds["n"]
    with pytest.raises(SettingsError, match=str(int(bounds[1]) + 1)):
        predictor.with_budget(int(bounds[1]) + 1)
    smaller = predictor.with_budget(int(bounds[0]))
    assert smaller.settings.n == int(bounds[0]) and smaller.engine is predictor.engine


def test_predictor_runs_the_engine_it_was_asked_for(bundle_factory, tmp_path: Path) -> None:
    folder = bundle_factory(tmp_path / "tiny", certification={"n0": 16, "n": 100, "alpha": 0.01,
                                                              "batch_size": 50})
    predictor = Predictor.load(folder, seed=5, runtime="torch", precision="fp32")
    assert (predictor.runtime, predictor.precision) == ("torch", "fp32")
    with pytest.raises(SettingsError, match="'tensorrt'"):
        Predictor.load(folder, seed=5, runtime="tensorrt")


class _DividedPool(torch.nn.Module):
    """A network with an operation OpenVINO's converter refuses (average pooling with a divisor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(self.conv(x), 8, divisor_override=64)
        return self.head(pooled.flatten(1))


@pytest.mark.skipif(not openvino_available(), reason="OpenVINO is not installed")
def test_a_network_openvino_cannot_convert_runs_with_torch_unless_openvino_is_asked_for() -> None:
    model = _DividedPool().eval()
    with pytest.warns(RuntimeWarning, match="OpenVINO cannot convert _DividedPool"):
        engine = make_engine(model, (3, 8, 8), runtime="auto", precision="fp32")
    assert isinstance(engine, TorchEngine)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(engine(x).float(), model(x), atol=1e-6)
    with pytest.raises(EngineError, match="OpenVINO cannot run this network"):
        make_engine(model, (3, 8, 8), runtime="openvino", precision="fp32")
