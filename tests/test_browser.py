"""The one real-browser test: `streamlit run app.py`, Debian chromium, click Next step three times.

What AppTest cannot see: the page renders in a browser, the Next step button reaches the server,
and the K heatmap drawn by Plotly in the DOM gains one row per click. Skipped locally without
chromium (the `chromium` fixture); CI installs it and runs this.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.browser import IDLE, K_ROWS_JS, free_port, launch, start_app, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KVVIZ_ARTIFACTS", ROOT / "artifacts"))  # gitignored; CI can upload it


@pytest.fixture
def app_url(tmp_path):
    """`streamlit run app.py` on a free port (bundled model), stopped after the test."""
    port = free_port()
    log_path = tmp_path / "streamlit.log"
    with log_path.open("w") as log:
        proc = start_app(port, log=log)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_healthy(url, proc)
            except RuntimeError as e:
                raise RuntimeError(f"{e}: {log_path.read_text()[-2000:]}") from None
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def test_next_step_three_times_grows_k_by_three_rows(chromium, app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # home, then the menu, as a visitor arrives
            page.goto(app_url + "/")
            page.get_by_role("link", name="Step through", exact=True).click(timeout=120_000)
            page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=120_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            rows = page.evaluate(K_ROWS_JS)
            for click in range(1, 4):
                page.get_by_role("button", name="Next step").click()
                page.wait_for_function(f"({K_ROWS_JS})() === {rows + click}", timeout=60_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            page.mouse.move(5, 1095)
            page.screenshot(path=str(ARTIFACTS / "step_through_browser.png"), full_page=True)
            assert page.evaluate(K_ROWS_JS) == rows + 3
            assert page.get_by_text("decode 3", exact=True).is_visible()
            sidebar = page.locator("[data-testid='stSidebar']")
            assert sidebar.get_by_text("Model", exact=True).count() and sidebar.get_by_text("Run", exact=True).count()
            assert not page.locator("[data-testid='stException']").count()
            assert not errors, errors
        finally:
            browser.close()
