"""painwatch: an animal's record, the second page of ``app.py`` (``st.navigation``).

Its checks over time (share of pain frames and mean confidence per check on a date axis, refused frames
shown), the latest verdict, the checks as a table, each check's frames on demand, and the printable
report (PDF) and exports (CSV, JSON) of the whole record. A thin layout over :mod:`painwatch.app` and
:mod:`painwatch.records`.
"""

from __future__ import annotations

from typing import Any

import altair as alt
import streamlit as st

from painwatch.app import records as page_records
from painwatch.app import widgets
from painwatch.records import history, report, service, transfer

widgets.sign_in_gate()
st.title("Animal records")
st.caption(history.SUPPORTS_NEVER_REPLACES)

settings = widgets.records_settings()
database, problem = widgets.records_database(settings)
if database is None:
    st.error(f"The records cannot be used: {problem}", icon=":material/database:")
    st.stop()
animals = service.list_animals(database)
if not animals:
    st.info("No animal has a saved check yet. Analyse frames on the check page and save the check for an "
            "animal: it then appears here.", icon=":material/pets:")
    st.stop()

codes = [animal.code for animal in animals]
wanted = st.session_state.pop(widgets.OPEN_ANIMAL, None) or st.query_params.get("animal")
if wanted in codes:
    st.session_state["animal_choice"] = wanted
code = st.selectbox("Animal", codes, key="animal_choice",
                    format_func=lambda c: f"{c} ({next(a.checks for a in animals if a.code == c)} checks)")
checks = service.animal_checks(database, code)
zone = widgets.viewer_zone()
where = history.zone_name(zone)
if not checks:
    st.info(f"{code} has no checks yet.")
    st.stop()

latest = checks[-1]
st.subheader("Latest verdict")
st.markdown(f"**{history.format_time(latest.created_at, zone)}** ({where}): {history.verdict_words(latest)}"
            + ("" if latest.mean_confidence is None else f"; mean confidence {latest.mean_confidence:.2f}")
            + (f". *{latest.notes}*" if latest.notes else "."))
columns = st.columns(4)
columns[0].metric("Checks", len(checks))
columns[1].metric("Pain frames, latest", "–" if latest.pain_share is None else f"{latest.pain_share:.0%}",
                  help="Share of pain among the frames with an answer (refused frames left out).")
columns[2].metric("Refused, latest", f"{latest.abstained} of {latest.frames}")
columns[3].metric("Model gate, latest", history.gate_summary(latest))
if any(history.is_synthetic(c) for c in checks):
    st.warning("Some of these checks were answered by a model trained on SYNTHETIC frames: their answers say "
               "nothing about real animals.", icon=":material/science:")


def time_course_chart(data: Any) -> Any:
    """Pain share and mean confidence per check as lines, refused share as bars, on a date axis (0-1)."""
    base = alt.Chart(data).encode(
        # Dates and times on the axis, also when the checks are minutes apart (vega's default then
        # labels fractions of a second).
        x=alt.X("time:T", title=f"check time ({where})", axis=alt.Axis(format="%b %d %H:%M", labelAngle=-30)),
        y=alt.Y("value:Q", title="share / confidence", scale=alt.Scale(domain=[0, 1])),
        tooltip=[alt.Tooltip("time:T", format="%Y-%m-%d %H:%M"), "measure",
                 alt.Tooltip("value:Q", format=".2f"), "frames", "refused", "notes"],
    )
    lines = base.transform_filter(alt.datum.measure != page_records.MEASURES[2]).mark_line(point=True).encode(
        color=alt.Color("measure:N", title=None, legend=alt.Legend(orient="bottom", labelLimit=0)))
    bars = base.transform_filter(alt.datum.measure == page_records.MEASURES[2]).mark_bar(
        color="#bbbbbb", opacity=0.7, size=8)
    half = alt.Chart(data).mark_rule(strokeDash=[4, 4], color="#888888").encode(y=alt.datum(0.5))
    return alt.layer(bars, lines, half).properties(height=280)


st.subheader("Checks over time")
st.altair_chart(time_course_chart(page_records.history_chart_data(checks, zone)), width="stretch")
st.dataframe(
    history.history_table(checks, zone), hide_index=True, width="stretch",
    column_config={
        "time": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm",
                                                help=f"When it was saved ({where})"),
        "pain share": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="%.2f",
                                                      help="Share of pain among the answered frames"),
        "mean confidence": st.column_config.NumberColumn(format="%.2f", help="Over the answered frames"),
    },
)

every_frame = {c.check_id: service.check_frames(database, c.check_id) for c in checks}
stem = page_records.file_stem("painwatch", code, "record")
left, middle, right, _ = st.columns([1.3, 1, 1, 2])
left.download_button(
    "Print the record (PDF)",
    lambda c=code, k=checks, f=every_frame, z=zone: report.animal_report_pdf(c, k, f, zone=z),
    file_name=f"{stem}.pdf", mime="application/pdf", on_click="ignore", icon=":material/print:",
    key="animal_pdf")
middle.download_button("History (CSV)", lambda k=checks, f=every_frame: transfer.history_csv(k, f),
                       file_name=f"{stem}.csv", mime="text/csv", on_click="ignore",
                       icon=":material/download:", key="animal_csv")
right.download_button("History (JSON)", lambda d=database, c=code: transfer.export_json(d, animals=[c]),
                      file_name=f"{stem}.json", mime="application/json", on_click="ignore",
                      icon=":material/download:", key="animal_json",
                      help="Every check with its frames; `painwatch records import` reads it back.")

st.subheader("A check's frames")
by_label = {page_records.check_label(c, zone): c for c in reversed(checks)}
label = st.selectbox("Check", list(by_label), key="check_choice")
chosen = by_label[label]
if st.toggle("Show its frames", key="show_frames"):
    frames = every_frame[chosen.check_id]
    st.markdown(f"{history.verdict_words(chosen)}. Model {chosen.model.architecture} "
                f"`{chosen.model.weights_sha256[:16]}…`, gate {history.gate_summary(chosen)}."
                + (f" Notes: *{chosen.notes}*" if chosen.notes else ""))
    st.dataframe(history.frames_table(frames), hide_index=True, width="stretch")
    pictures = [f for f in frames if f.thumbnail]
    if pictures:
        st.image([f.thumbnail for f in pictures], width=120,
                 caption=[f"{f.result.name}: {f.result.label}" for f in pictures])
    else:
        st.caption("The frames of this check were not kept (the clinic's setting).")
    st.download_button(
        "Print this check (PDF)", lambda c=chosen, f=frames, z=zone: report.check_report_pdf(c, f, zone=z),
        file_name=f"{page_records.file_stem('painwatch', code, 'check', str(chosen.check_id))}.pdf",
        mime="application/pdf", on_click="ignore", icon=":material/print:", key="check_pdf")
