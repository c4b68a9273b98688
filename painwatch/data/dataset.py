"""A torch ``Dataset`` over frame records."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from painwatch.data.images import Detector
from painwatch.data.records import FrameRecord, load_frame


class FrameDataset(Dataset):
    """Frames of ``records`` as ``(tensor, label)`` pairs.

    Item ``i`` reads ``records[i]`` from disk, crops its face (box, else ``detector``, else the whole
    frame; ``margin`` as in :func:`~painwatch.data.images.crop_face`), and applies ``transform`` (a
    callable uint8 RGB array -> tensor, e.g. :func:`~painwatch.data.transforms.eval_transform`). The
    label is the class index (``no_pain`` = 0, ``pain`` = 1) as a Python int. Nothing is cached, so the
    dataset is cheap to pickle into DataLoader workers.

    ``labels`` and ``groups`` (individual names) are numpy arrays aligned with the records, for
    splitting by individual.
    """

    def __init__(
        self,
        records: Sequence[FrameRecord],
        transform: Callable[[np.ndarray], torch.Tensor],
        detector: Detector | None = None,
        margin: float = 0.1,
    ) -> None:
        self.records = list(records)
        if not all(isinstance(record, FrameRecord) for record in self.records):
            raise TypeError("records must be FrameRecord objects (see painwatch.data.load_records)")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if not np.isfinite(margin) or margin < 0:
            raise ValueError(f"margin must be a finite fraction >= 0, got {margin}")
        self.transform = transform
        self.detector = detector
        self.margin = float(margin)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        image = load_frame(record, detector=self.detector, margin=self.margin)
        return self.transform(image), record.label

    @property
    def labels(self) -> np.ndarray:
        return np.array([record.label for record in self.records], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([record.individual for record in self.records], dtype=object)
