"""What every real-browser run of kvviz needs: start the app, launch Debian chromium, wait, read K.

Shared by `tests/test_browser.py` and the scripts (browser_bench, shot, load_test), so the
chromium flags (this machine's closed network refuses Chromium's background connections), the
"Streamlit is idle" selector and the way the K heatmap is read from the DOM live in one place.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("KVVIZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Streamlit's own browser tests wait for this before they look
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
# Rows of K on screen. kvviz's step view (kvviz/ui/stepview) paints K as an image and says how many
# cached rows it shows in its chart's data-rows; a plain Plotly page (scripts/floor_app.py) holds
# them as the trace named "K", one y label per row.
K_ROWS_JS = """() => {
  const view = document.querySelector('.kvsv [data-chart="K"]');
  if (view && view.dataset.rows !== undefined && view.dataset.rows !== '') return Number(view.dataset.rows);
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    const t = (gd.data || [])[0];
    if (t && t.name === 'K') return t.y.length;
  }
  return -1;
}"""


def free_port(preferred: int | None = None) -> int:
    if preferred:
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, model: str | None = None, log: IO[Any] | int = subprocess.DEVNULL,
              script: str = "app.py", one_thread: bool = True) -> subprocess.Popen:
    """`streamlit run app.py` (or another `script`) on `port` (KVVIZ_DEFAULT_MODEL=`model` if given).

    one_thread: OMP_NUM_THREADS=1 for the whole server (tests); False runs it as the README says,
    leaving torch's threads to kvviz's per-model choice (`kvviz.engine.models.preferred_threads`)."""
    env = dict(os.environ)
    if one_thread:
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    if model:
        env["KVVIZ_DEFAULT_MODEL"] = model
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script, "--server.headless", "true", "--server.port", str(port),
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> float:
    """Seconds until the app answers `ok` on /_stcore/health; raises if it dies or times out."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.read().strip() == b"ok":
                    return time.perf_counter() - t0
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode} before answering at {url}")
        time.sleep(0.1)
    raise RuntimeError(f"streamlit did not answer at {url} within {timeout} s")


def launch(playwright: Any, chromium: str = CHROMIUM) -> Any:
    """Debian's chromium through Playwright (never a downloaded browser)."""
    return playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
