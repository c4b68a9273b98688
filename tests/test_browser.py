"""The page in a real browser: ``streamlit run app.py`` on a free localhost port, driven by Playwright
in Debian's chromium. Uploads real frames (and one broken file) through the page, waits for the
results, reads the table, downloads the CSV and saves a screenshot under tests/_artifacts/; then saves
two checks of one animal, opens the animal page, reads its history and downloads its printed record;
and, served on every address, shows nothing without an account and lets a vet in once one is made.

Skips, saying why, when chromium is not installed (``make test`` installs it as root).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import harness
import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader

from painwatch import app as support
from painwatch.app import widgets

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        harness.chromium_path() is None,
        reason="Debian's chromium is not installed (apt-get install -y chromium; make test does it as root)",
    ),
]

ARTIFACTS = Path(__file__).resolve().parent / "_artifacts"
FRAME_NAMES = ("monkey_01.png", "monkey_02.jpg")
PASSWORD = "a long enough password"


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
def records_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the served page keeps its records database and accounts (never the repository's data/)."""
    return tmp_path_factory.mktemp("records")


@pytest.fixture(scope="module")
def running_app(tiny_bundle: Path, records_folder: Path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # One torch thread: a tiny model runs fastest that way on a shared CPU.
    log = ARTIFACTS / "streamlit-server.log"
    environment = {"OMP_NUM_THREADS": "1", "PAINWATCH_DATABASE": f"sqlite:///{records_folder / 'records.db'}",
                   "PAINWATCH_ACCOUNTS": str(records_folder / "accounts.json")}
    with harness.serve_app(tiny_bundle, log, extra_env=environment) as app:
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
        # Read them in the same look that finds them: the page redraws the grid while it polls.
        cells = page.wait_for_function(
            "names => { const cells = [...document.querySelectorAll('[data-testid=stDataFrame] td')]"
            ".map(td => td.innerText.trim()); return names.every(n => cells.includes(n)) ? cells : null; }",
            arg=list(FRAME_NAMES),
            timeout=20_000,
        ).json_value()
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


def _save_check(page, frames: list[Path], animal: str, notes: str, *, new: bool) -> None:
    """Analyse ``frames`` and save them as a check of ``animal`` (typed and confirmed when ``new``)."""
    harness.upload_files(page, frames)
    harness.wait_for_results(page)
    section = page.get_by_text("Save this check").first
    section.wait_for(state="visible", timeout=30_000)
    harness.choose_option(page, "Animal", widgets.NEW_ANIMAL if new else animal)
    if new:
        harness.type_text(page, "ID of the new animal", animal)
        save = page.get_by_role("button", name="Save this check")
        page.get_by_text(f"Create the new animal {animal}").wait_for(state="visible", timeout=20_000)
        assert save.is_disabled()  # not before the new animal is confirmed
        page.get_by_text(f"Create the new animal {animal}").click()
    harness.type_text(page, "Notes (optional)", notes)
    page.get_by_role("button", name="Save this check").wait_for(state="visible")
    page.wait_for_function(
        "() => [...document.querySelectorAll('button')].some(b => b.innerText.includes('Save this check')"
        " && !b.disabled)", timeout=20_000)
    harness.wait_until_idle(page)
    page.get_by_role("button", name="Save this check").click()
    page.get_by_text(f"Saved as a check of {animal}").first.wait_for(state="visible", timeout=30_000)


def test_two_checks_of_an_animal_its_history_and_its_printed_record(running_app, upload_files: list[Path],
                                                                       records_folder: Path) -> None:
    animal = "Hana-07"
    good = [path for path in upload_files if path.name != "broken.png"]
    with harness.open_browser() as page:
        harness.wait_for_page(page, running_app.url)
        _save_check(page, good, animal, "day 0, before surgery", new=True)
        # The next day's check, in a new page session: the animal is now picked from the known ones.
        harness.wait_for_page(page, running_app.url)
        _save_check(page, good[:1], animal, "day 1 after laparotomy, before analgesia", new=False)

        page.get_by_role("link", name=f"Open the record of {animal}").click()
        page.get_by_text("Checks over time").first.wait_for(state="visible", timeout=60_000)
        # The grid gives its cells to assistive technology only while it is in view, and the chart
        # above it may still push it down: bring it into view on every look.
        page.wait_for_function(
            "notes => { const grid = document.querySelector('[data-testid=stDataFrame]');"
            " if (grid) grid.scrollIntoView({block: 'center'});"
            " return notes.every(n => [...document.querySelectorAll('[data-testid=stDataFrame] td')]"
            ".some(td => td.innerText.trim() === n)); }",
            arg=["day 0, before surgery", "day 1 after laparotomy, before analgesia"],
            timeout=30_000,
        )
        assert page.get_by_text("Latest verdict").count() >= 1

        saved = harness.download(page, "Print the record (PDF)", ARTIFACTS / "browser-record.pdf")
        data = saved.read_bytes()
        assert data.startswith(b"%PDF-")
        text = " ".join(" ".join(p.extract_text().split()) for p in PdfReader(io.BytesIO(data)).pages)
        assert f"painwatch: pain checks of {animal}" in text and "2 check(s)" in text
        assert "before analgesia" in text and all(path.name in text for path in good)
        harness.wait_until_idle(page)
        page.locator('[data-testid="stVegaLiteChart"]').first.scroll_into_view_if_needed(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "browser-animal-page.png"), full_page=True)
    assert running_app.process.poll() is None, f"the server died during the test:\n{running_app.log_tail()}"
    assert (records_folder / "records.db").is_file()


def test_served_to_the_network_nobody_gets_in_without_an_account(tiny_bundle: Path,
                                                                 tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.json"
    environment = {"OMP_NUM_THREADS": "1", "PAINWATCH_DATABASE": f"sqlite:///{tmp_path / 'records.db'}",
                   "PAINWATCH_ACCOUNTS": str(accounts)}
    port = harness.free_port("0.0.0.0")
    dropzone = '[data-testid="stFileUploaderDropzone"]'
    with harness.serve_app(tiny_bundle, ARTIFACTS / "streamlit-network.log", host="0.0.0.0", port=port,
                           extra_env=environment) as app, harness.open_browser() as page:
        local = f"http://127.0.0.1:{port}"  # the server listens on every address; the browser uses this one
        page.goto(local, wait_until="domcontentloaded")
        page.get_by_text("No account exists yet").first.wait_for(state="visible", timeout=60_000)
        assert page.locator(dropzone).count() == 0 and page.get_by_text("Save this check").count() == 0

        made = subprocess.run([sys.executable, "-m", "painwatch", "users", "add", "vet1", "--password-stdin",
                               "--accounts", str(accounts)], input=f"{PASSWORD}\n", text=True,
                              capture_output=True, cwd=harness.REPO_ROOT, timeout=60)
        assert made.returncode == 0, made.stderr
        assert PASSWORD not in accounts.read_text()

        page.goto(local, wait_until="domcontentloaded")
        harness.sign_in(page, "vet1", "not the password")
        page.get_by_text("user name or the password is wrong").first.wait_for(state="visible", timeout=30_000)
        assert page.locator(dropzone).count() == 0
        page.wait_for_timeout(1_200)  # the wait after one failed attempt
        harness.sign_in(page, "vet1", PASSWORD)
        page.locator(dropzone).first.wait_for(state="visible", timeout=60_000)
        assert page.get_by_text("Signed in as").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "browser-signed-in.png"), full_page=True)
        assert app.process.poll() is None, f"the server died during the test:\n{app.log_tail()}"


@pytest.fixture(scope="module")
def slow_app(tmp_path_factory: pytest.TempPathFactory, bundle_factory):
    """The page with a bundle whose default budget takes seconds to certify even for the tiny network."""
    folder = bundle_factory(tmp_path_factory.mktemp("slow") / "slow-bundle",
                            certification={"n0": 16, "n": 20_000, "alpha": 0.01, "batch_size": 50})
    with harness.serve_app(folder, ARTIFACTS / "streamlit-server-slow.log",
                           extra_env={"OMP_NUM_THREADS": "1"}) as app:
        yield app


def test_answers_at_once_then_certificates_grow_in_chromium(slow_app, upload_files: list[Path]) -> None:
    with harness.open_browser() as page:
        harness.wait_for_page(page, slow_app.url)
        harness.upload_files(page, upload_files[:2])
        # The first answers and every row's progress, before any certificate.
        harness.wait_for_answers(page)
        page.get_by_text("Fixed-budget bound").first.wait_for(state="visible", timeout=10_000)
        grid = page.locator('[data-testid="stDataFrame"]').first
        grid.wait_for(state="visible", timeout=20_000)
        assert page.get_by_role("button", name="Download CSV").count() == 0
        page.screenshot(path=str(ARTIFACTS / "browser-answers.png"), full_page=True)
        # The page polls the worker by itself: the certificates and downloads arrive without a click.
        harness.wait_for_results(page)
        page.get_by_role("button", name="Download CSV").first.wait_for(state="visible", timeout=10_000)
    assert slow_app.process.poll() is None, f"the server died during the test:\n{slow_app.log_tail()}"
