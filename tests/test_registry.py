"""The method registry and ``painwatch.robust.certify``: every method through one call, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from painwatch.robust import (
    BASE_METHODS,
    METHODS,
    SEQUENTIAL_METHODS,
    CertificationOutcome,
    CertificationSettings,
    MethodSpec,
    SmoothedClassifier,
    certify,
    lipschitz_certify,
    lipschitz_upper_bound,
    method_spec,
    noisy_logits,
    register_method,
    sequential_certify,
    smoothed_margin_certify,
    soft_smoothing_certify,
)
from painwatch.robust import certificate as certificate_module

SHAPE = (3, 4, 4)
SETTINGS = {"sigma": 0.2, "alpha": 0.01, "n0": 20, "n": 300, "batch_size": 64}


@pytest.fixture(scope="module")
def net() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))


def seeded() -> torch.Generator:
    return torch.Generator().manual_seed(7)


# --- the registry -----------------------------------------------------------------------------------

def test_registry_names_needs_and_bases() -> None:
    assert set(METHODS) == {
        "lipschitz", "smoothed_margin", "randomized_smoothing", "soft_smoothing",
        "randomized_smoothing_sequential", "soft_smoothing_sequential",
    }
    # The stable order a bundle schema and reports rely on.
    assert tuple(BASE_METHODS) == ("lipschitz", "smoothed_margin", "randomized_smoothing", "soft_smoothing")
    assert BASE_METHODS == ("lipschitz", "smoothed_margin", "randomized_smoothing", "soft_smoothing")
    for name, spec in METHODS.items():
        assert spec.name == name and method_spec(name) is spec
        assert spec.base in BASE_METHODS and METHODS[spec.base].base == spec.base
        assert spec.is_base == (name in BASE_METHODS) == (not spec.sequential)
        assert spec.certifies == METHODS[spec.base].certifies  # same classifier as its base
    assert [n for n in METHODS if METHODS[n].needs_lipschitz_constant] == ["lipschitz", "smoothed_margin"]
    assert [n for n in METHODS if not METHODS[n].needs_noise] == ["lipschitz"]
    assert [n for n in METHODS if METHODS[n].deterministic] == ["lipschitz"]
    assert METHODS["lipschitz"].certifies == "the network itself"
    assert "expected-logit" in METHODS["smoothed_margin"].certifies
    assert "majority vote" in METHODS["randomized_smoothing"].certifies
    assert "expected softmax" in METHODS["soft_smoothing"].certifies
    assert dict(SEQUENTIAL_METHODS) == {"soft": "soft_smoothing_sequential",
                                        "hard": "randomized_smoothing_sequential"}


def test_registry_is_read_only_and_refuses_a_second_registration_and_bad_specs() -> None:
    with pytest.raises(TypeError):
        METHODS["lipschitz"] = METHODS["soft_smoothing"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["lipschitz"].needs_noise = True  # type: ignore[misc]
    with pytest.raises(ValueError, match="'lipschitz' is already registered"):
        register_method(METHODS["lipschitz"])
    with pytest.raises(TypeError, match="needs a MethodSpec"):
        register_method("lipschitz")  # type: ignore[arg-type]
    spec = dataclasses.asdict(METHODS["randomized_smoothing_sequential"]) | {"name": "votes_sequential"}
    with pytest.raises(ValueError, match="must name the fixed-n method"):
        MethodSpec(**spec | {"base": "votes_sequential"})
    with pytest.raises(ValueError, match="cannot be deterministic and need noise"):
        MethodSpec(**spec | {"deterministic": True})
    with pytest.raises(TypeError, match="runner of 'votes_sequential' must be callable"):
        MethodSpec(**spec | {"runner": None})
    with pytest.raises(ValueError, match=r"unknown certification method 'cohen'; choose one of lipschitz, "):
        method_spec("cohen")


def test_a_registered_method_runs_through_certify_and_its_runner_is_checked(net, x) -> None:
    def votes(model, image, settings: CertificationSettings) -> CertificationOutcome:
        outcome = METHODS["randomized_smoothing_sequential"].runner(model, image, settings)
        return CertificationOutcome(dataclasses.replace(outcome.certificate, method=name), "budget")

    name = "test_votes_sequential"
    spec = dataclasses.replace(METHODS["randomized_smoothing_sequential"], name=name, runner=votes)
    register_method(spec)
    try:
        assert name in METHODS and name not in BASE_METHODS
        outcome = certify(name, net, x, **SETTINGS, generator=seeded())
        assert outcome.certificate.method == name and outcome.stop_reason == "budget"
        expected = certify("randomized_smoothing_sequential", net, x, **SETTINGS, generator=seeded())
        assert outcome.certificate.radius == expected.certificate.radius
        broken = dataclasses.replace(spec, name=name + "_broken", runner=METHODS[name].runner)
        register_method(broken)
        with pytest.raises(TypeError, match="_broken' must return a CertificationOutcome whose certificate"):
            certify(broken.name, net, x, **SETTINGS, generator=seeded())
    finally:
        certificate_module._REGISTRY.pop(name, None)
        certificate_module._REGISTRY.pop(name + "_broken", None)
    assert name not in METHODS


# --- certify(): the needs of each method --------------------------------------------------------------

def test_certify_names_the_method_and_the_missing_setting(net, x) -> None:
    for method in ("lipschitz", "smoothed_margin"):
        with pytest.raises(ValueError, match=f"method '{method}' needs lipschitz_constant"):
            certify(method, net, x, sigma=0.2)
    for method in ("smoothed_margin", "randomized_smoothing", "soft_smoothing_sequential"):
        with pytest.raises(ValueError, match=f"method '{method}' smooths with Gaussian noise and needs"):
            certify(method, net, x, lipschitz_constant=1.0)
    with pytest.raises(ValueError, match="unknown certification method 'votes'"):
        certify("votes", net, x, sigma=0.2)
    with pytest.raises(TypeError, match="logits_callback must be callable"):
        certify("soft_smoothing", net, x, sigma=0.2, logits_callback=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        certify("soft_smoothing", net, x, 0.2)  # type: ignore[misc]
    # A setting the method does not use is ignored: lipschitz needs no noise.
    assert certify("lipschitz", net, x, sigma=0.3, lipschitz_constant=2.0).certificate.sigma == 0.0


# --- certify(): the same certificate as the functions it dispatches to ---------------------------------

def test_certify_equals_each_method_function(net, x) -> None:
    constant = lipschitz_upper_bound(net, SHAPE)
    outcome = certify("lipschitz", net, x, lipschitz_constant=constant)
    assert outcome == CertificationOutcome(lipschitz_certify(net, x, constant), None)
    assert outcome.forward_passes == 1

    outcome = certify("smoothed_margin", net, x, **SETTINGS, lipschitz_constant=constant, generator=seeded())
    assert outcome.certificate == smoothed_margin_certify(
        net, x, sigma=0.2, lipschitz_constant=constant, n0=20, n=300, alpha=0.01, batch_size=64,
        generator=seeded())
    assert outcome.stop_reason is None

    fixed_n = certify("randomized_smoothing", net, x, **SETTINGS, stop_early=False, generator=seeded())
    assert fixed_n.certificate == SmoothedClassifier(net, 3, 0.2).certify(
        x, n0=20, n=300, alpha=0.01, batch_size=64, generator=seeded())
    assert fixed_n.stop_reason is None and fixed_n.forward_passes == 320

    for temperature in (1.0, 0.1):
        def scaled(batch: torch.Tensor, temperature: float = temperature) -> torch.Tensor:
            return net(batch) / temperature

        outcome = certify("soft_smoothing", net, x, **SETTINGS, score_temperature=temperature,
                          generator=seeded())
        assert outcome.certificate == soft_smoothing_certify(
            scaled, x, sigma=0.2, n0=20, n=300, alpha=0.01, batch_size=64, generator=seeded())


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("randomized_smoothing", {"scores": "hard", "bound": "fixed"}),
        ("randomized_smoothing_sequential", {"scores": "hard", "bound": "anytime"}),
        ("soft_smoothing_sequential", {"scores": "soft", "bound": "anytime", "score_temperature": 0.1}),
    ],
)
def test_certify_equals_the_sequential_sampler(net, x, method: str, options: dict) -> None:
    temperature = options.get("score_temperature", 1.0)
    outcome = certify(method, net, x, **SETTINGS, score_temperature=temperature, rel_tol=0.1,
                      min_radius=0.002, generator=seeded())
    expected = sequential_certify(net, x, sigma=0.2, alpha=0.01, n0=20, max_n=300, batch_size=64, rel_tol=0.1,
                                  min_radius=0.002, generator=seeded(), **options)
    assert outcome.certificate == expected.certificate and outcome.certificate.method == method
    assert outcome.stop_reason == expected.stop_reason and outcome.forward_passes == expected.forward_passes


def test_every_noise_method_shows_every_noisy_batch_to_the_callback(net, x) -> None:
    constant = lipschitz_upper_bound(net, SHAPE)
    generator = seeded()
    # The raw (unscaled) logits of the selection and the estimation draws, in drawing order.
    drawn_by_hand = torch.cat([noisy_logits(net, x, sigma=0.2, num=num, batch_size=64, generator=generator)
                               for num in (SETTINGS["n0"], SETTINGS["n"])])
    for method, spec in METHODS.items():
        for stop_early in (True, False):
            batches: list[torch.Tensor] = []
            outcome = certify(method, net, x, **SETTINGS, lipschitz_constant=constant, score_temperature=0.5,
                              stop_early=stop_early, generator=seeded(), logits_callback=batches.append)
            if not spec.needs_noise:  # its one batch: the clean logits the certificate was read from
                assert len(batches) == 1 and outcome.forward_passes == 1, method
                assert torch.allclose(batches[0], net(x.unsqueeze(0)).detach().to(torch.float64)), method
                continue
            seen = torch.cat(batches)
            assert seen.dtype == torch.float64 and seen.shape == (outcome.forward_passes, 3), method
            if not spec.sequential and not (method == "randomized_smoothing" and stop_early):
                assert torch.equal(seen, drawn_by_hand), method
