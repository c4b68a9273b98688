"""Every split of a data set, always by individual: no individual is ever on two sides of a split.

- :func:`split_by_individual`: training and inner-validation records (``painwatch train``);
- :func:`loio_folds`: leave-one-individual-out folds, each with an inner validation split (LOIO);
- :func:`held_out_individuals`: the individuals a demo bundle is certified on.

The splits are reproducible: the same names, settings and seed give the same split on every machine,
so a saved run can be resumed and a README example repeated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Fold", "fold_seed", "held_out_individuals", "loio_folds", "split_by_individual"]

# scikit-learn is imported inside the functions: the command modules import this module when
# ``painwatch --help`` runs, and importing sklearn.model_selection takes seconds.


def split_by_individual(
    records: Sequence[Any], val_fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """Split records into (train, validation) by individual with scikit-learn's GroupShuffleSplit.

    Records are anything with an ``individual`` attribute (:class:`~painwatch.data.FrameRecord`). No
    individual is on both sides. ``val_fraction`` is the fraction of individuals held out, rounded to
    the nearest count (at least one, at most all but one); ``0`` returns ``(records, [])``. Each side
    keeps the records' order.

    Raises:
        ValueError: naming the value, for ``val_fraction`` outside [0, 1) or fewer than 2 individuals.
    """
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    records = list(records)
    if val_fraction == 0:
        return records, []
    groups = np.asarray([r.individual for r in records])
    individuals = np.unique(groups)
    if individuals.size < 2:
        raise ValueError(
            f"an inner validation split by individual needs at least 2 individuals, "
            f"got {individuals.tolist()}; use --val-fraction 0 to train without validation"
        )
    n_val = min(individuals.size - 1, max(1, round(val_fraction * individuals.size)))
    splitter = GroupShuffleSplit(n_splits=1, test_size=int(n_val), random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(records)), groups=groups))
    return [records[i] for i in train_index], [records[i] for i in val_index]


@dataclass(frozen=True)
class Fold:
    """One outer fold: frame indices of the training, inner-validation and test (left-out) sets."""

    index: int
    test_individual: str
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def individuals(self, groups: Sequence[str], part: str) -> list[str]:
        """Sorted individuals of ``part`` (``"train"``, ``"validation"`` or ``"test"``)."""
        indices = getattr(self, part)
        return sorted({str(groups[i]) for i in indices})


def fold_seed(seed: int, fold_index: int) -> int:
    """A 31-bit seed for fold ``fold_index`` derived from the run seed (independent of other folds)."""
    return int(np.random.SeedSequence([int(seed), int(fold_index)]).generate_state(1)[0] & 0x7FFFFFFF)


def loio_folds(
    groups: Sequence[str],
    *,
    inner_val_individuals: int | None = None,
    inner_val_fraction: float = 0.2,
    seed: int = 0,
) -> list[Fold]:
    """Leave-one-individual-out folds with an inner validation split by individual.

    ``groups`` holds each frame's individual. Outer folds follow
    ``sklearn.model_selection.LeaveOneGroupOut`` (one fold per individual, in sorted order of the
    names). In fold ``k`` the remaining individuals are split by
    ``GroupShuffleSplit(random_state=fold_seed(seed, k))`` into training and validation individuals:
    ``inner_val_individuals`` of them when given, else ``inner_val_fraction`` of them (rounded up),
    always at least one and leaving at least one for training.

    Guarantees: the three index sets of a fold are disjoint, sorted, cover every frame, and no
    individual appears in two of them; every frame is in exactly one test set over all folds.

    Raises:
        ValueError: fewer than 3 individuals, or a split size that leaves no training individual.
    """
    from sklearn.model_selection import GroupShuffleSplit, LeaveOneGroupOut

    group_array = np.asarray([str(g) for g in groups], dtype=object)
    unique = sorted(set(group_array.tolist()))
    if len(unique) < 3:
        raise ValueError(
            f"leave-one-individual-out needs at least 3 individuals (1 left out, 1 for training, 1 for "
            f"validation); got {len(unique)}: {unique}"
        )
    remaining = len(unique) - 1
    if inner_val_individuals is not None:
        if isinstance(inner_val_individuals, bool) or int(inner_val_individuals) != inner_val_individuals:
            raise ValueError(f"inner_val_individuals must be an integer; got {inner_val_individuals!r}")
        num_val = int(inner_val_individuals)
        if not 1 <= num_val < remaining:
            raise ValueError(
                f"inner_val_individuals must be in [1, {remaining - 1}] with {len(unique)} individuals "
                f"(one is left out, at least one must train); got {num_val}"
            )
    else:
        if not 0.0 < float(inner_val_fraction) < 1.0:
            raise ValueError(f"inner_val_fraction must be in (0, 1); got {inner_val_fraction!r}")
        num_val = min(remaining - 1, max(1, math.ceil(float(inner_val_fraction) * remaining)))

    # Integer codes in sorted-name order make LeaveOneGroupOut's fold order the sorted order.
    codes = np.searchsorted(np.asarray(unique, dtype=object), group_array)
    folds = []
    positions = np.arange(len(group_array))
    for index, (rest, test) in enumerate(LeaveOneGroupOut().split(positions, groups=codes)):
        splitter = GroupShuffleSplit(n_splits=1, test_size=num_val, random_state=fold_seed(seed, index))
        inner_train, inner_val = next(splitter.split(rest, groups=codes[rest]))
        folds.append(
            Fold(
                index=index,
                test_individual=str(group_array[test[0]]),
                train=np.sort(rest[inner_train]),
                validation=np.sort(rest[inner_val]),
                test=np.sort(test),
            )
        )
    return folds


def held_out_individuals(individuals: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` individuals chosen reproducibly (by ``seed``) to certify on; the rest train.

    ``individuals`` may repeat names (one per frame); the choice is among the sorted distinct names,
    and the result is sorted.

    Raises:
        ValueError: naming the count, unless at least 2 individuals are left for training and 1 held
            out.
    """
    names = sorted(set(individuals))
    if count < 1 or count > len(names) - 2:
        raise ValueError(
            f"--held-out must be between 1 and {len(names) - 2} for {len(names)} individuals "
            f"(training needs at least 2, one of them for validation), got {count}"
        )
    chosen = np.random.default_rng(seed).choice(len(names), size=count, replace=False)
    return sorted(names[i] for i in chosen)
