"""Real-browser tests: `streamlit run app.py` driven in Debian chromium.

What AppTest cannot see: the page renders in a browser, the Next step button reaches the server,
the K heatmap drawn by Plotly in the DOM gains one row per click, and a deep link works as the
first request of a fresh server (Streamlit's legacy `pages/` mode, see `kvviz/ui/kit.py`).
Skipped locally without chromium (the `chromium` fixture); CI installs it and runs these.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvviz.ui.kit import PAGES
from scripts.browser import IDLE, K_ROWS_JS, free_port, launch, start_app, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KVVIZ_ARTIFACTS", ROOT / "artifacts"))  # gitignored; CI can upload it


@contextmanager
def fresh_server(log_path: Path) -> Iterator[str]:
    """`streamlit run app.py` on a free port (bundled model), stopped on exit."""
    port = free_port()
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


@pytest.fixture
def app_url(tmp_path):
    with fresh_server(tmp_path / "streamlit.log") as url:
        yield url


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
            page.goto(app_url + "/", timeout=120_000)
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


VIEW_JS = "() => { const r = document.querySelector('.kvsv'); return r ? {...r.dataset} : null; }"
CHART_BOXES_JS = """() => [...document.querySelectorAll('.kvsv [data-chart]')]
  .filter(e => e.offsetParent !== null && e.getBoundingClientRect().width > 0 && e.getBoundingClientRect().height > 0)
  .map(e => { const b = e.getBoundingClientRect(); return [e.dataset.chart, b.left, b.top, b.right, b.bottom]; })"""


def overlaps(boxes: list) -> list[tuple[str, str]]:
    """Pairs of drawn charts whose rectangles intersect by more than a pixel."""
    out = []
    for i, (a, *ra) in enumerate(boxes):
        for b, *rb in boxes[i + 1:]:
            if min(ra[2], rb[2]) - max(ra[0], rb[0]) > 1 and min(ra[3], rb[3]) - max(ra[1], rb[1]) > 1:
                out.append((a, b))
    return out


def test_step_view_plays_in_the_browser_holds_still_restores_from_its_url_and_fits_a_phone(chromium, app_url):
    """Issue 11 in a real browser: Next never moves; Play animates every recorded step with no script run on the
    server while it plays; the page's URL rebuilds the same run; at 390 px no chart covers another."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url + "/step_through", timeout=120_000)
            page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=120_000)
            rows = page.evaluate(K_ROWS_JS)
            nxt = page.get_by_role("button", name="Next step")
            before = nxt.bounding_box()
            nxt.click()
            page.wait_for_function(f"({K_ROWS_JS})() === {rows + 1}", timeout=60_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            assert nxt.bounding_box() == before  # the button never moves under the pointer

            page.get_by_role("button", name="Play").click()
            page.wait_for_function("() => document.querySelector('.kvsv').dataset.playing === '1'", timeout=60_000)
            runs_playing = page.evaluate(VIEW_JS)["runs"]  # the payload Play asked for has arrived
            page.wait_for_function("() => document.querySelector('.kvsv').dataset.playing === '0'", timeout=120_000)
            view = page.evaluate(VIEW_JS)
            assert int(view["frames"]) >= 10, view  # default 24 new tokens: 22 steps left to animate
            assert view["runs"] == runs_playing, view  # no script run on the server while it played
            assert page.evaluate(K_ROWS_JS) > rows + 10

            shown = view["view"]
            # 400 ms after Play stops the view tells the server its step, which writes it into the URL
            page.wait_for_function(f"() => new URLSearchParams(location.search).get('step') === '{shown}'", timeout=60_000)
            url = page.url
            again = browser.new_page(viewport={"width": 1400, "height": 1000})
            again.goto(url, timeout=120_000)
            again.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=120_000)
            again.wait_for_selector(IDLE, timeout=60_000)
            assert again.evaluate(VIEW_JS)["view"] == shown  # the same step of the same run
            assert again.evaluate(K_ROWS_JS) == page.evaluate(K_ROWS_JS)

            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.goto(url, timeout=120_000)
            phone.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=120_000)
            phone.wait_for_selector(IDLE, timeout=60_000)
            phone.wait_for_timeout(1000)
            boxes = phone.evaluate(CHART_BOXES_JS)
            assert len(boxes) >= 4 and not overlaps(boxes), (boxes, overlaps(boxes))
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            phone.screenshot(path=str(ARTIFACTS / "step_through_390.png"), full_page=True)
            assert not errors, errors
        finally:
            browser.close()


# the heading each page shows when it rendered (st.title)
HEADINGS = {"home": "kvviz — watch the KV cache", "step_through": "Step through", "bug_lab": "Bug lab",
            "cost": "Cache vs recompute", "memory": "Memory per token", "paged": "Paged & shared-prefix caches",
            "serving": "Serving: reuse, speculate, beam",
            "quiz": "Check yourself"}


def test_every_page_deep_linked_as_the_first_request_of_a_fresh_server(chromium, tmp_path):
    """Guards the pages/ trap: a deep link on a fresh server runs the page without app.py.

    Each page must still show its content, the shared model sidebar and the real menu (every
    title of kit.PAGES), and on the step page the first click after the deep link must count.
    """
    from playwright.sync_api import sync_playwright

    titles = [title for _file, title, _icon in PAGES]
    assert sorted(HEADINGS) == sorted(Path(f).stem for f, _t, _i in PAGES)
    with sync_playwright() as p:
        browser = launch(p, chromium)
        try:
            for stem, heading in HEADINGS.items():
                with fresh_server(tmp_path / f"{stem}.log") as url:
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    errors: list[str] = []
                    page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                    page.goto(f"{url}/{'' if stem == 'home' else stem}", timeout=120_000)
                    page.get_by_role("heading", name=heading).wait_for(timeout=120_000)
                    page.wait_for_selector(IDLE, timeout=120_000)
                    sidebar = page.locator("[data-testid='stSidebar']")
                    assert sidebar.get_by_text("Model", exact=True).count(), f"{stem}: no shared sidebar"
                    menu = page.locator("[data-testid='stSidebarNav']").inner_text()
                    assert all(t in menu for t in titles), f"{stem}: menu {menu!r}"
                    if stem == "step_through":  # the first click after the deep link is not lost
                        page.wait_for_function(f"({K_ROWS_JS})() > 0", timeout=60_000)
                        rows = page.evaluate(K_ROWS_JS)
                        page.get_by_role("button", name="Next step").click()
                        page.wait_for_function(f"({K_ROWS_JS})() === {rows + 1}", timeout=60_000)
                    assert not page.locator("[data-testid='stException']").count(), stem
                    assert not errors, (stem, errors)
                    page.close()
        finally:
            browser.close()


def plain_marker(markdown: str) -> str:
    """The longest stretch of an explanation that renders as the same plain text (no markdown, no entities)."""
    pieces = re.split(r"[*`\\_\n&<>“”]", markdown)
    return max((p.strip() for p in pieces), key=len)


# true once the quiz's "Link to this question" names another question than `prev`
QUESTION_CHANGED_JS = """(prev) => {
  const a = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === 'Link to this question');
  return !!a && !a.href.endsWith('q=' + prev);
}"""


def test_quiz_answers_reach_the_browser_only_after_answering(chromium, app_url, bundled):
    """Mystery-mode discipline for the quiz: no explanation of any question is in the page's HTML until
    that question is answered, through every question of the session; answering shows it."""
    from playwright.sync_api import sync_playwright

    from kvviz.quiz import bank
    from kvviz.quiz.live import live_run

    questions = {q.id: q for q in bank.questions(live_run(bundled))}
    markers = {qid: plain_marker(q.explanation) for qid, q in questions.items()}
    assert all(len(m) >= 20 for m in markers.values()), markers
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p, chromium)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url + "/quiz", timeout=120_000)
            page.get_by_role("heading", name="Check yourself").wait_for(timeout=300_000)
            seen = []
            for i in range(len(questions)):
                page.wait_for_selector(IDLE, timeout=120_000)
                href = page.get_by_role("link", name="Link to this question").get_attribute("href")
                seen.append(re.search(r"q=([a-z0-9-]+)", href).group(1))
                html, text = page.content(), page.inner_text("body")
                leaked = [qid for qid, m in markers.items() if m in html or m in text]
                assert not leaked, (seen[-1], leaked)
                if i < len(questions) - 1:
                    page.get_by_role("button", name="Next").click()
                    page.wait_for_function(QUESTION_CHANGED_JS, arg=seen[-1], timeout=60_000)
            assert sorted(seen) == sorted(questions), seen  # every question came by, in this session's order
            # a linked question (a teacher's URL), answered right: now its explanation is there
            q = questions["tenth-token-keys"]
            page.goto(app_url + "/quiz?q=tenth-token-keys", timeout=120_000)
            page.get_by_text("linked on its own").wait_for(timeout=120_000)
            page.wait_for_selector(IDLE, timeout=120_000)
            assert markers[q.id] not in page.content()
            page.get_by_text(q.options[q.answer[0]], exact=True).click()
            page.get_by_role("button", name="Check my answer").click()
            page.get_by_text("Right.").wait_for(timeout=60_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            assert markers[q.id] in page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "quiz_browser.png"), full_page=True)
            assert not page.locator("[data-testid='stException']").count()
            assert not errors, errors
        finally:
            browser.close()
