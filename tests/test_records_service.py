"""The check service and the transfer of records: a check holds exactly what the Predictor answered, new
animals only on confirmation, thumbnails or none, the JSON export read back on another database, the
history CSV, and the command line's export, import, list and report."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader
from records_fixtures import StillFrame, fake_batch, fake_model

from painwatch.cli import main
from painwatch.records.database import RecordsError, open_database
from painwatch.records.service import (
    UnknownAnimalError,
    animal_checks,
    check_frames,
    known_animal,
    list_animals,
    normalize_animal_code,
    save_check,
)
from painwatch.records.settings import RecordsSettings
from painwatch.records.transfer import (
    HISTORY_CSV_COLUMNS,
    export_records,
    history_csv,
    import_file,
    import_records,
)


@pytest.fixture
def database(tmp_path: Path):
    database = open_database(f"sqlite:///{tmp_path / 'records.db'}")
    yield database
    database.close()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory, bundle_factory):
    from painwatch.inference import Predictor

    folder = tmp_path_factory.mktemp("bundle") / "tiny-bundle"
    bundle_factory(folder, certification={"n0": 16, "n": 100, "alpha": 0.01, "batch_size": 50})
    return Predictor.load(folder)  # no seed: every frame's noise seed from the OS, as deployed


def test_a_check_keeps_every_field_the_predictor_answered(database, predictor) -> None:
    rng = np.random.default_rng(3)
    frames = [StillFrame(f"f{i}.png", "visit.mp4" if i else "f0.png", 0.5 * i if i else None,
                         rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)) for i in range(3)]
    results = predictor.predict([f.image for f in frames], names=[f.name for f in frames])
    model = fake_model(gate_passed=True)
    saved = save_check(database, frames, results, model=model, animal="M01", create_animal=True,
                       notes="day 1 after laparotomy, before analgesia", recorded_by="vet1")
    assert saved.animal_created and saved.frames == 3
    (check,) = animal_checks(database, "M01")
    assert (check.notes, check.recorded_by, check.model.weights_sha256) == (
        "day 1 after laparotomy, before analgesia", "vet1", model.weights_sha256)
    assert check.model.model_card["gates"]["default.toml"]["passed"] is True
    stored = check_frames(database, check.check_id)
    assert [r.position for r in stored] == [0, 1, 2] and stored[1].source == "visit.mp4"
    for record, result, frame in zip(stored, results, frames, strict=True):
        expected = result if frame.time_s is None else \
            result.__class__(**{**result.__dict__, "time_s": frame.time_s})
        # Every field, floats to the last digit, the 63-bit noise seed and NaN bounds included.
        for name, value in expected.__dict__.items():
            got = getattr(record.result, name)
            assert got == value or (isinstance(value, float) and math.isnan(value) and math.isnan(got)), name
        assert isinstance(record.result.noise_seed, int)
        thumbnail = Image.open(io.BytesIO(record.thumbnail))
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 80  # no larger than the frame
    again = predictor.predict([f.image for f in frames], names=[f.name for f in frames],
                              noise_seeds=[r.result.noise_seed for r in stored])
    assert [r.radius for r in again] == [r.result.radius for r in stored]  # the record re-checks
    summary = check
    answered = [r for r in results if r.class_index >= 0]
    assert summary.frames == 3 and summary.abstained == 3 - len(answered)
    if answered:
        assert summary.mean_confidence == pytest.approx(np.mean([r.confidence for r in answered]))


def test_an_unknown_animal_is_created_only_on_confirmation(database) -> None:
    frames, results = fake_batch(2)
    with pytest.raises(UnknownAnimalError, match="'M-17' is not a known animal"):
        save_check(database, frames, results, model=fake_model(), animal="  M-17 ")
    assert list_animals(database) == []
    save_check(database, frames, results, model=fake_model(), animal="M-17", create_animal=True)
    # The same animal whatever the case and spacing it is typed with; no second animal appears.
    save_check(database, frames, results, model=fake_model(), animal="m-17")
    assert known_animal(database, "M-17") == "M-17" and known_animal(database, "m-17 ") == "M-17"
    assert [(a.code, a.checks) for a in list_animals(database)] == [("M-17", 2)]
    for bad, words in (("", "empty"), ("-M1", "only letters"), ("M1;DROP", "only letters"),
                       ("x" * 65, "at most 64")):
        with pytest.raises(RecordsError, match=words):
            normalize_animal_code(bad)
    assert normalize_animal_code("  Hana   03 ") == "Hana 03"
    with pytest.raises(ValueError, match="2 frames but 1 results"):
        save_check(database, frames, results[:1], model=fake_model(), animal="M-17")
    with pytest.raises(RecordsError, match="at most 4000"):
        save_check(database, frames, results, model=fake_model(), animal="M-17", notes="x" * 4001)


def test_counts_abstentions_and_a_clinic_that_keeps_no_frames(database) -> None:
    frames, results = fake_batch(5, pain=(0, 1, 2), abstain=(4,))
    save_check(database, frames, results, model=fake_model(), animal="M02", create_animal=True,
               settings=RecordsSettings(frames="none"))
    (check,) = animal_checks(database, "M02")
    assert (check.frames, check.pain, check.no_pain, check.abstained) == (5, 3, 1, 1)
    assert check.pain_share == pytest.approx(3 / 4)
    assert check.mean_confidence == pytest.approx(np.mean([r.confidence for r in results[:4]]))
    assert check.frames_kept == "none"
    assert all(record.thumbnail is None for record in check_frames(database, check.check_id))
    frames, results = fake_batch(2, abstain=(0, 1), seed=4)
    save_check(database, frames, results, model=fake_model(), animal="M02")
    assert animal_checks(database, "M02")[1].pain_share is None  # every frame refused: no share


def test_export_and_import_move_the_records_to_another_database(database, tmp_path: Path) -> None:
    for seed, animal in enumerate(("M01", "M01", "M02")):
        frames, results = fake_batch(3, seed=seed, pain=(seed,), abstain=(2,) if seed == 1 else ())
        save_check(database, frames, results, model=fake_model(gate_passed=seed != 2), animal=animal,
                   create_animal=True, notes=f"visit {seed} — σ ok", recorded_by="vet1")
    document = json.loads(json.dumps(export_records(database)))  # through JSON text, as a file would be
    other = open_database(f"sqlite:///{tmp_path / 'other.db'}")
    outcome = import_records(other, document)
    assert (outcome.animals_created, outcome.checks_added, outcome.checks_skipped) == (2, 3, 0)
    for animal in ("M01", "M02"):
        mine, theirs = animal_checks(database, animal), animal_checks(other, animal)
        assert [c.uid for c in mine] == [c.uid for c in theirs]
        assert [c.created_at for c in mine] == [c.created_at for c in theirs]
        assert [(c.notes, c.recorded_by, c.pain, c.abstained, c.mean_confidence) for c in mine] == \
            [(c.notes, c.recorded_by, c.pain, c.abstained, c.mean_confidence) for c in theirs]
        for a, b in zip(mine, theirs, strict=True):
            assert check_frames(database, a.check_id) == check_frames(other, b.check_id)
    again = import_records(other, document)  # importing twice changes nothing
    assert (again.animals_created, again.checks_added, again.checks_skipped) == (0, 0, 3)

    moved = json.loads(json.dumps(document))
    moved["animals"][1]["checks"] = moved["animals"][0]["checks"][:1]  # an M01 check claimed by M02
    with pytest.raises(RecordsError, match="already in the records as a check of 'M01'"):
        import_records(other, moved)
    broken = json.loads(json.dumps(document))
    broken["animals"][0]["checks"][1]["frames"][2]["radius"] = "wide"
    with pytest.raises(RecordsError, match=r"animals\[0\]\.checks\[1\]\.frames\[2\]\.radius must be float"):
        import_records(open_database(f"sqlite:///{tmp_path / 'third.db'}"), broken)
    assert list_animals(open_database(f"sqlite:///{tmp_path / 'third.db'}")) == []  # nothing of it written
    with pytest.raises(RecordsError, match="format version 2, newer"):
        import_records(other, {**document, "format_version": 2})
    (tmp_path / "notes.json").write_text("not json")
    with pytest.raises(RecordsError, match="not a JSON file"):
        import_file(other, tmp_path / "notes.json")
    with pytest.raises(RecordsError, match="not a painwatch records export"):
        import_records(other, {"format": "something else"})


def test_the_history_csv_has_one_row_per_frame_of_every_check(database) -> None:
    for seed in range(2):
        frames, results = fake_batch(2 + seed, seed=seed)
        save_check(database, frames, results, model=fake_model(), animal="M03", create_animal=True,
                   notes=f"day {seed}")
    checks = animal_checks(database, "M03")
    text = history_csv(checks, {c.check_id: check_frames(database, c.check_id) for c in checks}).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:len(HISTORY_CSV_COLUMNS)] == list(HISTORY_CSV_COLUMNS)
    assert [row["notes"] for row in rows] == ["day 0"] * 2 + ["day 1"] * 3
    assert {row["animal"] for row in rows} == {"M03"}
    stored = check_frames(database, checks[0].check_id)
    assert float(rows[0]["radius_l2"]) == stored[0].result.radius
    assert int(rows[0]["noise_seed"]) == stored[0].result.noise_seed


def test_the_command_line_exports_imports_lists_and_prints(database, tmp_path: Path, capsys) -> None:
    frames, results = fake_batch(3, pain=(1,))
    save_check(database, frames, results, model=fake_model(), animal="M04", create_animal=True)
    save_check(database, frames, results, model=fake_model(), animal="M04", notes="day 2")
    source, target = database.url, f"sqlite:///{tmp_path / 'copy.db'}"
    backup = tmp_path / "backup.json"
    assert main(["records", "export", str(backup), "--database", source, "--no-thumbnails"]) == 0
    assert "exported 1 animal(s) with 2 check(s)" in capsys.readouterr().out
    document = json.loads(backup.read_text())
    assert all(f["thumbnail_jpeg_base64"] is None
               for c in document["animals"][0]["checks"] for f in c["frames"])
    assert main(["records", "import", str(backup), "--database", target]) == 0
    assert "2 check(s) added, 0 already there, 1 new animal(s)" in capsys.readouterr().out
    assert main(["records", "import", str(backup), "--database", target]) == 0
    assert "0 check(s) added, 2 already there" in capsys.readouterr().out
    assert main(["records", "list", "--database", target]) == 0
    assert "M04: 2 check(s)" in capsys.readouterr().out
    pdf = tmp_path / "M04.pdf"
    assert main(["records", "report", "M04", "--out", str(pdf), "--database", target,
                 "--time-zone", "Asia/Tokyo"]) == 0
    assert pdf.read_bytes().startswith(b"%PDF")
    assert main(["records", "report", "M04", "--out", str(pdf), "--check", "9", "--database", target]) == 2
    assert "has no check #9 (its checks: #1, #2)" in capsys.readouterr().err
    assert main(["records", "export", str(backup), "--animals", "M99", "--database", source]) == 2
    assert "there is no animal 'M99'" in capsys.readouterr().err
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database")
    assert main(["records", "list", "--database", f"sqlite:///{garbage}"]) == 2
    assert "is not an SQLite database" in capsys.readouterr().err
    assert garbage.read_text() == "not a database"


def test_painwatch_records_export_then_import_into_a_fresh_database_round_trips(database, tmp_path: Path,
                                                                                  capsys) -> None:
    for seed, animal in enumerate(("Hana-03", "Hana-03", "M05")):
        frames, results = fake_batch(3, seed=seed, pain=(seed,), abstain=(2,) if seed == 1 else ())
        save_check(database, frames, results, model=fake_model(gate_passed=seed != 1), animal=animal,
                   create_animal=True, notes=f"day {seed}", recorded_by="vet1" if seed else None)
    backup, again = tmp_path / "backup.json", tmp_path / "again.json"
    fresh = tmp_path / "fresh" / "records.db"
    assert main(["records", "export", str(backup), "--database", database.url]) == 0
    assert main(["records", "import", str(backup), "--database", f"sqlite:///{fresh}"]) == 0
    assert "3 check(s) added, 0 already there, 2 new animal(s)" in capsys.readouterr().out
    assert main(["records", "export", str(again), "--database", f"sqlite:///{fresh}"]) == 0
    original, copied = json.loads(backup.read_text()), json.loads(again.read_text())
    assert original["exported_at"] <= copied["exported_at"]
    del original["exported_at"], copied["exported_at"]
    # Every animal, check and frame, thumbnails included, comes back as it left.
    assert copied == original
    thumbnails = [f["thumbnail_jpeg_base64"]
                  for a in copied["animals"] for c in a["checks"] for f in c["frames"]]
    assert len(thumbnails) == 9 and all(thumbnails)
    imported = open_database(f"sqlite:///{fresh}")
    try:
        for animal in ("Hana-03", "M05"):
            pairs = zip(animal_checks(database, animal), animal_checks(imported, animal), strict=True)
            for mine, theirs in pairs:
                assert check_frames(database, mine.check_id) == check_frames(imported, theirs.check_id)
    finally:
        imported.close()
    pdf = tmp_path / "Hana-03.pdf"
    assert main(["records", "report", "Hana-03", "--out", str(pdf), "--database", f"sqlite:///{fresh}"]) == 0
    reader = PdfReader(pdf)  # a PDF that a PDF reader opens, naming the animal
    text = " ".join(page.extract_text() for page in reader.pages)
    assert pdf.read_bytes().startswith(b"%PDF-") and len(reader.pages) >= 1
    assert "Hana-03" in text and "day 1" in text
