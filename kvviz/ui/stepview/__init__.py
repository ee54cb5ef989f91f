"""The step view as a Streamlit component: the whole run goes to the browser, which draws any step.

Why a component and not `st.plotly_chart`: Play and the slider must move K, V, q′k′v′, the
attention and the top-k together at 10+ steps a second, which a server round trip per frame
cannot do (it took 0.9–2.6 s per frame). `view.js` draws with plotly.js from the data
`kvviz.figures.step.step_view_payload` builds, and sends back only actions (`action` trigger):
next / play / reset / view / tab.

plotly.js is not fetched from a CDN: it is the copy inside the installed `plotly` package, served
by Streamlit's static serving (`.streamlit/config.toml`: `server.enableStaticServing = true`) from
`static/plotly.min.js`, which `ensure_plotly_js` copies there (the file is not committed). The
same view also exports as one offline HTML page (`standalone_html`).

Built with `st.components.v2.component` (Streamlit 1.67): no iframe, no Node build.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
STATIC = ROOT / "static"  # Streamlit serves <entry script dir>/static at /app/static
NAME = "kvviz_step_view"


def plotly_js_path() -> Path:
    """The plotly.min.js shipped inside the installed plotly package."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def ensure_plotly_js(static_dir: Path = STATIC) -> Path | None:
    """Copy the plotly package's plotly.min.js into the app's static folder when missing or stale.

    Returns the copy, or None when the folder is not writable (a read-only install): the view then
    says plotly.js could not be loaded, and how to serve it.
    """
    source = plotly_js_path()
    target = static_dir / "plotly.min.js"
    try:
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            static_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)  # atomic: a browser never gets half a file
        return target
    except OSError:
        return None


def _asset(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


@st.cache_resource(show_spinner=False)
def _component() -> Any:
    """Registered once per process (the JS and CSS are read once too)."""
    ensure_plotly_js()
    return st.components.v2.component(NAME, html="<div class='kvsv-root'></div>", css=_asset("view.css"),
                                      js=_asset("view.js"), isolate_styles=False)


def step_view(payload: dict[str, Any], *, key: str, on_action: Callable[[], None]) -> None:
    """Mount the view. `on_action` runs (before the rerun) when the browser sends an action; read it
    with `action_of(key)`."""
    _component()(data=payload, key=key, on_action_change=on_action, width="stretch", height="content")


def action_of(key: str) -> dict[str, Any] | None:
    """The action the view just sent (inside its `on_action` callback), or None."""
    value = st.session_state.get(key)
    action = value.get("action") if hasattr(value, "get") else None
    return action if isinstance(action, dict) else None


def standalone_html(payload: dict[str, Any], title: str) -> str:
    """The step view as one self-contained HTML page: plotly.js, the view and the run inlined (opens offline).

    The run plays, scrubs and switches tabs as on the page; there is no model behind it, so Next
    stops at the last recorded step.
    """
    js = _asset("view.js").replace("export default function", "function kvvizComponent")
    data = json.dumps(payload).replace("</", "<\\/")  # no "</script>" inside the JSON
    plotly_js = plotly_js_path().read_text(encoding="utf-8")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_asset('view.css')} body{{margin:16px;font-family:sans-serif}}</style>"
        f"<script>{plotly_js}</script></head><body><h2 style='font-size:18px'>{html.escape(title)}</h2>"
        f"<div id='kvsv'></div><script>{js}\nwindow.kvvizStepView(document.getElementById('kvsv'), {data});</script>"
        "</body></html>"
    )
