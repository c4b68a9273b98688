"""Training the clinical model.

- :mod:`painwatch.training.config`: :class:`TrainConfig`, every training setting declared once.
- :mod:`painwatch.training.loops`: :func:`~painwatch.training.loops.fit` (fine-tuning, noise-robust
  options included).
- :mod:`painwatch.training.head`: a linear head on cached backbone features.
- :mod:`painwatch.training.batches`: data loaders, logits and features of a model over records.
- :mod:`painwatch.training.bundle`: :func:`~painwatch.training.bundle.train_bundle`, records in, model
  bundle out.

This package's ``__init__`` imports only the configuration, so that reading the settings (the command
line's ``--help``) does not pay for importing torch.
"""

from painwatch.training.config import CLASS_BALANCING, DEVICES, LOSSES, MONITORS, SCHEDULES, TrainConfig

__all__ = ["CLASS_BALANCING", "DEVICES", "LOSSES", "MONITORS", "SCHEDULES", "TrainConfig"]
