"""Screenshot a running kvviz page in Debian chromium: python scripts/shot.py URL OUT.png [width] [height].

Waits until Streamlit has finished running the script, then captures the full page.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `scripts.browser` importable
from scripts.browser import IDLE, launch


def main() -> None:
    url, out = sys.argv[1], sys.argv[2]
    width = int(sys.argv[3]) if len(sys.argv) > 3 else 1400
    height = int(sys.argv[4]) if len(sys.argv) > 4 else 900
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url, timeout=120_000)
        page.wait_for_selector(IDLE, timeout=120_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main()
