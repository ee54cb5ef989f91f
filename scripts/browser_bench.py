"""Measure the step-through page in a real browser: first load, and click-to-updated-chart.

Starts `streamlit run app.py` on a free port (or uses --url), opens it in Debian chromium with
Playwright, goes to the Step through page, then clicks Next step --clicks times and times each
click until the K matrix shows its new row (read from the Plotly div's data in the DOM) and until
the page has finished rerunning. Prints one JSON object (times in ms; medians over the clicks).

    python scripts/browser_bench.py                      # the bundled model
    python scripts/browser_bench.py --model /path/ckpt   # any checkpoint (KVVIZ_DEFAULT_MODEL)

The timing runs inside the page (performance.now() from the click to the frame where the chart
holds the new row), so Playwright's own round trips are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: make `scripts.browser` importable

from scripts.browser import CHROMIUM, IDLE, K_ROWS_JS, free_port, launch, start_app, wait_healthy  # noqa: E402

# Click Next step, then poll every animation frame; resolve with [ms to K updated, ms to page idle].
CLICK_JS = """([expectRows]) => new Promise((resolve, reject) => {
  const kRows = __K_ROWS_JS__;
  const btn = [...document.querySelectorAll('button')].find(b => b.innerText.trim().endsWith('Next step'));
  if (!btn) { reject('no Next step button'); return; }
  const t0 = performance.now();
  let tChart = null, sawRunning = false;
  btn.click();
  const app = document.querySelector("[data-testid='stApp']");
  function poll() {
    const now = performance.now();
    if (tChart === null && kRows() === expectRows) tChart = now - t0;
    const state = app.getAttribute('data-test-script-state');
    if (state === 'running') sawRunning = true;
    if (tChart !== null && (sawRunning || now - t0 > 2000) && state === 'notRunning') {
      // one more frame so the last chart painted
      requestAnimationFrame(() => resolve([tChart, performance.now() - t0]));
      return;
    }
    if (now - t0 > 30000) { reject('timeout: K has ' + kRows() + ' rows, expected ' + expectRows); return; }
    requestAnimationFrame(poll);
  }
  requestAnimationFrame(poll);
})""".replace("__K_ROWS_JS__", K_ROWS_JS)


def open_step_page(page, url: str) -> None:
    """Home first, then the menu, as a visitor arrives (first load counts both)."""
    page.goto(url + "/")
    page.wait_for_selector("[data-testid='stSidebarNav'] >> text=Step through", timeout=120_000)
    page.get_by_role("link", name="Step through", exact=True).click()
    page.wait_for_selector("button:has-text('Next step')", timeout=120_000)
    page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=120_000)
    page.wait_for_selector(IDLE, timeout=120_000)


def measure(url: str, clicks: int, chromium: str, screenshot: Path | None) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, chromium)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        # first load: a fresh browser context, home -> Step through, until the K chart is drawn
        t0 = time.perf_counter()
        open_step_page(page, url)
        first_load_ms = (time.perf_counter() - t0) * 1e3
        time.sleep(1.0)
        rows = page.evaluate(K_ROWS_JS)
        chart_ms, idle_ms = [], []
        for _ in range(clicks):
            rows += 1
            to_chart, to_idle = page.evaluate(CLICK_JS, [rows])
            chart_ms.append(to_chart)
            idle_ms.append(to_idle)
            time.sleep(0.3)
        if screenshot:
            page.mouse.move(5, 995)
            page.screenshot(path=str(screenshot))
        # a second visitor: new browser context (cold browser cache), the server and model already warm
        t0 = time.perf_counter()
        open_step_page(browser.new_context(viewport={"width": 1500, "height": 1000}).new_page(), url)
        warm_load_ms = (time.perf_counter() - t0) * 1e3
        browser.close()
    return {
        "first_load_ms": round(first_load_ms),  # fresh server: includes loading the model once
        "second_visitor_load_ms": round(warm_load_ms),
        "clicks": clicks,
        "click_to_K_updated_ms": {"median": round(statistics.median(chart_ms)), "min": round(min(chart_ms)),
                                  "max": round(max(chart_ms)), "all": [round(x) for x in chart_ms]},
        "click_to_page_idle_ms": {"median": round(statistics.median(idle_ms)), "min": round(min(idle_ms)),
                                  "max": round(max(idle_ms))},
        "k_rows_at_end": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an already running app (default: start one)")
    ap.add_argument("--port", type=int, default=None, help="port for the app this script starts (default: a free one)")
    ap.add_argument("--model", default=None, help="checkpoint for KVVIZ_DEFAULT_MODEL (default: bundled)")
    ap.add_argument("--clicks", type=int, default=9)
    ap.add_argument("--chromium", default=CHROMIUM)
    ap.add_argument("--screenshot", type=Path, default=None, help="save a PNG of the page after the clicks")
    args = ap.parse_args(argv)

    server = None
    url = args.url
    try:
        if url is None:
            port = free_port(args.port)
            server = start_app(port, args.model)
            url = f"http://127.0.0.1:{port}"
            startup_s = wait_healthy(url, server)
        else:
            startup_s = None
        result = measure(url.rstrip("/"), args.clicks, args.chromium, args.screenshot)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
    result.update({
        "model": args.model or "bundled",
        "server_start_s": None if startup_s is None else round(startup_s, 2),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
    })
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
