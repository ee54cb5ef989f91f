"""Measure the step-through page in a real browser, against a bare Streamlit floor, in one run.

Starts two servers on free ports: kvviz (`streamlit run app.py`, the bundled model unless --model)
and the floor (`scripts/floor_app.py`: a bare page redrawing the same five Plotly charts with no
model). Then, in Debian chromium through Playwright:

1. first load at a warm server: a new browser context (cold browser cache) opens /step_through and
   waits until K is drawn; and a visitor coming through the home page and the menu;
2. click -> K updated: Next step on kvviz and on the floor, clicks alternating (kvviz, floor, ...),
   each timed inside the page from the click to the animation frame in which K holds the new row;
   the ratio of the medians is the number the README reports (issue 11 asks for <= 1.3);
3. Play: Reset, Play, and the frames the browser drew per second, with the server's script runs
   counted before and after (Play must cause none while it plays).

Prints one JSON object (times in ms), with the machine's load average before and after.

    python scripts/browser_bench.py                     # the bundled model, 15 clicks each
    python scripts/browser_bench.py --clicks 21 --model /path/ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file: make `scripts.browser` importable

from scripts.browser import CHROMIUM, IDLE, K_ROWS_JS, free_port, launch, start_app, wait_healthy  # noqa: E402

# Click Next step, then poll every animation frame; resolve with [ms to K updated, ms to page idle].
CLICK_JS = """([expectRows]) => new Promise((resolve, reject) => {
  const kRows = __K_ROWS_JS__;
  const btn = [...document.querySelectorAll('button')].find(b => b.innerText.trim().startsWith('Next step'));
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
      requestAnimationFrame(() => resolve([tChart, performance.now() - t0]));  // one more frame: the last chart painted
      return;
    }
    if (now - t0 > 60000) { reject('timeout: K has ' + kRows() + ' rows, expected ' + expectRows); return; }
    requestAnimationFrame(poll);
  }
  requestAnimationFrame(poll);
})""".replace("__K_ROWS_JS__", K_ROWS_JS)

VIEW = ".kvsv"  # kvviz's step view (kvviz/ui/stepview/view.js)


def wait_drawn(page, timeout: float = 120_000) -> None:
    page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=timeout)
    page.wait_for_selector(IDLE, timeout=timeout)


def first_load(browser, url: str, through_menu: bool) -> float:
    """ms until a new visitor (new context: cold browser cache) sees K on the step page."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page = context.new_page()
    t0 = time.perf_counter()
    if through_menu:
        page.goto(url + "/", timeout=120_000)
        page.get_by_role("link", name="Step through", exact=True).click(timeout=120_000)
    else:
        page.goto(url + "/step_through", timeout=120_000)
    page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=120_000)
    ms = (time.perf_counter() - t0) * 1e3
    context.close()
    return ms


def clicks(pages: dict, n: int) -> dict[str, list[tuple[float, float]]]:
    """Next step on each page in turn, n times each: {name: [(ms to K updated, ms to idle), ...]}."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in pages}
    for _ in range(n):
        for name, page in pages.items():
            rows = page.evaluate(K_ROWS_JS) + 1
            out[name].append(tuple(page.evaluate(CLICK_JS, [rows])))
            time.sleep(0.3)
    return out


def play(page) -> dict:
    """Reset, then Play to the end: frames drawn per second and the server's script runs meanwhile."""
    page.click(f"{VIEW} [data-act=reset]")
    page.wait_for_function(f"() => document.querySelector('{VIEW}').dataset.view === '0'", timeout=60_000)
    page.wait_for_selector(IDLE, timeout=60_000)
    time.sleep(0.5)
    page.click(f"{VIEW} [data-act=play]")
    page.wait_for_function(f"() => document.querySelector('{VIEW}').dataset.playing === '1'", timeout=60_000)
    runs_at_start = page.get_attribute(VIEW, "data-runs")
    page.wait_for_function(f"() => document.querySelector('{VIEW}').dataset.playing === '0'", timeout=120_000)
    frames = int(page.get_attribute(VIEW, "data-frames") or 0)
    runs_at_end = page.get_attribute(VIEW, "data-runs")
    ms = float(page.get_attribute(VIEW, "data-play-ms") or 0)
    return {"frames": frames, "ms": round(ms), "frames_per_s": round((frames - 1) / (ms / 1e3), 1) if ms else None,
            "speed_setting_per_s": float(page.eval_on_selector(f"{VIEW} .kvsv-speed", "e => e.value")),
            "server_runs_during_play": int(runs_at_end) - int(runs_at_start)}


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs)), "min": round(min(xs)), "max": round(max(xs)), "all": [round(x) for x in xs]}


def measure(kvviz_url: str, floor_url: str, n_clicks: int, chromium: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, chromium)
        first_direct = first_load(browser, kvviz_url, through_menu=False)  # also warms the server for the rest
        load_direct = [first_load(browser, kvviz_url, through_menu=False) for _ in range(3)]
        load_menu = [first_load(browser, kvviz_url, through_menu=True) for _ in range(3)]
        pages = {}
        for name, url in (("kvviz", kvviz_url + "/step_through"), ("floor", floor_url + "/")):
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(url, timeout=120_000)
            wait_drawn(page)
            pages[name] = page
        time.sleep(1.0)
        timed = clicks(pages, n_clicks)
        played = play(pages["kvviz"])
        browser.close()
    k = {name: [x[0] for x in v] for name, v in timed.items()}
    idle = {name: [x[1] for x in v] for name, v in timed.items()}
    return {
        "first_load_fresh_server_ms": round(first_direct),
        "warm_visitor_direct_link_ms": summary(load_direct),
        "warm_visitor_through_menu_ms": summary(load_menu),
        "clicks_each": n_clicks,
        "click_to_K_updated_ms": {name: summary(v) for name, v in k.items()},
        "click_to_page_idle_ms": {name: summary(v) for name, v in idle.items()},
        "ratio_kvviz_over_floor": round(statistics.median(k["kvviz"]) / statistics.median(k["floor"]), 2),
        "play": played,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint for KVVIZ_DEFAULT_MODEL (default: bundled)")
    ap.add_argument("--clicks", type=int, default=15, help="Next step clicks on each page")
    ap.add_argument("--chromium", default=CHROMIUM)
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    with ExitStack() as stack:
        urls = []
        for script, model in (("app.py", args.model), ("scripts/floor_app.py", None)):
            port = free_port()
            proc = start_app(port, model, script=script, one_thread=False)  # as the README runs it
            stack.callback(lambda proc=proc: (proc.terminate(), proc.wait(timeout=20)))
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc)
            urls.append(url)
        result = measure(urls[0], urls[1], args.clicks, args.chromium)
    result.update({
        "model": args.model or "bundled",
        "cpus": os.cpu_count(),
        "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()} {_cpu_name()}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    })
    print(json.dumps(result, indent=2))
    return 0


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


if __name__ == "__main__":
    raise SystemExit(main())
