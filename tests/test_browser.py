"""The one real-browser test: `streamlit run app.py`, Debian chromium, click Next step three times.

What AppTest cannot see: the page renders in a browser, the Next step button reaches the server,
and the K heatmap drawn by Plotly in the DOM gains one row per click. Skipped locally without
chromium (the `chromium` fixture); CI installs it and runs this.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KVVIZ_ARTIFACTS", ROOT / "artifacts"))  # gitignored; CI can upload it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
# Rows of the K heatmap as Plotly holds them: the trace named "K", one y label per cached row.
K_ROWS = """() => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const t = (gd.data || [])[0];
    if (t && t.name === 'K') return t.y.length;
  }
  return -1;
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    """`streamlit run app.py` on a free port (bundled model), stopped after the test."""
    port = free_port()
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=1) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"streamlit did not start: {(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_next_step_three_times_grows_k_by_three_rows(chromium, app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # home, then the menu: a deep link on a cold server would run the page without app.py
            page.goto(app_url + "/")
            page.get_by_role("link", name="Step through", exact=True).click(timeout=120_000)
            page.wait_for_function(f"({K_ROWS})() > 0", timeout=120_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            rows = page.evaluate(K_ROWS)
            for click in range(1, 4):
                page.get_by_role("button", name="Next step").click()
                page.wait_for_function(f"({K_ROWS})() === {rows + click}", timeout=60_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            page.mouse.move(5, 1095)
            page.screenshot(path=str(ARTIFACTS / "step_through_browser.png"), full_page=True)
            assert page.evaluate(K_ROWS) == rows + 3
            assert page.get_by_text("decode 3", exact=True).is_visible()
            sidebar = page.locator("[data-testid='stSidebar']")
            assert sidebar.get_by_text("Model", exact=True).count() and sidebar.get_by_text("Run", exact=True).count()
            assert not page.locator("[data-testid='stException']").count()
            assert not errors, errors
        finally:
            browser.close()
