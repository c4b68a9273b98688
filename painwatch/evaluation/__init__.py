"""Measuring models: leave-one-individual-out runs, the certification gate and their reports.

- :mod:`painwatch.evaluation.settings`: :class:`LoioSettings` and :class:`CertifySettings`.
- :mod:`painwatch.evaluation.loio`: :func:`~painwatch.evaluation.loio.run_loio`, resumable per fold;
  :mod:`painwatch.evaluation.outputs` writes its pooled outputs.
- :mod:`painwatch.evaluation.certify`: measure -> summarise -> verdict;
  :mod:`painwatch.evaluation.gate` reads gate files and judges; :mod:`painwatch.evaluation.certify_report`
  writes the report.
- :mod:`painwatch.evaluation.metrics`: classification metrics and the cluster bootstrap by individual.
- :mod:`painwatch.evaluation.report`: Markdown/HTML reports and plots.
- :mod:`painwatch.evaluation.demo`: the demo bundle.

This package's ``__init__`` imports only the settings, so that the command line's ``--help`` stays fast.
"""

from painwatch.evaluation.settings import CertifySettings, DemoSettings, LoioSettings

__all__ = ["CertifySettings", "DemoSettings", "LoioSettings"]
