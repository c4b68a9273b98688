"""The records on the page (AppTest): two checks of one animal, saved from two page sessions, show as its
history; a new animal is created only on confirmation; served beyond 127.0.0.1 the page shows nothing
without an account and a password; a database that cannot be used is named and left alone."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit import config as streamlit_config
from streamlit.testing.v1 import AppTest

from painwatch.app import BUNDLE_ENV, widgets
from painwatch.records.database import open_database
from painwatch.records.service import animal_checks, check_frames
from painwatch.records.users import add_account

REPO_ROOT = Path(__file__).resolve().parent.parent
APP = REPO_ROOT / "app.py"
TIMEOUT_S = 120
PASSWORD = "a long enough password"


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 10, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Path:
    folder = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    return bundle_factory(folder, certification={"n0": 16, "n": 100, "alpha": 0.01, "batch_size": 50})


@pytest.fixture
def records_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_bundle: Path) -> Path:
    """The page's environment: the tiny bundle, a fresh records database and accounts file in tmp_path."""
    monkeypatch.setenv(BUNDLE_ENV, str(tiny_bundle))
    monkeypatch.setenv("PAINWATCH_DATABASE", f"sqlite:///{tmp_path / 'records.db'}")
    monkeypatch.setenv("PAINWATCH_ACCOUNTS", str(tmp_path / "accounts.json"))
    for name in ("PAINWATCH_FRAMES", "PAINWATCH_SIGN_IN", "PAINWATCH_THUMBNAIL_SIDE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def served_to_the_network():
    """Streamlit's server.address as `--server.address 0.0.0.0` sets it, for the length of a test."""
    before = streamlit_config.get_option("server.address")
    streamlit_config.set_option("server.address", "0.0.0.0")
    yield
    streamlit_config.set_option("server.address", before)


def _run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _session() -> AppTest:
    return _run(AppTest.from_file(str(APP), default_timeout=TIMEOUT_S))


def _analyse_and_save(at: AppTest, uploads: list[tuple[str, bytes]], animal: str, *, new: bool,
                      notes: str = "") -> None:
    for name, data in uploads:
        at.file_uploader[0].upload(name, data, "image/png")
    _run(at)
    assert any("frames analysed" in m.value for m in at.markdown)
    if new:
        at.selectbox(key="record_animal").set_value(widgets.NEW_ANIMAL)
        _run(at)
        at.text_input(key="record_new_animal").set_value(animal)
        _run(at)
        assert at.button(key="record_save").disabled  # not before the new animal is confirmed
        at.checkbox(key="record_confirm_new").check()
    else:
        assert animal in at.selectbox(key="record_animal").options
        at.selectbox(key="record_animal").set_value(animal)
    at.text_area(key="record_notes").set_value(notes)
    _run(at)
    at.button(key="record_save").click()
    _run(at)
    assert any(f"Saved as a check of **{animal}**" in s.value for s in at.success)


def test_two_checks_of_one_animal_show_as_its_history(records_env: Path) -> None:
    first = _session()
    assert "no sign-in needed" in " ".join(c.value for c in first.sidebar.caption)
    _analyse_and_save(first, [("day0_a.png", _png(1)), ("day0_b.png", _png(2))], "Hana-03", new=True,
                      notes="day 0, before surgery")
    # Another page session, another day's frames; the animal is now known and picked from the list.
    second = _session()
    _analyse_and_save(second, [("day1_a.png", _png(3)), ("day1_b.png", _png(4)), ("day1_c.png", _png(5))],
                      "Hana-03", new=False, notes="day 1 after laparotomy, before analgesia")

    database = open_database(f"sqlite:///{records_env / 'records.db'}")
    checks = animal_checks(database, "Hana-03")
    assert [c.frames for c in checks] == [2, 3] and checks[1].notes.startswith("day 1")
    assert [c.recorded_by for c in checks] == [None, None]  # served locally: nobody signed in
    page_results = second.session_state["batch"].results
    stored = check_frames(database, checks[1].check_id)
    assert [r.result.radius for r in stored] == [r.radius for r in page_results]
    assert [r.result.noise_seed for r in stored] == [r.noise_seed for r in page_results]

    second.switch_page(widgets.ANIMAL_PAGE)
    _run(second)
    assert second.selectbox(key="animal_choice").value == "Hana-03"  # opened on the animal just saved
    # The animal page's gate lets the viewer the check page's gate let in through without asking again.
    captions = [c.value for c in second.sidebar.caption]
    assert captions.count("Served on this machine only: no sign-in needed.") == 1
    history = second.dataframe[0].value
    assert len(history) == 2 and list(history["frames"]) == [2, 3]
    assert list(history["notes"]) == ["day 0, before surgery", "day 1 after laparotomy, before analgesia"]
    assert len(second.get("vega_lite_chart")) == 1  # the time course
    latest = " ".join(m.value for m in second.markdown)
    assert "answered frame(s)" in latest and "before analgesia" in latest
    labels = [b.label for b in second.download_button]
    assert labels == ["Print the record (PDF)", "History (CSV)", "History (JSON)"]

    second.toggle(key="show_frames").set_value(True)
    _run(second)
    frames = second.dataframe[1].value
    assert list(frames["frame"]) == ["day1_a.png", "day1_b.png", "day1_c.png"]  # the latest check first
    assert len(second.image) >= 1
    assert "Print this check (PDF)" in [b.label for b in second.download_button]


def test_a_new_animal_needs_confirmation_and_an_id_that_can_be_one(records_env: Path) -> None:
    at = _session()
    at.file_uploader[0].upload("a.png", _png(7), "image/png")
    _run(at)
    at.selectbox(key="record_animal").set_value(widgets.NEW_ANIMAL)
    _run(at)
    at.text_input(key="record_new_animal").set_value("-bad id;")
    _run(at)
    assert any("may hold only letters" in e.value for e in at.error)
    assert at.button(key="record_save").disabled
    at.text_input(key="record_new_animal").set_value("M-20")
    _run(at)
    assert any("Create the new animal **M-20**" in c.label for c in at.checkbox)
    assert at.button(key="record_save").disabled  # not confirmed: it cannot be saved
    database = open_database(f"sqlite:///{records_env / 'records.db'}")
    with pytest.raises(Exception, match="not a known animal"):
        animal_checks(database, "M-20")


def test_served_to_the_network_nobody_without_an_account_gets_in(records_env: Path,
                                                                 served_to_the_network) -> None:
    at = _session()
    assert any("No account exists yet" in e.value for e in at.error)
    assert len(at.file_uploader) == 0 and len(at.text_input) == 0  # no page, not even a sign-in form
    # The animal page is behind the same gate, also when its script is run on its own.
    animal_page = AppTest.from_file(str(REPO_ROOT / widgets.ANIMAL_PAGE), default_timeout=TIMEOUT_S)
    _run(animal_page)
    assert any("No account exists yet" in e.value for e in animal_page.error)
    assert len(animal_page.dataframe) == 0


def test_served_to_the_network_a_vet_signs_in_and_the_check_says_who(records_env: Path,
                                                                     served_to_the_network) -> None:
    add_account(records_env / "accounts.json", "vet1", PASSWORD)
    at = _session()
    assert len(at.file_uploader) == 0
    at.text_input(key="sign_in_name").set_value("vet1")
    at.text_input(key="sign_in_password").set_value("not the password")
    at.button(key="sign_in_submit").click()
    _run(at)
    assert any("user name or the password is wrong" in e.value for e in at.error)
    assert len(at.file_uploader) == 0
    time.sleep(1.1)  # the wait after one failure
    at.text_input(key="sign_in_name").set_value("vet1")
    at.text_input(key="sign_in_password").set_value(PASSWORD)
    at.button(key="sign_in_submit").click()
    _run(at)
    assert len(at.file_uploader) == 1
    assert any("Signed in as **vet1**" in m.value for m in at.sidebar.markdown)
    _analyse_and_save(at, [("x.png", _png(9))], "M-30", new=True)
    database = open_database(f"sqlite:///{records_env / 'records.db'}")
    assert [c.recorded_by for c in animal_checks(database, "M-30")] == ["vet1"]
    at.button(key="sign_out").click()
    _run(at)

    assert len(at.file_uploader) == 0 and any(t.label == "Password" for t in at.text_input)


def test_a_database_that_cannot_be_used_is_named_and_left_alone(records_env: Path) -> None:
    broken = records_env / "records.db"
    broken.write_bytes(b"this is not a database")
    at = _session()
    at.file_uploader[0].upload("a.png", _png(11), "image/png")
    _run(at)
    assert any("frames analysed" in m.value for m in at.markdown)  # the analysis still works
    assert any("Checks cannot be saved" in w.value and "not an SQLite database" in w.value
               for w in at.warning)
    assert broken.read_bytes() == b"this is not a database"
