"""The shape of painwatch.robust: acyclic top-level imports, no project imports, small modules, and
keyword-only settings (docs/design.md, "Layout and arrows")."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import painwatch.robust as robust

ROBUST = Path(robust.__file__).parent
MODULES = sorted(info.name for info in pkgutil.iter_modules([str(ROBUST)]) if not info.name.startswith("_"))

# Functions whose first four or five parameters are all data (tensors of one computation).
ALL_DATA = {"clark_max_moments", "affine_moments", "conv2d_moments", "attack_certificates"}


def _tree(name: str) -> ast.Module:
    return ast.parse((ROBUST / f"{name}.py").read_text(encoding="utf-8"))


def _project_imports(node: ast.AST) -> list[str]:
    found = []
    for child in ast.walk(node):
        if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("painwatch"):
            found.append(child.module)
        elif isinstance(child, ast.Import):
            found += [alias.name for alias in child.names if alias.name.startswith("painwatch")]
    return found


def test_robust_imports_only_itself_at_the_top_of_each_module_and_without_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        tree = _tree(name)
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        imported = [module for node in top_level for module in _project_imports(node)]
        assert all(module.startswith("painwatch.robust.") for module in imported), (name, imported)
        assert len(_project_imports(tree)) == len(imported), f"{name} imports painwatch inside a function"
        graph[name] = {module.removeprefix("painwatch.robust.") for module in imported}

    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, f"import cycle: {' -> '.join([*visiting, name])}"
        if name in done:
            return
        visiting.append(name)
        for target in graph[name]:
            visit(target)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)
    assert graph["certificate"] == {"validation"}  # the registry knows no method module


@pytest.mark.parametrize("name", [*MODULES, "__init__"])
def test_every_robust_module_stays_under_600_lines(name: str) -> None:
    lines = (ROBUST / f"{name}.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 600, f"painwatch/robust/{name}.py has {lines} lines"


@pytest.mark.parametrize("name", MODULES)
def test_docstrings_cite_works_and_sections_not_internal_names(name: str) -> None:
    text = (ROBUST / f"{name}.py").read_text(encoding="utf-8")
    for banned in ("DESIGN", "the thesis", "thesis Ch", "issue "):
        assert banned not in text, f"painwatch/robust/{name}.py mentions {banned!r}"


def _public_callables():
    for name in MODULES:
        module = importlib.import_module(f"painwatch.robust.{name}")
        for attribute, value in vars(module).items():
            if attribute.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                yield f"{name}.{attribute}", attribute, value
            elif inspect.isclass(value) and value is not robust.Certificate:  # a record of its fields
                for method_name, method in vars(value).items():
                    public = method_name == "__init__" or not method_name.startswith("_")
                    if inspect.isfunction(method) and public:
                        yield f"{name}.{attribute}.{method_name}", attribute, method


def test_public_functions_take_settings_keyword_only() -> None:
    offenders, checked = [], 0
    for qualified, short, function in _public_callables():
        checked += 1
        signature = inspect.signature(function)
        parameters = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(parameters) > 3 and len(positional) > 3 and short not in ALL_DATA:
            offenders.append(f"{qualified}({', '.join(positional)})")
    assert not offenders, f"more than three positional parameters: {offenders}"
    assert checked > 40  # the walk did see the public API


def test_a_lipschitz_constant_cannot_be_passed_by_position() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(1, 2, 2)
    with pytest.raises(TypeError):
        robust.smoothed_margin_certify(model, x, 0.25, 100, 1000)  # type: ignore[misc]
    with pytest.raises(TypeError):
        robust.noisy_logits(model, x, 0.25, 10)  # type: ignore[misc]
    with pytest.raises(TypeError):
        robust.SmoothedClassifier(model, 2, 0.25).certify(x, 10, 100, 0.01)  # type: ignore[misc]
    with pytest.raises(TypeError):
        robust.sequential_certify(model, x, 0.25)  # type: ignore[misc]
    with pytest.raises(TypeError):
        robust.smoothed_robustness(1.0, 1.0, 0.1, 0.1)  # type: ignore[misc]


def test_package_keeps_every_public_name() -> None:
    kept = {
        "ABSTAIN", "CONCENTRATION_BOUNDS", "FLOAT_SAFETY", "LOSS_NAMES", "METHODS", "SCORE_KINDS",
        "SEQUENTIAL_BOUNDS", "SEQUENTIAL_METHODS", "SURROGATE_KINDS", "BettingLowerBound", "Certificate",
        "CertificateAttackReport", "GroupSort", "InvertibleDownsampling", "MCExpectedMarginLoss",
        "MarginCertifiedRadiusLoss", "MarginSmoothedCertifiedRadiusLoss", "MaxMin", "Model", "MomentRule",
        "MonteCarloSurrogate", "MulticlassHingeLoss", "OrthogonalConv2d", "OrthogonalLinear",
        "SequentialCertificate", "SmoothedClassifier", "SmoothedCrossEntropyLoss", "SoftmaxCrossEntropyLoss",
        "UnsupportedLayerError", "ZhenLoss", "attack_certificates", "best_attainable_lower_bound",
        "bjorck_orthonormalize", "check_alpha", "check_batch", "check_count", "check_generator",
        "check_image",
        "check_lipschitz_constant", "check_logits", "check_model", "check_num_classes", "check_same_device",
        "check_sigma", "clark_max_moments", "clopper_pearson_lower", "conv_operator_norm_bound",
        "empirical_bernstein_radius", "evaluation_mode", "expected_logits", "expected_margin",
        "expected_softmax", "export_plain", "gaussian_logit_moments", "hoeffding_radius",
        "incorrect_max_moments", "lipschitz_certify", "lipschitz_certify_batch", "lipschitz_lower_estimate",
        "lipschitz_upper_bound", "logit_margin", "make_loss", "margin_for_class", "mc_expected_margin_loss",
        "mcr_loss", "mean_confidence_bounds", "monte_carlo_smoothed_classifier", "mscr_loss",
        "multiclass_hinge_loss", "network_classifier", "noisy_logits", "pgd_l2", "propagate_moments",
        "register_moment_rule", "relu_moments", "sc_sce_loss", "sce_loss", "sequential_certify",
        "smoothed_margin_certify", "smoothed_margin_slack", "smoothed_robustness", "soft_smoothing_certify",
        "true_class_margin", "zhen_loss",
        # added with the registry and the evaluation module
        "BASE_METHODS", "CertificationOutcome", "MethodSpec", "certify", "method_spec", "register_method",
        "certified_accuracy_at", "certified_accuracy_curve", "certified_accuracy_interval",
    }
    missing = sorted(kept - set(robust.__all__))
    assert not missing, f"painwatch.robust no longer exports {missing}"
    assert all(hasattr(robust, name) for name in robust.__all__)
