"""The Streamlit sections the page scripts share: the sign-in gate, "Save this check", the navigation
between the check page (``app.py``) and the animal page (``pages/animals.py``), and the records
database they open.

This is the one module of :mod:`painwatch.app` that draws with Streamlit; what it shows comes from
:mod:`painwatch.app.records` and :mod:`painwatch.records`, which are tested without it.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from painwatch.app.downloads import Provenance
from painwatch.app.records import is_loopback, save_batch, sign_in_required
from painwatch.app.uploads import FileProblem, Frame
from painwatch.records.database import Database, RecordsError, open_database
from painwatch.records.history import format_time, zone_name
from painwatch.records.service import NOTES_LENGTH, SavedCheck, list_animals, normalize_animal_code
from painwatch.records.settings import RecordsSettings, environment_variable
from painwatch.records.users import AccountsError, read_accounts, sign_in

ANIMAL_PAGE = "pages/animals.py"
"""The animal page's script, relative to ``app.py``."""
NEW_ANIMAL = "A new animal…"
SIGNED_IN = "signed_in_user"
SAVED_CHECKS = "saved_checks"
SAVE_FAILED = "record_save_failed"
OPEN_ANIMAL = "records_open_animal"
"""Session key: the animal the animal page opens with (set when a check is saved)."""
_PASSED_GATE: contextvars.ContextVar[tuple[str | None]] = contextvars.ContextVar("painwatch_passed_gate")
"""Set while :func:`navigation` runs a page, after the entry script's gate let the viewer in: the page's
own gate then lets the same viewer through without drawing the sidebar a second time."""


# --------------------------------------------------------------------------- settings and database


def records_settings() -> RecordsSettings:
    """The records settings from the ``PAINWATCH_*`` environment; a bad value stops the page, saying why."""
    try:
        return RecordsSettings.from_environment(os.environ)
    except ValueError as error:
        st.error(f"The records settings cannot be used: {error}", icon=":material/settings:")
        st.stop()
        raise  # st.stop raises; this line is never reached


@st.cache_resource(show_spinner="Opening the records…", max_entries=4)
def _open_database(url: str) -> Database:
    return open_database(url)


def records_database(settings: RecordsSettings) -> tuple[Database | None, str | None]:
    """The open records database, or None and what is wrong with it (nothing is written to a database
    that cannot be used)."""
    try:
        return _open_database(settings.database), None
    except RecordsError as error:
        return None, str(error)


def viewer_zone() -> tzinfo | None:
    """The time zone of the viewer's browser, or None (times then shown in UTC)."""
    name = st.context.timezone
    try:
        return ZoneInfo(name) if name else None
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _session_id() -> str:
    context = get_script_run_ctx()
    return context.session_id if context is not None else "no-session"


# --------------------------------------------------------------------------- sign-in


def sign_in_gate() -> str | None:
    """Let the page go on only for a signed-in user when it is served beyond this machine.

    Returns the signed-in user's name, or None when the page listens on loopback only (and the clinic did
    not ask for sign-in everywhere: ``PAINWATCH_SIGN_IN=always``). Otherwise shows the sign-in form and
    stops the script until a user with an account signs in; without accounts, or when the records
    database (which records the attempts) cannot be used, nobody gets in.
    """
    passed = _PASSED_GATE.get(None)
    if passed is not None:
        return passed[0]
    settings = records_settings()
    address = st.get_option("server.address")
    if not sign_in_required(address, settings.sign_in):
        st.sidebar.caption("Served on this machine only: no sign-in needed.")
        return None
    try:
        accounts = read_accounts(settings.accounts)
    except AccountsError as error:
        st.error(f"Nobody can sign in: {error}", icon=":material/lock:")
        st.stop()
    user = st.session_state.get(SIGNED_IN)
    if user is not None and user.casefold() in accounts:
        st.sidebar.markdown(f"Signed in as **{user}**")
        st.sidebar.button("Sign out", key="sign_out", icon=":material/logout:",
                          on_click=lambda: st.session_state.pop(SIGNED_IN, None))
        return user
    st.session_state.pop(SIGNED_IN, None)  # an account removed meanwhile loses its access
    where = "to other machines" if not is_loopback(address) else "with sign-in required"
    st.title("painwatch: sign in")
    st.markdown(f"This page is served {where}: the animals' records are shown only to people with an "
                "account.")
    if not accounts:
        st.error(
            # Said to anyone who reaches the page, so without the accounts file's path.
            "No account exists yet, so nobody can sign in. Ask whoever set up painwatch to create one for "
            "you (`painwatch users add NAME` on the machine that serves this page).", icon=":material/lock:")
        st.stop()
    database, problem = records_database(settings)
    if database is None:
        st.error(f"Sign-in is not available because the records cannot be used: {problem}",
                 icon=":material/lock:")
        st.stop()
    with st.form("sign_in", clear_on_submit=True):
        name = st.text_input("User name", key="sign_in_name", autocomplete="username")
        password = st.text_input("Password", type="password", key="sign_in_password",
                                 autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", key="sign_in_submit", type="primary")
    if submitted:
        try:
            outcome = sign_in(database, settings.accounts, name=name, password=password,
                              session=_session_id())
        except RecordsError as error:
            st.error(f"Sign-in failed: {error}", icon=":material/lock:")
            st.stop()
        if outcome.succeeded:
            st.session_state[SIGNED_IN] = outcome.user
            st.rerun()
        st.error(outcome.message, icon=":material/lock:")
    st.stop()
    return None  # st.stop raises; never reached


# --------------------------------------------------------------------------- navigation


def navigation(check_page: Callable[[], None], user: str | None = None) -> None:
    """Run the page the viewer chose: the check page (``check_page``, the default) or the animal page.

    Call it after :func:`sign_in_gate` let ``user`` in (its answer): the chosen page's own gate then
    answers the same without asking again."""
    pages = [
        st.Page(check_page, title="Check frames", icon=":material/pets:", default=True),
        st.Page(ANIMAL_PAGE, title="Animal records", icon=":material/monitoring:"),
    ]
    token = _PASSED_GATE.set((user,))
    try:
        st.navigation(pages).run()
    finally:  # also when the page stops or reruns: the next run asks the gate again
        _PASSED_GATE.reset(token)


# --------------------------------------------------------------------------- save this check


def _frames_note(settings: RecordsSettings) -> str:
    if settings.keep_thumbnails:
        return (f"The frames are kept as small thumbnails ({settings.thumbnail_side} pixels at most) with "
                f"the answers; the clinic can keep none ({environment_variable('frames')}=none).")
    return "The frames themselves are not kept (the clinic's setting): only the answers are."


def save_check_section(
    frames: Sequence[Frame],
    results: Sequence[Any],
    provenance: Provenance,
    *,
    model_card: Mapping[str, Any],
    batch_key: str,
    analysed_at: datetime | None = None,
    problems: Sequence[FileProblem] = (),
    user: str | None = None,
) -> SavedCheck | None:
    """"Save this check": pick a known animal or type a new ID (created only on confirmation), add notes,
    save the batch's answers as one check (by ``user`` when signed in). Returns the saved check once it
    is saved (a batch is saved once)."""
    st.subheader("Save this check")
    settings = records_settings()
    database, problem = records_database(settings)
    if database is None:
        st.warning(f"Checks cannot be saved: {problem}", icon=":material/database:")
        return None
    saved: dict[str, SavedCheck] = st.session_state.setdefault(SAVED_CHECKS, {})
    if batch_key in saved:
        done = saved[batch_key]
        st.success(f"Saved as a check of **{done.animal}** ({done.frames} frames) at "
                   f"{format_time(done.created_at, viewer_zone())} ({zone_name(viewer_zone())}).",
                   icon=":material/check_circle:")
        st.page_link(ANIMAL_PAGE, label=f"Open the record of {done.animal}", icon=":material/monitoring:")
        return done
    known = {a.code.casefold(): a.code for a in list_animals(database)}
    left, right = st.columns([1, 2])
    with left:
        choice = st.selectbox(
            "Animal", [*sorted(known.values(), key=str.casefold), NEW_ANIMAL], index=None if known else 0,
            placeholder="Pick the animal", key="record_animal",
            help="The animal these frames show. Pick a known one or a new one.",
        )
        if choice == NEW_ANIMAL:
            st.text_input("ID of the new animal", key="record_new_animal", max_chars=64,
                          placeholder="e.g. M-17")
    with right:
        st.text_area("Notes (optional)", key="record_notes", max_chars=NOTES_LENGTH, height=90,
                     placeholder="e.g. day 1 after laparotomy, before analgesia")
    st.caption(_frames_note(settings))
    code, create, problem = _chosen_animal(known)
    if problem:
        st.error(problem)
    elif code is not None and code.casefold() not in known:
        create = st.checkbox(f"Create the new animal **{code}**", key="record_confirm_new",
                             help="Check the ID first: a new record is started for it.")
    elif choice == NEW_ANIMAL and code is not None:
        st.info(f"**{code}** is already known: the check goes to its record.")
    st.button("Save this check", key="record_save", type="primary", icon=":material/save:",
              disabled=code is None or (code.casefold() not in known and not create),
              on_click=_save, args=(frames, results, provenance),
              kwargs={"database": database, "model_card": model_card, "recorded_by": user,
                      "problems": problems, "analysed_at": analysed_at, "settings": settings,
                      "batch_key": batch_key})
    failure = st.session_state.pop(SAVE_FAILED, None)
    if failure:
        st.error(f"The check was not saved: {failure}")
    return None


def _chosen_animal(known: Mapping[str, str]) -> tuple[str | None, bool, str | None]:
    """From the section's widgets: the animal ID (stored spelling when known), whether creating it is
    confirmed, and what is wrong with a typed ID."""
    choice = st.session_state.get("record_animal")
    if choice is None:
        return None, False, None
    if choice != NEW_ANIMAL:
        return choice, False, None
    typed = str(st.session_state.get("record_new_animal") or "")
    if not typed.strip():
        return None, False, None
    try:
        code = normalize_animal_code(typed)
    except RecordsError as error:
        return None, False, str(error)
    if code.casefold() in known:
        return known[code.casefold()], False, None
    return code, bool(st.session_state.get("record_confirm_new")), None


def _save(frames: Sequence[Frame], results: Sequence[Any], provenance: Provenance, *, database: Database,
          batch_key: str, **options: Any) -> None:
    # A button callback: it runs before the script, which then draws the saved state. It reads the
    # animal and the notes from the widgets' state as the click sent them (not as the last run drew them).
    known = {a.code.casefold(): a.code for a in list_animals(database)}
    code, create, problem = _chosen_animal(known)
    try:
        if code is None:
            raise RecordsError(problem or "pick the animal first")
        if code.casefold() not in known and not create:
            raise RecordsError(f"confirm that the new animal {code!r} is to be created")
        done = save_batch(frames, results, provenance, database=database, animal=code, create_animal=create,
                          notes=str(st.session_state.get("record_notes") or ""), **options)
    except RecordsError as error:
        st.session_state[SAVE_FAILED] = str(error)
        return
    st.session_state.setdefault(SAVED_CHECKS, {})[batch_key] = done
    st.session_state[OPEN_ANIMAL] = done.animal


__all__ = ["ANIMAL_PAGE", "NEW_ANIMAL", "OPEN_ANIMAL", "navigation", "records_database", "records_settings",
           "save_check_section", "sign_in_gate", "viewer_zone"]
