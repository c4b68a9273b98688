"""The model card: what a bundle is for, what it was trained on, how its answers are certified, how it
refuses frames unlike its training frames, its gate verdicts and its limits, as a dict (for reports and
downloads) and as Markdown (for the page)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from painwatch.inference.settings import PredictorSettings
from painwatch.models import BundleMetadata

INTENDED_USE = (
    "Supports, and never replaces, a veterinarian's judgement of pain in Japanese macaques "
    "(Macaca fuscata) from facial frames. A certified radius is a statement about pixel noise of a "
    "given L2 size only, not about other changes of the image (pose, lighting, another animal)."
)

KNOWN_LIMITS: tuple[str, ...] = (
    "Single frames only: no temporal context, no behaviour, no body posture.",
    "Trained on a small number of individuals; individuals unlike them may be classified worse.",
    "Face crops matter: the published study found contour crops without background did better "
    "(64% vs 48-54% accuracy).",
    "Certificates are probabilistic (error probability alpha per frame) and hold for the smoothed "
    "classifier the app reports, at the model's input resolution.",
)

DETERMINISTIC_LIMIT = (
    "Certificates are exact for the network itself (no sampling, no error probability), at the model's "
    "input resolution; a Lipschitz network gives up some accuracy for them."
)
"""Replaces the last of :data:`KNOWN_LIMITS` when the answers are certified by the Lipschitz margin."""

SYNTHETIC_WARNING = (
    "This model was trained on SYNTHETIC frames drawn by a program (the demo set), not on photographs "
    "of macaques: its answers say nothing about real animals."
)


BF16_AGREEMENT = (
    "bfloat16 (8-bit mantissa, float32 range) was measured against float32 with "
    "scripts/bench_latency.py (results/latency/bench.json): on the {demo_frames} face crops of the demo "
    "set's held-out individuals the demo model's bf16 class differed from its fp32 class on {demo_differ} "
    "(largest confidence gap {demo_gap:.2g}), and a random-init ResNet50 at 224 px differed on "
    "{random_differ} of {random_frames} random inputs. The certificate is about the network that answers: "
    "its noise draws go through the same engine and precision."
)
"""How often the low-precision network's class differs from float32's, as measured (the figures of
:data:`BF16_MEASURED`)."""

BF16_MEASURED: Mapping[str, float] = {"demo_frames": 200, "demo_differ": 0, "demo_gap": 0.0064,
                                      "random_frames": 64, "random_differ": 0}
"""The measurement of ``results/latency/bench.json`` (``bf16_disagreement``)."""

REFUSAL_AGREEMENT = (
    "The in-distribution check reads its descriptors in the answer's own pass of the engine (one pass, "
    "about the network that answers), while its threshold was set on float32 descriptors. Measured with "
    "scripts/bench_latency.py (results/latency/bench.json, bf16_disagreement.refusal): on the demo "
    "model's {frames} pictures ({face_crops} held-out face crops and {others} pictures that are not face "
    "crops: photos, human faces, noise, blank and whole uncropped frames), the bf16 engine's refusal "
    "differed from the float32 refusal on {differ} (largest score gap {gap:.2g}; the nearest float32 "
    "score lay {nearest:.2g} from the threshold {threshold:.4g}, within that gap, and kept its side). The "
    "threshold's guarantee is about float32 scores: a frame whose score is that close to the threshold "
    "can be decided the other way in bf16."
)
"""How often the refusal from the low-precision engine's descriptors differs from float32's, as
measured (the figures of :data:`REFUSAL_MEASURED`)."""

REFUSAL_MEASURED: Mapping[str, float] = {"frames": 834, "face_crops": 200, "others": 634, "differ": 0,
                                         "gap": 0.066, "nearest": 0.010, "threshold": 2.004}
"""The measurement of ``results/latency/bench.json`` (``bf16_disagreement.refusal``)."""


def model_card_dict(
    metadata: BundleMetadata,
    settings: PredictorSettings | None = None,
    engine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A model card from a bundle's metadata (and the settings in force and the engine that answers,
    when given: :meth:`painwatch.inference.engine.Engine.describe`)."""
    training = dict(metadata.training)
    individuals = training.get("individuals") or []
    certification = settings.to_dict() if settings is not None else metadata.certification.to_dict()
    deterministic = certification.get("method") == "lipschitz"
    if metadata.certification.lipschitz_constant is not None:
        certification["lipschitz_constant"] = metadata.certification.lipschitz_constant
    limits = [*KNOWN_LIMITS[:-1], DETERMINISTIC_LIMIT if deterministic else KNOWN_LIMITS[-1]]
    return {
        "intended_use": INTENDED_USE,
        "model": {
            "architecture": metadata.architecture,
            "classes": list(metadata.classes),
            "input_size": metadata.input_size,
            "weights_sha256": metadata.weights_sha256,
        },
        "training_data": {
            "individuals": list(individuals),
            "num_individuals": len(individuals),
            "num_frames": training.get("num_frames"),
            "data_hash": training.get("data_hash"),
            "loss": training.get("loss"),
            "noise_sigma": training.get("noise_sigma"),
            "epochs": training.get("epochs"),
            "synthetic": metadata.synthetic,
        },
        "calibration": {"temperature": metadata.temperature},
        "certification": certification,
        "in_distribution": (metadata.in_distribution.to_dict() if metadata.in_distribution is not None
                            else {"note": metadata.in_distribution_note}),
        "gates": {name: verdict.to_dict() for name, verdict in metadata.gates.items()},
        "engine": {**dict(engine or {}), "bf16_agreement": BF16_AGREEMENT.format(**BF16_MEASURED),
                   "bf16_refusal_agreement": REFUSAL_AGREEMENT.format(**REFUSAL_MEASURED)},
        "limits": limits,
    }


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """Render :func:`model_card_dict` as Markdown."""
    model, data, cert = card["model"], card["training_data"], card["certification"]
    lines = []
    if data.get("synthetic"):
        lines += [f"**{SYNTHETIC_WARNING}**", ""]
    lines += [
        "**Intended use.** " + card["intended_use"],
        "",
        f"**Model.** `{model['architecture']}`, input {model['input_size']} x {model['input_size']} pixels, "
        f"classes {', '.join(model['classes'])}; weights SHA-256 `{str(model['weights_sha256'])[:16]}...`.",
        "",
        f"**Training data.** {data['num_individuals']} individuals"
        + (f" ({', '.join(data['individuals'][:12])}{', ...' if data['num_individuals'] > 12 else ''})"
           if data["individuals"] else "")
        + f", {data['num_frames'] if data['num_frames'] is not None else 'unknown number of'} frames"
        + (" (SYNTHETIC demo data)" if data.get("synthetic") else "")
        + f"; loss {data['loss']}, training noise sigma {data['noise_sigma']}, {data['epochs']} epochs; "
        f"data hash `{str(data['data_hash'])[:16]}...`.",
        "",
        f"**Calibration.** Temperature {card['calibration']['temperature']}.",
        "",
        _certification_line(cert),
        "",
    ]
    check = card.get("in_distribution") or {}
    if check.get("threshold") is not None:
        layers = ", ".join(check.get("layers") or [])
        lines += [f"**In-distribution check.** {check.get('score')} on {layers}; "
                  f"frames scoring above {check['threshold']:.4g} are refused. {check.get('guarantee')}", ""]
    else:
        lines += [f"**In-distribution check.** None: {check.get('note') or 'not recorded'}. This model "
                  "answers every picture, including pictures that are not macaque face crops.", ""]
    engine = card.get("engine") or {}
    if engine.get("runtime"):
        lines += [f"**Engine.** Answers and noise draws computed by {engine['runtime']} at "
                  f"{engine.get('precision')} on {engine.get('device')}. {engine['bf16_agreement']} "
                  f"{engine.get('bf16_refusal_agreement', '')}".rstrip(), ""]
    gates = card.get("gates") or {}
    if not gates:
        lines.append("**Certification gate.** Not run.")
    for name, gate in gates.items():
        verdict = "PASSED" if gate.get("passed") else "FAILED"
        lines.append(f"**Certification gate `{name}`.** {verdict} on {gate.get('date') or '?'}.")
        for check in gate.get("results") or []:
            mark = "pass" if check.get("passed") else "FAIL"
            lines.append(f"- {check.get('name')}: {check.get('value')} "
                         f"(threshold {check.get('threshold')}) {mark}")
        lines.append("")
    lines += ["", "**Limits.**"] + [f"- {limit}" for limit in card["limits"]]
    return "\n".join(lines)


def _certification_line(cert: Mapping[str, Any]) -> str:
    if cert.get("method") == "lipschitz":
        bound = cert.get("lipschitz_constant")
        return ("**Certification.** lipschitz: the network's own answer, exact (no noise, no error "
                "probability), from one forward pass per frame"
                + (f"; sound Lipschitz bound L = {bound:.4g} recorded at training" if bound else "") + ".")
    return (f"**Certification.** {cert.get('method')}"
            + (" (sequential, stops early)" if cert.get("sequential") else "")
            + f", sigma {cert.get('sigma')}, alpha {cert.get('alpha')}, n {cert.get('n')}.")
