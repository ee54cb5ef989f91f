"""A class at once: N browser sessions step the same server together; is anyone slowed, mixed up or leaked?

Starts `streamlit run app.py` (the bundled model, as the README says), opens N pages in Debian
chromium, each on the step page with its own prompt (a link), and has every page click Next step
M times at the same moments. Prints one JSON object:
- click -> K updated, per click of every session: p50 / p95 / max (ms);
- the server's resident memory (VmRSS) before the sessions arrive and after they finished;
- sessions whose tokens differ from the same prompt run alone through the API (must be 0): every
  session reads its own token ids off its page and compares them with `kvviz.trace`.

    python scripts/load_test.py                    # 8 sessions, 6 clicks each
    python scripts/load_test.py --sessions 30 --clicks 3

This is a measurement, not a test: the numbers depend on the machine and its load (printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.browser import K_ROWS_JS, free_port, launch, start_app, wait_healthy  # noqa: E402

WORDS = ["It is a truth universally acknowledged, that", "Emma Woodhouse, handsome, clever, and rich,",
         "Captain Wentworth", "Mr. Darcy looked at Elizabeth", "The keys and the values of", "She had never seen",
         "My dear Mr. Bennet,", "In the morning the party"]
IDS_JS = """() => [...document.querySelectorAll('.kvsv-chips .kvsv-tok')]
  .map(e => { const m = /id (\\d+)/.exec(e.title || ''); return m ? Number(m[1]) : null; }).filter(x => x !== null)"""


def rss_mib(pid: int) -> float:
    """Resident memory of the server and its children (MiB), from /proc."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def prompt_of(i: int) -> str:
    return f"{WORDS[i % len(WORDS)]} ({i})" if i >= len(WORDS) else WORDS[i]


async def session(browser, url: str, i: int, clicks: int, barrier: asyncio.Barrier) -> dict:
    page = await browser.new_page(viewport={"width": 1300, "height": 900})
    await page.goto(f"{url}/step_through?prompt={quote(prompt_of(i))}&new_tokens=24", timeout=300_000)
    await page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=300_000)
    times = []
    for _ in range(clicks):
        await barrier.wait()  # every session clicks in the same round
        rows = await page.evaluate(K_ROWS_JS)
        t0 = time.perf_counter()
        await page.get_by_role("button", name="Next step").click()
        await page.wait_for_function(f"({K_ROWS_JS})() === {rows + 1}", timeout=300_000)
        times.append((time.perf_counter() - t0) * 1000)
    await page.wait_for_timeout(500)
    ids = await page.evaluate(IDS_JS)
    await page.close()
    return {"i": i, "ms": times, "ids": ids}


async def run(url: str, n: int, clicks: int) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await launch(p)  # the async API's launch is awaitable; same chromium and flags
        barrier = asyncio.Barrier(n)
        out = await asyncio.gather(*(session(browser, url, i, clicks, barrier) for i in range(n)))
        await browser.close()
    return list(out)


def solo_ids(n: int, steps: int) -> list[list[int]]:
    """The same prompts run alone through the API (greedy, as the page's default)."""
    import kvviz

    lm = kvviz.load_model("bundled")
    out = []
    for i in range(n):
        t = kvviz.trace(lm, prompt_of(i), steps)
        out.append(list(t.prompt_ids) + [s.token_id for s in t.steps])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--clicks", type=int, default=6)
    args = ap.parse_args(argv)
    port = free_port()
    proc = start_app(port, one_thread=False)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout=300)
        rss_before = rss_mib(proc.pid)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        results = asyncio.run(run(url, args.sessions, args.clicks))
        seconds = time.perf_counter() - t0
        rss_after = rss_mib(proc.pid)
        load_after = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    solo = solo_ids(args.sessions, args.clicks + 1)
    differ = [r["i"] for r in results
              if not r["ids"] or r["ids"][: len(solo[r["i"]])] != solo[r["i"]][: len(r["ids"])]]
    ms = sorted(t for r in results for t in r["ms"])
    q = statistics.quantiles(ms, n=20) if len(ms) >= 2 else ms * 19
    print(json.dumps({
        "sessions": args.sessions, "clicks_each": args.clicks, "seconds": round(seconds, 1),
        "click_to_K_ms": {"p50": round(statistics.median(ms)), "p95": round(q[18]), "max": round(ms[-1])},
        "server_rss_mib": {"before": round(rss_before), "after": round(rss_after)},
        "sessions_differing_from_solo": differ,
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=1))
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
