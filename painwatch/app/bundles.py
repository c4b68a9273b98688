"""Where the page takes its model bundle from, and what to say when there is none."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from painwatch.inference import usable_methods as _usable_methods
from painwatch.models import BundleError, BundleMetadata, load_bundle, read_metadata
from painwatch.robust import method_spec

DEFAULT_BUNDLE = Path("data/demo-bundle")
"""Bundle used when neither ``--bundle`` nor ``PAINWATCH_BUNDLE`` is given (built by ``make app``)."""
BUNDLE_ENV = "PAINWATCH_BUNDLE"


def bundle_path_from_args(
    argv: Sequence[str], environ: Mapping[str, str], default: Path = DEFAULT_BUNDLE
) -> tuple[Path, str]:
    """Where the page takes its model bundle from, and why.

    Precedence: ``--bundle PATH`` in ``argv`` (``streamlit run app.py -- --bundle PATH``), then the
    ``PAINWATCH_BUNDLE`` environment variable, then ``default``. Arguments that are not ``--bundle``
    are ignored (under test runners ``sys.argv`` belongs to someone else).

    Returns ``(path, source)`` where ``source`` is a short phrase for the page ("--bundle",
    "PAINWATCH_BUNDLE" or "default").
    """
    arguments = list(argv)
    for index, argument in enumerate(arguments):
        # Only `--bundle PATH` and `--bundle=PATH`: the page's other arguments belong to Streamlit.
        value = None
        if argument == "--bundle" and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif argument.startswith("--bundle="):
            value = argument.split("=", 1)[1]
        if value:
            return Path(value).expanduser(), "--bundle"
    from_env = environ.get(BUNDLE_ENV, "").strip()
    if from_env:
        return Path(from_env).expanduser(), BUNDLE_ENV
    return default, "default"


def bundle_problem(path: Path) -> str | None:
    """A message saying how to get a bundle when ``path`` is not one, else ``None``.

    A bundle is a folder holding ``model.json`` and ``weights.safetensors``.
    """
    how_to_build = (
        "Ask whoever set up painwatch to install a model (the installation builds a demo model), or type "
        "the folder of another model in the sidebar."
    )
    if not path.exists():
        return f"No model bundle at `{path}`. {how_to_build}"
    if not path.is_dir():
        return f"`{path}` is a file, not a model bundle folder. {how_to_build}"
    missing = [name for name in ("model.json", "weights.safetensors") if not (path / name).is_file()]
    if missing:
        return f"`{path}` is not a complete model bundle: missing {', '.join(missing)}. {how_to_build}"
    return None


def bundle_fingerprint(path: Path) -> str:
    """A string that changes whenever the bundle's files change (used as a cache key)."""
    parts = []
    for name in ("model.json", "weights.safetensors"):
        stat = (path / name).stat()
        parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return f"{path.resolve()}|{'|'.join(parts)}"


def read_bundle_metadata(path: Path) -> BundleMetadata:
    """The checked ``model.json`` of the bundle at ``path`` (weights not loaded); raises
    :class:`painwatch.models.BundleError` naming the file and key when it cannot be used."""
    return read_metadata(path)


def usable_methods(path: Path) -> list[str]:
    """The certification methods the network of the bundle at ``path`` can be certified with."""
    bundle = load_bundle(path)
    return _usable_methods(bundle.model, bundle.metadata)


def method_in_words(name: str) -> str:
    """What a certification method certifies, in words (from the method registry)."""
    spec = method_spec(name)
    kind = "exact, one pass" if spec.deterministic else "from random noise draws"
    return f"{spec.certifies} ({kind})"


__all__ = ["BUNDLE_ENV", "DEFAULT_BUNDLE", "BundleError", "bundle_fingerprint", "bundle_path_from_args",
           "bundle_problem", "method_in_words", "read_bundle_metadata", "usable_methods"]
