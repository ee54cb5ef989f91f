"""The only Streamlit code in kvviz (the rest of the package imports without it).

- `state.py`: every session-state key of every page, with its initial value, in one place;
- `model.py`: the shared model (loaded once per process, `st.cache_resource`) and its sidebar;
- `kit.py`: what every page repeats: the page setup (so a page works when deep-linked on a fresh
  server), the navigation, charts, pickers and the Play timer.
"""
