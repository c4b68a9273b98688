"""Drive the Streamlit page (``app.py``) in a real browser, for the browser test and the screenshot script.

- :func:`serve_app` starts ``streamlit run app.py`` on a free localhost port and always stops it
  (the whole process group) when the ``with`` block ends.
- :func:`open_browser` launches Debian's ``chromium`` through Playwright's sync API
  (never a browser that Playwright downloads itself).
- :func:`upload_files`, :func:`wait_for_results`, :func:`wait_until_idle`, :func:`choose_option`,
  :func:`type_text`, :func:`sign_in` and :func:`download` are the page interactions.

Playwright is a development dependency (``pip install -e '.[dev]'``); it is imported only here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_SCRIPT = REPO_ROOT / "app.py"

CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
)

RESULTS_READY_TEXT = "frames analysed"
"""Text the page shows once a batch is classified (see app.py)."""


class AppServerError(RuntimeError):
    """The Streamlit server did not come up; the message carries the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def chromium_path() -> str | None:
    """Path of Debian's chromium (``apt-get install -y chromium``), or ``None`` when it is missing."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class RunningApp:
    """A running page: its URL, its process and the file its output goes to."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def serve_app(
    bundle: Path,
    log_path: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 90.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RunningApp]:
    """Run ``streamlit run app.py -- --bundle BUNDLE`` on ``host:port`` until the block ends.

    Waits until ``/_stcore/health`` answers ``ok`` (raises :class:`AppServerError` with the server
    log when it does not within ``startup_timeout_s`` seconds or the process dies). The server runs
    in its own process group, which is terminated (then killed after 10 s) on exit, whatever happens.
    """
    port = port or free_port(host)
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--", "--bundle", str(bundle),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    app = RunningApp(f"http://{host}:{port}", process, log_path)
    try:
        _wait_healthy(app, startup_timeout_s)
        yield app
    finally:
        _stop(process)


def _wait_healthy(app: RunningApp, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            raise AppServerError(
                f"streamlit exited with code {app.process.returncode} before serving; log:\n{app.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{app.url}/_stcore/health", timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise AppServerError(
        f"streamlit did not answer on {app.url} within {timeout_s:.0f} s; log:\n{app.log_tail()}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def open_browser(viewport: tuple[int, int] = (1400, 1000)) -> Iterator[Any]:
    """A Playwright page in Debian's chromium (headless); raises ``FileNotFoundError`` when it is missing."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=list(CHROMIUM_ARGS)
        )
        try:
            context = browser.new_context(
                viewport={"width": viewport[0], "height": viewport[1]}, accept_downloads=True
            )
            yield context.new_page()
        finally:
            browser.close()


def wait_for_page(page: Any, url: str, timeout_ms: float = 60_000) -> None:
    """Open the page and wait until the upload box is on it."""
    page.goto(url, wait_until="domcontentloaded")
    page.locator('[data-testid="stFileUploaderDropzone"]').first.wait_for(state="visible", timeout=timeout_ms)


def upload_files(page: Any, paths: Sequence[Path]) -> None:
    """Put files into the page's upload box, as a person choosing them in the file dialog would."""
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files([str(p) for p in paths])


def wait_for_results(page: Any, timeout_ms: float = 180_000) -> None:
    """Wait until the page says the batch is analysed (text, not just page load)."""
    page.get_by_text(RESULTS_READY_TEXT).first.wait_for(state="visible", timeout=timeout_ms)


def download(page: Any, button_label: str, target: Path, timeout_ms: float = 30_000) -> Path:
    """Click a download button and save what the browser receives to ``target``."""
    with page.expect_download(timeout=timeout_ms) as info:
        page.get_by_role("button", name=button_label).click()
    target.parent.mkdir(parents=True, exist_ok=True)
    info.value.save_as(str(target))
    return target


def wait_until_idle(page: Any, timeout_ms: float = 120_000) -> None:
    """Wait until the page's script has finished its run (Streamlit's "running" status is gone)."""
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=timeout_ms)


def choose_option(page: Any, label: str, option: str, timeout_ms: float = 30_000) -> None:
    """Open the select box labelled ``label`` and pick ``option``, as a person with a mouse would."""
    box = page.get_by_role("combobox", name=label).first
    wanted = page.get_by_role("option", name=option, exact=True).first
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        # A rerun that redraws the box while it opens closes it again: open it until the option is clicked.
        wait_until_idle(page, timeout_ms)
        box.click(timeout=timeout_ms)
        try:
            wanted.click(timeout=3_000)
            return
        except Exception:
            shown = [text.strip() for text in page.get_by_role("option").all_inner_texts()]
            page.keyboard.press("Escape")
            if time.monotonic() > deadline:
                raise AssertionError(f"the select box {label!r} offers {shown}, not {option!r}") from None


def type_text(page: Any, label: str, text: str, timeout_ms: float = 20_000) -> None:
    """Type ``text`` into the text box labelled ``label`` and leave it (Streamlit takes the value then)."""
    wait_until_idle(page, timeout_ms)
    box = page.get_by_label(label, exact=True).first
    box.fill(text, timeout=timeout_ms)
    box.press("Tab")


def sign_in(page: Any, name: str, password: str, timeout_ms: float = 30_000) -> None:
    """Fill in the page's sign-in form and send it."""
    page.get_by_label("User name", exact=True).first.fill(name, timeout=timeout_ms)
    page.get_by_label("Password", exact=True).first.fill(password, timeout=timeout_ms)
    page.get_by_role("button", name="Sign in").click(timeout=timeout_ms)
