"""Make docs/screenshot.png: the page with the demo bundle, after uploading face crops of a few demo frames.

    .venv/bin/python scripts/screenshot.py [--bundle data/demo-bundle] [--data data/demo]
                                           [--out docs/screenshot.png]

Needs the demo bundle and demo data (`make demo` builds both) and Debian's chromium
(`apt-get install -y chromium`). Starts the page on a free localhost port, uploads face crops of
frames of both classes of a held-out individual of the demo set, waits for the results and saves a
screenshot; the server is always stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The browser harness is test tooling (tests/harness.py); the screenshot drives the page the same way.
sys.path.insert(0, str(REPO_ROOT / "tests"))

import harness  # noqa: E402


def pick_frames(data: Path, per_class: int, prefer: list[str]) -> list:
    """``per_class`` records of each label from one individual, in manifest order.

    Individuals in ``prefer`` (the bundle's held-out individuals) come first, so the page shows
    frames the demo model never trained on.
    """
    from painwatch.data import load_records

    records = load_records(data)
    individuals = sorted({r.individual for r in records})
    ordered = [i for i in prefer if i in individuals] + [i for i in reversed(individuals) if i not in prefer]
    for individual in ordered:
        mine = [r for r in records if r.individual == individual and r.video is None]
        picks = [r for r in mine if r.label == 1][:per_class] + [r for r in mine if r.label == 0][:per_class]
        if len(picks) == 2 * per_class:
            return picks
    raise SystemExit(f"{data}: no individual has {per_class} still frames of each class")


def write_face_crops(records: list, folder: Path) -> list[Path]:
    """The face crops of ``records`` (the manifest's boxes) as JPEG files, named after their frames.

    The demo model, like the published one, was trained on face crops, so the page is shown what a
    veterinarian's face-cropped frames would look like.
    """
    from PIL import Image

    from painwatch.data import load_frame

    paths = []
    for record in records:
        path = folder / f"{record.individual}_{Path(record.path).stem}_face.jpg"
        Image.fromarray(load_frame(record)).save(path, quality=95)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "data" / "demo-bundle")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "demo")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "screenshot.png")
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the results")
    args = parser.parse_args(argv)

    from painwatch import app as support

    problem = support.bundle_problem(args.bundle)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    if harness.chromium_path() is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 1
    from painwatch.models import read_metadata

    verdict = read_metadata(args.bundle).latest_gate
    held_out = verdict.details.get("individuals", []) if verdict is not None else []
    records = pick_frames(args.data, args.per_class, list(held_out))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="painwatch-shot-") as scratch:
        frames = write_face_crops(records, Path(scratch))
        log = Path(scratch) / "server.log"
        with harness.serve_app(args.bundle, log) as app, \
                harness.open_browser(viewport=(args.width, args.height)) as page:
            harness.wait_for_page(page, app.url)
            harness.upload_files(page, frames)
            try:
                harness.wait_for_results(page, timeout_ms=args.timeout * 1000)
                page.get_by_text("where it looked").first.wait_for(state="visible", timeout=300_000)
            except Exception:
                print(f"the page did not finish; server log:\n{app.log_tail()}", file=sys.stderr)
                raise
            page.wait_for_timeout(1500)  # let charts and the grid finish drawing
            args.out.parent.mkdir(parents=True, exist_ok=True)
            temporary = args.out.with_name(f".{args.out.name}.tmp.png")
            page.screenshot(path=str(temporary), full_page=True)
            os.replace(temporary, args.out)
    print(f"wrote {args.out} ({len(frames)} frames uploaded from {args.data})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
