"""The shared model and the sidebar that picks it.

- The model is loaded once per process with `st.cache_resource` and shared read-only by every
  browser session; nothing here mutates it.
- Which model a session uses is per session (`model_name` in `state.py`).
- A failed load keeps the previous model working and says why in the sidebar.
- With an allow-list (KVVIZ_ALLOWED_MODELS) the picker offers exactly the listed models and no
  free text; a session whose model is not (or no longer) listed moves to the deployment's start
  model (the default if listed, else the first listed).
"""

from __future__ import annotations

import os

import streamlit as st

from kvviz.engine.models import SUGGESTED_MODELS, LoadedModel, allowed_models, is_allowed, load_model, pick_device
from kvviz.ui import state
from kvviz.ui.text import escape
from kvviz.validate import InputError, settings


@st.cache_resource(show_spinner="Loading the model (once per server)…", max_entries=3)
def get_model(name: str) -> LoadedModel:
    """The process-wide shared model for `name` (errors are not cached, so a retry reloads)."""
    return load_model(name)


def session_model_name() -> str:
    """The model name this session uses, moved to the deployment's start model if it is not allowed."""
    state.init()
    name = st.session_state["model_name"]
    allowed = allowed_models()
    if allowed is not None and name not in allowed:
        name = st.session_state["model_name"] = settings().start_model
    return name


def current_model() -> LoadedModel:
    """The model this session selected (the sidebar guarantees it loaded)."""
    return get_model(session_model_name())


def require_model(what: str) -> LoadedModel:
    """The session's model, or an error naming `what` could not be shown, and the page stops.

    A page calls this once at the top: a model that fails to load leaves a message, never a crash."""
    try:
        return current_model()
    except InputError as e:  # ModelLoadError is one
        st.error(f"No model loaded, so {what} cannot be shown: {escape(str(e))}")
        st.stop()
        raise  # st.stop() raises; this keeps type checkers sure the function never returns None


def _on_model_change() -> None:
    name = (st.session_state.get("model_choice") or "").strip()
    if name == "other…":
        return
    _try_load(name)


def _on_custom_model() -> None:
    _try_load((st.session_state.get("model_custom") or "").strip())


def _try_load(name: str) -> None:
    if not name or name == st.session_state["model_name"]:
        return
    if not is_allowed(name):  # before the cache: a refused name never reaches the loader
        st.session_state["model_error"] = f"model {name[:80]!r} is not allowed on this deployment"
        return
    try:
        get_model(name)
    except InputError as e:  # ModelLoadError is one
        st.session_state["model_error"] = str(e)
        return
    st.session_state["model_name"] = name
    st.session_state["model_error"] = None


def model_sidebar() -> LoadedModel | None:
    """The shared sidebar block: model picker, device, load errors. Returns the working model."""
    current = session_model_name()
    with st.sidebar:
        st.markdown("### Model")
        allowed = allowed_models()  # a shared deployment's KVVIZ_ALLOWED_MODELS: offer exactly those
        options = list(allowed) if allowed is not None else [*SUGGESTED_MODELS, "other…"]
        index = options.index(current) if current in options else len(options) - 1
        st.selectbox(
            "Model", options, index=index, key="model_choice", on_change=_on_model_change,
            help="'bundled' is a small Llama trained on Jane Austen, shipped with kvviz (works offline). "
            "The others download from the Hugging Face hub and need internet.",
        )
        if allowed is not None:
            st.caption(f"This deployment allows only: {', '.join(allowed)}.")  # the operator's list, not user text
        elif st.session_state.get("model_choice") == "other…":
            if "model_custom" not in st.session_state and current not in SUGGESTED_MODELS:
                st.session_state["model_custom"] = current
            st.text_input(
                "Hub id or local checkpoint path", key="model_custom", on_change=_on_custom_model,
                placeholder="e.g. HuggingFaceTB/SmolLM2-135M or /path/to/checkpoint",
            )
        if st.session_state["model_error"]:
            st.error(escape(st.session_state["model_error"]) + f"\n\nStill using **{escape(current)}**.")
        try:
            lm = get_model(current)
        except InputError as e:  # ModelLoadError is one
            st.error(escape(str(e)))
            return None
        info = lm.info
        st.caption(
            f"**{escape(info.name)}** · {escape(info.model_type)} · {info.num_layers} layers · {info.num_heads} heads / "
            f"{info.num_key_value_heads} KV heads ({info.attention_kind}) · context {info.max_positions}  \n"
            f"device **{info.device}** ({info.dtype}); best available here: {pick_device().type}"
        )
    return lm
