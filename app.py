"""kvviz: the Streamlit entry point. Page config, the shared sidebar, navigation over views/.

Run: streamlit run app.py
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from kvviz import ui

st.set_page_config(page_title="kvviz — see the KV cache", page_icon=":material/grid_view:", layout="wide")

HERE = Path(__file__).parent
# (file, title, icon) in menu order; a page is listed once its file exists.
PAGES = [
    ("views/home.py", "Home", ":material/home:"),
    ("views/step_through.py", "Step through", ":material/step:"),
    ("views/bug_lab.py", "Bug lab", ":material/bug_report:"),
    ("views/cost.py", "Cache vs recompute", ":material/timer:"),
    ("views/memory.py", "Memory per token", ":material/memory:"),
    ("views/paged.py", "Paged & shared prefix", ":material/view_module:"),
]

nav = st.navigation(
    [st.Page(str(HERE / f), title=t, icon=i, default=(f == "views/home.py")) for f, t, i in PAGES if (HERE / f).exists()]
)
ui.model_sidebar()
nav.run()
