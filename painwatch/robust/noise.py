"""The one seeded Gaussian sampler of :mod:`painwatch.robust`, and the eval-mode context.

Every smoothing certificate, attack check and Monte Carlo estimate draws its noise here, from the
``torch.Generator`` the caller passes, in a fixed order: the same seed gives the same noise, hence the
same certificate. Noisy images are *not* clipped to [0, 1]: the Gaussian ``N(x, sigma^2 I)`` is what
the guarantees are about (docs/design.md, "Units and conventions"). ``sigma`` is an L2 noise std in
[0, 1] pixel units; logits come back in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from painwatch.robust.validation import (
    Model,
    check_count,
    check_generator,
    check_image,
    check_logits,
    check_model,
    check_same_device,
    check_sigma,
)

__all__ = [
    "evaluation_mode",
    "expected_logits",
    "expected_softmax",
    "noisy_copies",
    "noisy_logit_batches",
    "noisy_logits",
    "resolve_generator",
]


@contextmanager
def evaluation_mode(model: Model) -> Iterator[None]:
    """Put an ``nn.Module`` (and every submodule) in eval mode for the block, then restore each flag.

    Certificates are statements about the deterministic network: dropout and batch-norm statistics
    must not change between forward passes. Plain callables are left alone.
    """
    if not isinstance(model, torch.nn.Module):
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """The caller's generator, or a fresh CPU one seeded non-deterministically (results then vary)."""
    check_generator(generator)
    if generator is not None:
        return generator
    fresh = torch.Generator()
    fresh.seed()
    return fresh


def _noisy_copies(
    x: torch.Tensor, sigma: float, num: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    remaining = num
    while remaining > 0:
        this_batch = min(batch_size, remaining)
        # Drawn on the generator's device, so that a seed gives the same noise whatever device x is on.
        noise = torch.randn((this_batch, *x.shape), generator=generator, device=generator.device,
                            dtype=x.dtype)
        remaining -= this_batch
        yield x.unsqueeze(0) + sigma * noise.to(x.device)


def noisy_copies(
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """``num`` Gaussian perturbations ``x + sigma * Z_k`` of one image ``(C, H, W)``, in chunks of at most
    ``batch_size`` rows, each chunk drawn from ``generator`` when it is taken (the same order, hence the
    same noise, as :func:`noisy_logit_batches`). Not clipped to [0, 1]. Arguments are checked at once."""
    check_image(x)
    return _noisy_copies(x, check_sigma(sigma), check_count(num, "num"),
                         check_count(batch_size, "batch_size"), resolve_generator(generator))


def _draw_batches(
    model: Model, x: torch.Tensor, sigma: float, num: int, batch_size: int, generator: torch.Generator,
    num_classes: int | None, logits_callback: Callable[[torch.Tensor], None] | None,
) -> Iterator[torch.Tensor]:
    with evaluation_mode(model), torch.no_grad():
        for batch in _noisy_copies(x, sigma, num, batch_size, generator):
            logits = check_logits(model(batch), batch.shape[0], num_classes=num_classes)
            logits = logits.detach().to(torch.float64)
            if logits_callback is not None:
                logits_callback(logits)
            yield logits


def noisy_logit_batches(
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
    logits_callback: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[torch.Tensor]:
    """Logits of ``model`` at ``num`` Gaussian perturbations of one image, in batches, as drawn.

    ``x`` is ``(C, H, W)`` in [0, 1]. Yields float64 tensors ``(b, K)`` with ``b <= batch_size`` and
    ``num`` rows in all; row k is ``f(x + sigma * Z_k)`` with ``Z_k`` standard Gaussian drawn from
    ``generator`` in order. The model runs in eval mode under ``torch.no_grad`` (its training flags are
    restored); ``K`` must equal ``num_classes`` when given. ``logits_callback`` sees every batch before
    it is yielded. The arguments are checked when this is called, not at the first batch.
    """
    check_model(model)
    check_image(x)
    check_same_device(model, x)
    sigma = check_sigma(sigma)
    num = check_count(num, "num")
    batch_size = check_count(batch_size, "batch_size")
    generator = resolve_generator(generator)
    return _draw_batches(model, x, sigma, num, batch_size, generator, num_classes, logits_callback)


def noisy_logits(
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """All of :func:`noisy_logit_batches` at once: float64 tensor ``(num, K)``.

    Same generator state, same output, whatever ``batch_size`` divides the work into.
    """
    batches = noisy_logit_batches(model, x, sigma=sigma, num=num, batch_size=batch_size, generator=generator)
    return torch.cat(list(batches), dim=0)


def expected_logits(
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte Carlo estimate of ``E_xi[f(x + xi)]`` (float64 ``(K,)``) from ``num`` noise draws.

    Its argmax estimates the expected-logit classifier ``h`` that the smoothed margin certifies.
    """
    logits = noisy_logits(model, x, sigma=sigma, num=num, batch_size=batch_size, generator=generator)
    return logits.mean(dim=0)


def expected_softmax(
    model: Model,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    batch_size: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Monte Carlo estimate of ``G(x) = E_xi[softmax f(x + xi)]`` (float64 ``(K,)``) from ``num`` draws."""
    logits = noisy_logits(model, x, sigma=sigma, num=num, batch_size=batch_size, generator=generator)
    return torch.softmax(logits, dim=1).mean(dim=0)
