"""The incremental sequential certificate: SequentialSampler, sequential_certify_steps and the registry's
certify_steps / certification_sampler.

The last step must equal the one-shot certificate as it was before the incremental API existed:
``_reference_certify`` below is that loop, kept verbatim (it drew its noise through ``noisy_logits``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from painwatch.robust import (
    METHODS,
    SequentialSampler,
    certification_sampler,
    certify,
    certify_steps,
    noisy_logits,
    sequential_certify,
    sequential_certify_steps,
)
from painwatch.robust.bounds import BettingLowerBound, best_attainable_lower_bound, clopper_pearson_lower
from painwatch.robust.certificate import ABSTAIN


def _reference_certify(model, x, *, sigma, alpha=0.001, n0=64, max_n=100_000, first_batch=64, max_batch=2048,
                       batch_size=256, target_radius=None, rel_tol=0.05, min_radius=0.0, scores="soft",
                       score_temperature=1.0, bound="anytime", generator=None):
    """The one-shot loop of painwatch.robust.sequential before the sampler: (prediction, radius, n,
    bound, forward_passes, stop_reason, upper_bound, point_estimate)."""

    def selection_class(logits):
        if scores == "soft":
            return int(torch.softmax(logits / score_temperature, dim=1).mean(dim=0).argmax())
        return int(torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1]).argmax())

    def class_scores(logits, predicted):
        if scores == "soft":
            values = torch.softmax(logits / score_temperature, dim=1)[:, predicted]
        else:
            values = (logits.argmax(dim=1) == predicted).to(torch.float64)
        return values.clamp(0.0, 1.0).cpu().numpy()

    selection = noisy_logits(model, x, sigma=sigma, num=n0, batch_size=batch_size, generator=generator)
    predicted = selection_class(selection)
    lower_bound = BettingLowerBound(alpha, probit_min=0.0)
    upper_tracker = BettingLowerBound(alpha, probit_step=0.02)
    fixed = bound == "fixed"
    attainable = sigma * norm.ppf(
        alpha ** (1.0 / max_n) if fixed else best_attainable_lower_bound(alpha, max_n, lower_bound.max_bet)
    )
    votes, used, batch, stop_reason, radius = 0, 0, min(first_batch, max_batch), "budget", 0.0
    while used < max_n:
        draws = min(batch, max_n - used)
        logits = noisy_logits(model, x, sigma=sigma, num=draws, batch_size=batch_size, generator=generator)
        values = class_scores(logits, predicted)
        upper = 1.0 - upper_tracker.update(1.0 - values)
        used += draws
        batch = min(2 * batch, max_batch)
        best = min(attainable, sigma * float(norm.ppf(upper))) if upper > 0.5 else 0.0
        if fixed:
            votes += int(values.sum())
            if used < max_n and (best <= 0.0 or best < min_radius):
                stop_reason = "futile"
                break
            continue
        lower = lower_bound.update(values)
        radius = sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0
        if target_radius is not None and radius >= target_radius:
            stop_reason = "target"
            break
        if best <= 0.0 or best < min_radius:
            stop_reason = "futile"
            break
        if radius > 0.0 and best - radius <= max(rel_tol * best, min_radius):
            stop_reason = "saturated"
            break
    if fixed:
        lower = clopper_pearson_lower(votes, max_n, alpha) if used == max_n else 0.0
        radius = sigma * float(norm.ppf(lower)) if lower > 0.5 else 0.0
    else:
        lower = lower_bound.lower
    certified = lower > 0.5 and radius > 0.0
    return (predicted if certified else ABSTAIN, radius if certified else 0.0, used, lower, n0 + used,
            stop_reason, 1.0 - upper_tracker.lower, votes / used if fixed else lower_bound.mean)


def _as_tuple(result):
    c = result.certificate
    return (c.prediction, c.radius, c.n, c.bound, result.forward_passes, result.stop_reason,
            result.upper_bound, result.point_estimate)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.6)
    return model


def _image(seed: int) -> torch.Tensor:
    return torch.rand((3, 4, 4), generator=torch.Generator().manual_seed(seed))


CASES = [
    {"scores": "soft", "max_n": 700, "rel_tol": 0.05},
    {"scores": "soft", "max_n": 3000, "score_temperature": 0.1, "min_radius": 0.004},
    {"scores": "hard", "max_n": 500},
    {"scores": "hard", "max_n": 936, "bound": "fixed", "min_radius": 0.002},
    {"scores": "hard", "max_n": 20_000, "bound": "fixed", "min_radius": 0.01},
    {"scores": "soft", "max_n": 5000, "target_radius": 0.05},
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("image_seed", [1, 2, 3])
def test_last_step_equals_the_one_shot_certificate_as_it_was(net, case: dict, image_seed: int) -> None:
    x = _image(image_seed)
    options = {"sigma": 0.3, "alpha": 0.01, "n0": 16, "first_batch": 32, "batch_size": 50, **case}
    expected = _reference_certify(net, x, generator=torch.Generator().manual_seed(5), **options)
    steps = list(sequential_certify_steps(net, x, generator=torch.Generator().manual_seed(5), **options))
    assert _as_tuple(steps[-1]) == expected
    assert steps[-1] == sequential_certify(net, x, generator=torch.Generator().manual_seed(5), **options)
    assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
    assert all(s.stop_reason is None for s in steps[:-1]) and steps[-1].stop_reason in (
        "target", "saturated", "futile", "budget")
    assert steps[0].certificate.n == 0 and steps[0].forward_passes == 16  # the selection draws
    draws = [s.certificate.n for s in steps]
    assert draws == sorted(draws) and all(s.budget == case["max_n"] for s in steps)
    if case.get("bound") == "fixed":
        # No interim radius is valid with Clopper-Pearson over the whole budget: the steps before the
        # last abstain and show progress only.
        assert all(s.certificate.prediction == ABSTAIN and s.certificate.radius == 0.0 for s in steps[:-1])
    else:
        # The confidence sequence never goes down: the radius shown grows while the draws come in.
        radii = [s.certificate.radius for s in steps]
        assert radii == sorted(radii)


def test_the_noise_seen_step_by_step_is_the_noise_of_the_generator(net) -> None:
    x = _image(4)
    sampler = SequentialSampler(x, sigma=0.3, n0=10, max_n=100, first_batch=30, batch_size=25,
                                generator=torch.Generator().manual_seed(9))
    seen = []
    while not sampler.done:
        chunks = list(sampler.noisy_chunks())
        assert all(chunk.shape[0] <= 25 for chunk in chunks)
        seen.append(torch.cat(chunks))
        sampler.step(net(seen[-1]))
    assert [s.shape[0] for s in seen] == [10, 30, 60, 10]
    generator = torch.Generator().manual_seed(9)
    sizes = (10, 25, 5, 25, 25, 10, 10)  # each step in chunks of at most 25
    by_hand = torch.cat([x + 0.3 * torch.randn((n, *x.shape), generator=generator) for n in sizes])
    assert torch.equal(torch.cat(seen), by_hand)


def test_several_images_share_forward_passes_and_give_their_own_certificates(net) -> None:
    images = [_image(seed) for seed in (5, 6, 7)]
    options = {"sigma": 0.3, "alpha": 0.01, "n0": 16, "max_n": 400, "batch_size": 40, "scores": "hard",
               "bound": "fixed"}
    alone = [sequential_certify(net, x, generator=torch.Generator().manual_seed(i), **options)
             for i, x in enumerate(images)]
    samplers = [SequentialSampler(x, generator=torch.Generator().manual_seed(i), **options)
                for i, x in enumerate(images)]
    passes = 0
    while not all(s.done for s in samplers):
        active = [s for s in samplers if not s.done]
        chunks = [list(s.noisy_chunks()) for s in active]
        logits = net(torch.cat([torch.cat(c) for c in chunks]))  # one pass for every image's draws
        passes += 1
        sizes = [sum(chunk.shape[0] for chunk in c) for c in chunks]
        for sampler, part in zip(active, torch.split(logits, sizes), strict=True):
            sampler.step(part)
    assert [s.last for s in samplers] == alone
    one_by_one = sum(len(list(sequential_certify_steps(net, x, generator=torch.Generator().manual_seed(i),
                                                       **options))) for i, x in enumerate(images))
    assert passes < one_by_one


def test_the_sampler_refuses_steps_out_of_order(net) -> None:
    sampler = SequentialSampler(_image(1), sigma=0.3, n0=4, max_n=8,
                                generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="noisy_chunks"):
        sampler.step(torch.zeros(4, 3))
    chunks = list(sampler.noisy_chunks())
    with pytest.raises(RuntimeError, match="not observed"):
        sampler.noisy_chunks()
    with pytest.raises(ValueError):
        sampler.step(net(torch.cat(chunks))[:2])  # fewer logits than draws
    with pytest.raises(ValueError, match="scores"):
        SequentialSampler(_image(1), sigma=0.3, scores="votes")
    with pytest.raises(ValueError, match="max_n"):
        list(sequential_certify_steps(net, _image(1), sigma=0.3, max_n=1))


SETTINGS = {"sigma": 0.3, "alpha": 0.01, "n0": 16, "n": 400, "batch_size": 64, "min_radius": 0.003}


@pytest.mark.parametrize("method", list(METHODS))
def test_certify_steps_of_every_method_ends_in_certify(net, method: str) -> None:
    x = _image(8)
    options = dict(SETTINGS, lipschitz_constant=50.0, score_temperature=0.5)
    steps = list(certify_steps(method, net, x, generator=torch.Generator().manual_seed(3), **options))
    expected = certify(method, net, x, generator=torch.Generator().manual_seed(3), **options)
    assert steps[-1].certificate == expected.certificate and steps[-1].stop_reason == expected.stop_reason
    assert steps[-1].done and not any(s.done for s in steps[:-1])
    sampler = certification_sampler(method, x, generator=torch.Generator().manual_seed(3), **options)
    if METHODS[method].sampler is None:
        assert sampler is None and len(steps) == 1
    else:
        assert sampler is not None and len(steps) > 1 and steps[-1].budget == 400
    # randomized_smoothing without early stops is Cohen's CERTIFY in one go.
    assert certification_sampler("randomized_smoothing", x, stop_early=False, **SETTINGS) is None


def _linear_vote(centre: float):
    weight = torch.tensor([1.0, -1.0, 2.0, 0.5])
    x = torch.full((1, 2, 2), 0.5)
    bias = centre - float(x.flatten() @ weight)

    def model(batch: torch.Tensor) -> torch.Tensor:
        score = batch.flatten(1) @ weight + bias
        return torch.stack([torch.zeros_like(score), score], dim=1)

    return model, x, float(weight.norm())


@pytest.mark.parametrize(("scores", "bound"), [("soft", "anytime"), ("hard", "anytime"), ("hard", "fixed")])
def test_the_share_of_noise_that_keeps_the_answer_is_bounded_from_below(scores: str, bound: str) -> None:
    # P[argmax f(x + xi) = 1] = Phi(centre / (sigma ||w||)) for the linear pair: the bound must exceed it
    # in at most an alpha share of runs, at every step for the anytime bounds.
    alpha, sigma, trials, centre = 0.1, 0.5, 50, 1.0
    model, x, norm_w = _linear_vote(centre)
    share = float(norm.cdf(centre / (sigma * norm_w)))
    too_high, finals = 0, []
    for seed in range(trials):
        steps = list(sequential_certify_steps(
            model, x, sigma=sigma, alpha=alpha, n0=16, max_n=300, first_batch=32, scores=scores, bound=bound,
            rel_tol=0.0, generator=torch.Generator().manual_seed(seed)))
        too_high += any(s.vote_lower_bound > share for s in steps)
        finals.append(steps[-1].vote_lower_bound)
        last = steps[-1]
        assert last.votes <= last.certificate.n
        if scores == "hard":
            expected = 0.0 if last.certificate.abstained else last.certificate.bound
            assert last.vote_lower_bound == expected
    assert too_high <= int(binom.ppf(0.999, trials, alpha))
    assert np.mean(finals) > share - 0.12  # and not vacuous
    assert math.isfinite(np.mean(finals))
