"""kvviz: the Streamlit entry point. Navigation over pages/; each page sets itself up (`kvviz.ui.kit.page`).

Run: streamlit run app.py
"""

from __future__ import annotations

from kvviz.ui import kit

kit.run_app()
