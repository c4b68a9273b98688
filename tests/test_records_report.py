"""The printable reports: a check's and an animal's PDF say the limits of use first, then the answers,
the time course, the models and their gate verdicts, and every frame (text read back with pypdf)."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image
from pypdf import PdfReader
from records_fixtures import fake_batch, fake_model

from painwatch.inference import ABSTAIN_REASONS
from painwatch.records import history
from painwatch.records.database import open_database
from painwatch.records.report import animal_report_pdf, check_report_pdf, time_course_png
from painwatch.records.service import animal_checks, check_frames, save_check
from painwatch.records.tables import Check


def _text(pdf: bytes) -> str:
    reader = PdfReader(io.BytesIO(pdf))
    return "\n".join(page.extract_text() for page in reader.pages)


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def records(tmp_path: Path):
    """Three checks of M01 over three days (one refusing every frame), by a failed-gate synthetic model."""
    database = open_database(f"sqlite:///{tmp_path / 'records.db'}")
    model = fake_model(gate_passed=False, synthetic=True)
    plans = [dict(pain=(0, 1, 2, 3), abstain=()), dict(pain=(0,), abstain=(3,)),
             dict(pain=(), abstain=(0, 1))]
    notes = ["day 0, before surgery (Hanako-03)", "day 1 after laparotomy, before analgesia", ""]
    for day, plan in enumerate(plans):
        frames, results = fake_batch(4 if day < 2 else 2, seed=day, **plan)
        save_check(database, frames, results, model=model, animal="Hanako-03", create_animal=True,
                   notes=notes[day], recorded_by="vet1" if day else None)
    start = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    with database.write() as session:  # spread the checks over days, as a week of visits would be
        for index, check in enumerate(session.query(Check).order_by(Check.id)):
            check.created_at = start + timedelta(days=index, hours=index)
    yield database
    database.close()


def test_an_animal_report_has_limits_time_course_models_and_frames(records) -> None:
    checks = animal_checks(records, "Hanako-03")
    frames = {c.check_id: check_frames(records, c.check_id) for c in checks}
    pdf = animal_report_pdf("Hanako-03", checks, frames, zone=ZoneInfo("Asia/Tokyo"))
    reader = PdfReader(io.BytesIO(pdf))
    text = _flat(_text(pdf))
    assert "Limits of use" in text and "never replace, the veterinarian's judgement" in text
    assert text.index("Limits of use") < text.index("Latest verdict") < text.index("Time course")
    assert "SYNTHETIC" in text
    assert "painwatch: pain checks of Hanako-03" in text and "3 check(s)" in text
    assert "2026-12-01 17:00" in text  # 08:00 UTC is 17:00 in Tokyo
    assert "Asia/Tokyo" in text
    assert "no answer: all 2 frame(s) refused" in text  # the latest verdict
    assert "day 1 after laparotomy, before analgesia" in text and "by vet1" in text
    assert "Certification gate default.toml: FAILED on 2026-11-25" in text
    assert "accuracy (point estimate) >= 0.6" in text
    for check in checks:
        for record in frames[check.check_id]:
            assert record.result.name in text
    assert "refused: no clear answer" in text
    # The time course and the thumbnails are images in the file.
    images = [image for page in reader.pages for image in page.images]
    assert len(images) >= 1 + 10
    assert max(Image.open(io.BytesIO(images[0].data)).size) > 500  # the chart, drawn at 150 dpi


def test_a_check_report_and_its_words(records) -> None:
    checks = animal_checks(records, "Hanako-03")
    second = checks[1]
    text = _flat(_text(check_report_pdf(second, check_frames(records, second.check_id))))
    assert "pain check of Hanako-03, 2026-12-02 09:00" in text and "(UTC)" in text
    assert text.index("Limits of use") < text.index("Verdict:")
    assert "Verdict: mostly no pain: pain on 1 of 3 answered frame(s) (33%), 1 refused" in text
    assert "before analgesia" in text and "frame-1-3.png" in text
    assert history.verdict_words(checks[0]) == "mostly pain: pain on 4 of 4 answered frame(s) (100%)"
    table = history.history_table(checks, ZoneInfo("Europe/Berlin"))
    assert list(table.columns) == list(history.HISTORY_COLUMNS)
    assert table["pain share"].tolist()[:2] == pytest.approx([1.0, 1 / 3])
    assert table["pain share"].isna().tolist()[2]
    assert table["time"].iloc[0].hour == 9  # 08:00 UTC in Berlin (winter)
    assert table["gate"].tolist() == ["FAILED"] * 3


def test_the_time_course_is_a_picture_and_an_empty_record_prints_nothing() -> None:
    with pytest.raises(ValueError, match="no checks"):
        animal_report_pdf("M09", [], {})
    assert time_course_png([]).startswith(b"\x89PNG")


def test_a_frame_refused_as_unlike_the_training_frames_says_so_with_its_score(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'records.db'}")
    frames, results = fake_batch(2, abstain=(1,))
    reason = ABSTAIN_REASONS["not_like_training_frames"]
    results = [replace(results[0], in_distribution_score=1.5, in_distribution_threshold=2.0),
               replace(results[1], abstain_code="not_like_training_frames", abstain_reason=reason,
                       in_distribution_score=7.25, in_distribution_threshold=2.0)]
    save_check(database, frames, results, model=fake_model(), animal="M07", create_animal=True)
    check = animal_checks(database, "M07")[0]
    stored = check_frames(database, check.check_id)
    assert [r.result for r in stored] == results  # the score and the threshold are kept
    table = history.frames_table(stored)
    assert table["in-distribution score"].tolist() == [1.5, 7.25]
    assert table["status"].tolist()[1] == \
        f"refused: {reason} (in-distribution score 7.25 above the threshold 2)"
    text = _flat(_text(check_report_pdf(check, stored)))
    assert "in-distribution score 7.25 above the threshold 2" in text
    database.close()
