"""Tests of painwatch.robust.losses: values on hand-computable cases, gradients, MC agreement."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from painwatch.robust import losses


class Identity(nn.Module):
    """Logits = the input itself: margins are hand-computable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def small_convnet(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, num_classes),
    )


# ---------------------------------------------------------------- true-class margin
def test_true_class_margin_hand_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.5, 0.5, -1.0]])
    y = torch.tensor([0, 2, 1])
    assert losses.true_class_margin(logits, y).tolist() == [2.0, -3.0, 0.0]


def test_true_class_margin_rejects_mismatched_labels() -> None:
    with pytest.raises(ValueError, match="does not match"):
        losses.true_class_margin(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- MC expected-margin loss
def test_mc_loss_without_noise_is_relu_of_target_minus_margin(generator: torch.Generator) -> None:
    x = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.5, 2.0]])
    y = torch.tensor([0, 2])  # margins 2 and -0.5
    per_input = losses.mc_expected_margin_loss(Identity(), x, y, 0.0, 5, margin=1.0, reduction="none")
    assert per_input.tolist() == [0.0, 1.5]
    assert losses.mc_expected_margin_loss(Identity(), x, y, 0.0, 5, margin=4.0).item() == pytest.approx(
        (2.0 + 4.5) / 2
    )
    assert losses.mc_expected_margin_loss(Identity(), x, y, 0.0, 5, reduction="sum").item() == 1.5


def test_mc_loss_matches_exact_expectation_for_two_linear_logits() -> None:
    # With K = 2 and identity logits, M_f(x + xi) = x_0 - x_1 + (xi_0 - xi_1) is linear in the noise, so
    # E[M_f] = x_0 - x_1 = 0.3 exactly; the MC mean has standard deviation sigma*sqrt(2)/sqrt(k).
    # Margin d = 10 keeps the relu active so loss = d - mean margin; 5 standard deviations of slack.
    sigma, draws = 0.5, 20_000
    x, y = torch.tensor([[0.4, 0.1]], dtype=torch.float64), torch.tensor([0])
    loss = losses.mc_expected_margin_loss(
        Identity(), x, y, sigma, draws, margin=10.0, generator=torch.Generator().manual_seed(1)
    )
    assert abs((10.0 - loss.item()) - 0.3) < 5 * sigma * math.sqrt(2) / math.sqrt(draws)


def test_mc_loss_sees_the_cost_of_noise_with_three_classes() -> None:
    # Two tied wrong logits: E[max of the two wrong] = sigma/sqrt(pi) (max of two iid normals), so the
    # smoothed margin is below the clean margin by that amount.
    sigma, draws = 1.0, 40_000
    x, y = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    loss = losses.mc_expected_margin_loss(
        Identity(), x, y, sigma, draws, margin=10.0, generator=torch.Generator().manual_seed(2)
    )
    expected_smoothed_margin = 2.0 - sigma / math.sqrt(math.pi)
    assert (10.0 - loss.item()) == pytest.approx(expected_smoothed_margin, abs=0.03)  # ~4 MC std


def test_mc_loss_one_batched_forward_and_gradients_flow() -> None:
    model = small_convnet()
    calls: list[int] = []
    model.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    loss = losses.mc_expected_margin_loss(
        model, x, y, 0.25, 6, margin=5.0, generator=torch.Generator().manual_seed(0)
    )
    assert calls == [24]
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_mc_loss_is_reproducible_and_chunking_does_not_change_it() -> None:
    model, x, y = small_convnet(), torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])

    def value(seed: int, max_batch: int | None = None) -> float:
        gen = torch.Generator().manual_seed(seed)
        return losses.mc_expected_margin_loss(
            model, x, y, 0.5, 8, margin=5.0, generator=gen, max_batch=max_batch
        ).item()

    assert value(0) == value(0)
    assert value(0) != value(1)
    assert value(0, max_batch=5) == pytest.approx(value(0), abs=1e-6)


def test_mc_loss_module_form_is_seeded() -> None:
    model, x, y = small_convnet(), torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    first = losses.MCExpectedMarginLoss(0.3, 4, margin=2.0, seed=7)(model, x, y)
    second = losses.MCExpectedMarginLoss(0.3, 4, margin=2.0, seed=7)(model, x, y)
    assert first.item() == second.item()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": -0.1}, "sigma must be >= 0"),
        ({"sigma": float("nan")}, "sigma must be finite"),
        ({"num_draws": 0}, "num_draws must be an integer >= 1"),
        ({"reduction": "max"}, "reduction must be one of"),
        ({"y": torch.tensor([0, 3])}, "label 3 is outside"),
        ({"y": torch.tensor([0.0, 1.0])}, "integer tensor"),
        ({"y": torch.tensor([0, 1, 2])}, r"shape \(2,\)"),
        ({"max_batch": 0}, "max_batch"),
    ],
)
def test_mc_loss_rejects_bad_input_naming_the_value(kwargs: dict, message: str) -> None:
    args = {"sigma": 0.1, "num_draws": 2, "y": torch.tensor([0, 1])}
    args.update(kwargs)
    y = args.pop("y")
    with pytest.raises((ValueError, TypeError), match=message):
        losses.mc_expected_margin_loss(Identity(), torch.rand(2, 3), y, **args)
