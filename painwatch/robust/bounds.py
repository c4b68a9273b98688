"""Confidence bounds on means of [0, 1] draws: the statistics behind every smoothing radius.

- :func:`clopper_pearson_lower`: the exact one-sided binomial bound [CP34] of Cohen's CERTIFY
  [Cohen19] (docs/design.md, "The certificates", item 4).
- :func:`hoeffding_radius`, :func:`empirical_bernstein_radius` [MP09] and
  :func:`mean_confidence_bounds`: fixed-n bounds on soft scores (item 5).
- :class:`BettingLowerBound`: the betting confidence sequence [WSR23], valid uniformly over time, so
  under any stopping rule (item 6), and :func:`best_attainable_lower_bound`, the most it can reach.

Every bound is one-sided at the stated failure probability; a caller that uses several at once
union-bounds over them.

The confidence sequence
-----------------------
For i.i.d. draws ``X_1, X_2, ... in [0, 1]`` with mean ``mu`` and a candidate value ``m in (0, 1)``, the
betting capital [WSR23] ``K_t(m) = prod_{i <= t} (1 - nu_i + nu_i X_i / m)`` with bets ``nu_i in [0, 1)``
that depend only on ``X_1 .. X_{i-1}`` is a non-negative supermartingale whenever ``mu <= m`` (each
factor has conditional mean ``1 - nu_i + nu_i mu / m <= 1``). Ville's inequality gives
``P(exists t: K_t(m) >= 1 / alpha) <= alpha``. Because the bets ``nu_i`` do not depend on ``m``, every
factor, hence ``K_t(m)``, is non-increasing in ``m``; so if any ``m' >= mu`` is ever rejected then
``K_t(mu) >= K_t(m') >= 1 / alpha`` at that time, and the running bound
``L_t = max {m' in grid : K_s(m') >= 1 / alpha for some s <= t}`` satisfies
``P(exists t: L_t > mu) <= alpha``. This holds for any grid and any stopping time. The bets are the
approximate Kelly bets for a point between the current bound and the running mean, which makes the
bound close to Clopper-Pearson on Bernoulli data and much tighter on low-variance soft scores.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta as beta_distribution
from scipy.stats import norm
from torch import Tensor

from painwatch.robust.validation import check_alpha, check_count, check_sigma

__all__ = [
    "CONCENTRATION_BOUNDS",
    "BettingLowerBound",
    "best_attainable_lower_bound",
    "clopper_pearson_lower",
    "empirical_bernstein_radius",
    "hoeffding_radius",
    "mean_confidence_bounds",
]

CONCENTRATION_BOUNDS: tuple[str, ...] = ("hoeffding", "bernstein", "best")
"""Confidence bounds for means of [0, 1] scores: Hoeffding, empirical Bernstein [MP09],
or the smaller of both (each at half the failure probability, so the pair is union-bounded)."""


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson [CP34] lower confidence bound on a binomial proportion, level ``1 - alpha``.

    ``P(p >= bound) >= 1 - alpha`` for ``successes ~ Binomial(trials, p)``: the ``alpha`` quantile of
    ``Beta(successes, trials - successes + 1)``, and 0 when ``successes == 0``.
    """
    trials = check_count(trials, "trials")
    successes = check_count(successes, "successes", minimum=0)
    if successes > trials:
        raise ValueError(f"successes ({successes}) cannot exceed trials ({trials})")
    alpha = check_alpha(alpha)
    if successes == 0:
        return 0.0
    return float(beta_distribution.ppf(alpha, successes, trials - successes + 1))


def hoeffding_radius(n: int, delta: float) -> float:
    """One-sided Hoeffding radius for the mean of ``n`` i.i.d. scores in [0, 1] at failure prob. ``delta``.

    ``P(E[Z] > mean + radius) <= delta`` (and likewise below), with ``radius = sqrt(ln(1/delta) / (2 n))``.
    """
    n = check_count(n, "n")
    return math.sqrt(math.log(1.0 / check_alpha(delta, "delta")) / (2.0 * n))


def empirical_bernstein_radius(sample_variance: np.ndarray, n: int, delta: float) -> np.ndarray:
    """One-sided empirical Bernstein radius ([MP09], Theorem 4) for scores in [0, 1].

    With probability at least ``1 - delta``,
    ``E[Z] <= mean + sqrt(2 V ln(2/delta) / n) + 7 ln(2/delta) / (3 (n-1))``, where ``V`` is the
    unbiased sample variance; applied to ``1 - Z`` the same radius bounds ``E[Z]`` from below.
    Needs ``n >= 2``. Much tighter than Hoeffding when the scores barely vary (a confident net).
    """
    n = check_count(n, "n", minimum=2)
    delta = check_alpha(delta, "delta")
    variance = np.clip(np.asarray(sample_variance, dtype=np.float64), 0.0, None)
    log_term = math.log(2.0 / delta)
    return np.sqrt(2.0 * variance * log_term / n) + 7.0 * log_term / (3.0 * (n - 1))


def mean_confidence_bounds(
    scores: np.ndarray, delta: float, method: str = "best"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-column one-sided bounds on the means of scores in [0, 1]: ``(lower, upper)``, clipped to [0, 1].

    ``scores`` is ``(n, m)``. For each column, ``P(E < lower) <= delta`` and ``P(E > upper) <= delta``
    separately (a caller that uses several bounds at once must union-bound over them). ``method`` is one
    of :data:`CONCENTRATION_BOUNDS`; ``"best"`` takes the tighter of Hoeffding and empirical Bernstein,
    each computed at ``delta / 2``, which keeps every reported bound valid at ``delta``.
    """
    if method not in CONCENTRATION_BOUNDS:
        raise ValueError(f"method must be one of {CONCENTRATION_BOUNDS}, got {method!r}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"scores must have shape (n, m) with n >= 1, got {values.shape}")
    if np.isnan(values).any() or values.min() < 0.0 or values.max() > 1.0:
        raise ValueError("scores must lie in [0, 1] (softmax probabilities) and contain no NaN")
    n = values.shape[0]
    delta = check_alpha(delta, "delta")
    if method != "hoeffding" and n < 2:
        raise ValueError(f"the empirical Bernstein bound needs n >= 2 samples, got n={n}")
    mean = values.mean(axis=0)
    if method == "hoeffding":
        radius = np.full_like(mean, hoeffding_radius(n, delta))
    elif method == "bernstein":
        radius = empirical_bernstein_radius(values.var(axis=0, ddof=1), n, delta)
    else:
        radius = np.minimum(hoeffding_radius(n, delta / 2.0),
                            empirical_bernstein_radius(values.var(axis=0, ddof=1), n, delta / 2.0))
    return np.clip(mean - radius, 0.0, 1.0), np.clip(mean + radius, 0.0, 1.0)



class BettingLowerBound:
    """Anytime-valid lower confidence bound for the mean of i.i.d. draws in [0, 1].

    Feed draws with :meth:`update` in any batch sizes; :attr:`lower` is then a number with
    ``P(exists t: lower_t > mean) <= alpha`` (time-uniform coverage, so it stays valid under any
    data-dependent stopping rule). The bound is non-decreasing in time and lies on a grid that is
    uniform in probit space (``Phi(z)`` for ``z`` from ``probit_min`` to ``probit_max`` in steps of
    ``probit_step``; 0.0 until the lowest grid point is rejected), so the certified radius
    ``sigma * PhiInv(lower)`` loses at most ``sigma * probit_step`` to the grid.

    Args:
        alpha: error probability in (0, 1).
        probit_step: grid step in probit units (> 0).
        probit_min, probit_max: the grid covers ``Phi(probit_min) .. Phi(probit_max)``; a
            certificate only needs bounds above 1/2 (``probit_min = 0``).
        max_bet: the largest bet fraction ``nu`` in (0, 1); closer to 1 is tighter on saturated
            scores, further from 1 loses less capital on a draw near 0.
    """

    _HISTOGRAM_BINS = 2048

    def __init__(
        self,
        alpha: float,
        *,
        probit_step: float = 0.002,
        probit_min: float = -7.0,
        probit_max: float = 7.0,
        max_bet: float = 0.98,
    ) -> None:
        self.alpha = check_alpha(alpha)
        probit_step = check_sigma(probit_step, "probit_step")
        if not (math.isfinite(probit_min) and math.isfinite(probit_max) and probit_min < probit_max):
            raise ValueError(f"need finite probit_min < probit_max, got {probit_min!r} and {probit_max!r}")
        self.max_bet = check_alpha(max_bet, "max_bet")
        z = np.arange(probit_min, probit_max + probit_step / 2, probit_step)
        self.grid = norm.cdf(z)
        self._log_threshold = math.log(1.0 / self.alpha)
        self._log_capital = np.zeros_like(self.grid)
        self._highest_rejected = -1
        self.count = 0
        self._sum = 0.0
        # Past draws, binned: the bet only has to depend on the past, not be exactly optimal.
        self._histogram = np.zeros(self._HISTOGRAM_BINS + 1)
        self._bin_values = np.linspace(0.0, 1.0, self._HISTOGRAM_BINS + 1)

    @property
    def lower(self) -> float:
        """The current lower confidence bound (0.0 before anything is rejected)."""
        return float(self.grid[self._highest_rejected]) if self._highest_rejected >= 0 else 0.0

    @property
    def mean(self) -> float:
        """The mean of the draws so far (NaN before the first draw)."""
        return self._sum / self.count if self.count else math.nan

    def _next_bet(self) -> float:
        """The next bet: empirical Kelly against a point halfway between the bound and the mean.

        It maximises the average log growth ``mean log(1 - nu + nu X / m)`` over the draws seen so
        far (plus a prior of half a draw at 0 and half a draw at 1, which keeps the first bets small).
        It only uses past draws, which is all that validity needs.
        """
        mean = (0.5 + self._sum) / (1 + self.count)
        reference = 0.5 * (max(self.lower, self.grid[0]) + mean)
        if mean <= reference:
            return 0.0
        weights = self._histogram.copy()
        weights[0] += 0.5
        weights[-1] += 0.5
        used = weights > 0
        weights, excess = weights[used], self._bin_values[used] / reference - 1.0

        def slope(bet: float) -> float:
            return float(np.sum(weights * excess / (1.0 + bet * excess)))

        if slope(self.max_bet) >= 0.0:
            return self.max_bet
        low, high = 0.0, self.max_bet  # the growth is concave in the bet: bisect its slope
        for _ in range(30):
            middle = 0.5 * (low + high)
            if slope(middle) > 0.0:
                low = middle
            else:
                high = middle
        return low

    def _bet_on(self, values: np.ndarray, bet: float, chunk: int = 256) -> None:
        start = self._highest_rejected + 1  # grid points below are rejected for good
        if bet <= 0.0 or start >= self.grid.size:
            return
        grid = self.grid[start:]
        capital = self._log_capital[start:]
        for offset in range(0, values.size, chunk):
            part = values[offset : offset + chunk]
            path = capital[None, :] + np.cumsum(np.log1p(bet * (part[:, None] / grid[None, :] - 1.0)), axis=0)
            rejected = np.flatnonzero(path.max(axis=0) >= self._log_threshold)
            if rejected.size:
                self._highest_rejected = max(self._highest_rejected, start + int(rejected.max()))
            capital = path[-1]
        self._log_capital[start:] = capital

    def update(self, values: np.ndarray | Tensor) -> float:
        """Add draws (any 1-D array of numbers in [0, 1]) and return the updated lower bound.

        The draws are processed in order, in short runs (an eighth of the draws seen so far, 8 to
        512) that share one bet computed from all earlier draws. Rejection is checked after every
        single draw.
        """
        if isinstance(values, Tensor):
            values = values.detach().cpu().numpy()
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        invalid = ~np.isfinite(values) | (values < 0.0) | (values > 1.0)
        if invalid.any():
            raise ValueError(f"draws must lie in [0, 1], got {values[invalid][0]!r}")
        offset = 0
        while offset < values.size:
            run = values[offset : offset + int(np.clip(self.count // 8, 8, 512))]
            self._bet_on(run, self._next_bet())
            np.add.at(self._histogram, np.rint(run * self._HISTOGRAM_BINS).astype(np.int64), 1.0)
            self.count += run.size
            self._sum += float(run.sum())
            offset += run.size
        return self.lower


def best_attainable_lower_bound(alpha: float, num_draws: int, max_bet: float = 0.98) -> float:
    """The lower bound :class:`BettingLowerBound` reaches after ``num_draws`` draws that all equal 1.

    Solves ``num_draws * log(1 - nu + nu / m) = log(1 / alpha)`` for ``m`` at the largest bet
    ``nu = max_bet``; no number of draws below ``num_draws`` can certify a larger score, so
    ``sigma * PhiInv`` of it is the largest radius a budget of ``num_draws`` can give.
    """
    alpha = check_alpha(alpha)
    num_draws = check_count(num_draws, "num_draws")
    growth = math.expm1(math.log(1.0 / alpha) / num_draws)
    return max_bet / (growth + max_bet)

