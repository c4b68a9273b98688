"""The page in a real browser: ``streamlit run app.py`` on a free localhost port, driven by Playwright
in Debian's chromium. Uploads real frames (and one broken file) through the page, waits for the
results, reads the table, downloads the CSV and saves a screenshot under tests/_artifacts/.

Skips, saying why, when chromium is not installed (``make test`` installs it as root).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import harness
import numpy as np
import pytest
from PIL import Image

from painwatch import app as support

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        harness.chromium_path() is None,
        reason="Debian's chromium is not installed (apt-get install -y chromium; make test does it as root)",
    ),
]

ARTIFACTS = Path(__file__).resolve().parent / "_artifacts"
FRAME_NAMES = ("monkey_01.png", "monkey_02.jpg")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Path:
    """A real bundle: tiny timm backbone at 32 px and the smallest sample budget its bounds allow."""
    folder = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    return bundle_factory(folder, certification={"n0": 16, "n": 100, "alpha": 0.01, "batch_size": 50})


@pytest.fixture(scope="module")
def upload_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    paths = []
    for name in FRAME_NAMES:
        picture = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(picture).save(folder / name)
        paths.append(folder / name)
    broken = folder / "broken.png"
    broken.write_bytes(b"not really a png")
    paths.append(broken)
    return paths


@pytest.fixture(scope="module")
def running_app(tiny_bundle: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # One torch thread: a tiny model runs fastest that way on a shared CPU.
    log = ARTIFACTS / "streamlit-server.log"
    with harness.serve_app(tiny_bundle, log, extra_env={"OMP_NUM_THREADS": "1"}) as app:
        yield app
    # serve_app stops the server process group on exit, also when a test failed.


def test_upload_table_download_in_chromium(running_app, upload_files: list[Path]) -> None:
    with harness.open_browser() as page:
        harness.wait_for_page(page, running_app.url)
        harness.upload_files(page, upload_files)
        harness.wait_for_results(page)

        # The bad file is named in a message; the good ones went through.
        page.get_by_text("broken.png").first.wait_for(state="visible", timeout=10_000)
        assert page.get_by_text("could not be used").count() >= 1

        # The results grid exposes its cells to assistive technology: read them.
        grid = page.locator('[data-testid="stDataFrame"]').first
        page.wait_for_function(
            "names => names.every(n => [...document.querySelectorAll('[data-testid=stDataFrame] td')]"
            ".some(td => td.innerText.trim() === n))",
            arg=list(FRAME_NAMES),
            timeout=20_000,
        )
        cells = [text.strip() for text in grid.locator("td").all_inner_texts()]
        for name in FRAME_NAMES:
            assert name in cells
        assert any(text in {"pain", "no_pain", "abstain"} for text in cells)

        saved = harness.download(page, "Download CSV", ARTIFACTS / "browser-results.csv")
        rows = list(csv.DictReader(io.StringIO(saved.read_text(encoding="utf-8"))))
        assert rows, "the downloaded CSV has no rows"
        assert list(rows[0]) == support.csv_columns(("no_pain", "pain"))
        assert [row["frame"] for row in rows] == list(FRAME_NAMES)
        for row in rows:
            assert row["label"] in {"pain", "no_pain", "abstain"}
            assert float(row["radius_l2"]) >= 0.0
            assert int(row["n"]) == 100 and float(row["sigma"]) == 0.25
            assert len(row["bundle_weights_sha256"]) == 64

        page.screenshot(path=str(ARTIFACTS / "browser-page.png"), full_page=True)
    assert running_app.process.poll() is None, f"the server died during the test:\n{running_app.log_tail()}"
