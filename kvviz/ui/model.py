"""The shared model and the sidebar that picks it.

- The model is loaded once per process with `st.cache_resource` and shared read-only by every
  browser session; nothing here mutates it.
- Which model a session uses is per session (`model_name` in `state.py`).
- A failed load keeps the previous model working and says why in the sidebar.
"""

from __future__ import annotations

import os

import streamlit as st

from kvviz.engine.models import SUGGESTED_MODELS, LoadedModel, ModelLoadError, allowed_models, load_model, pick_device
from kvviz.ui import state


@st.cache_resource(show_spinner="Loading the model (once per server)…", max_entries=3)
def get_model(name: str) -> LoadedModel:
    """The process-wide shared model for `name` (errors are not cached, so a retry reloads)."""
    set_torch_threads()
    return load_model(name)


def set_torch_threads() -> None:
    """CPU threads per forward for the whole server: KVVIZ_TORCH_THREADS, default 1.

    A batch-1 decode step of a small model is too short to split across threads: on this 2-core
    machine under load, changing the Bug lab's variant took 5-10 s with torch's default 2 threads
    and ~2 s with 1 (each session's forwards also run in their own server threads)."""
    import torch

    raw = os.environ.get("KVVIZ_TORCH_THREADS", "").strip()
    threads = int(raw) if raw.isdigit() and int(raw) > 0 else 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def current_model() -> LoadedModel:
    """The model this session selected (the sidebar guarantees it loaded)."""
    state.init()
    return get_model(st.session_state["model_name"])


def require_model(what: str) -> LoadedModel:
    """The session's model, or an error naming `what` could not be shown, and the page stops.

    A page calls this once at the top: a model that fails to load leaves a message, never a crash."""
    try:
        return current_model()
    except ModelLoadError as e:
        st.error(f"No model loaded, so {what} cannot be shown: {e}")
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
    try:
        get_model(name)
    except ModelLoadError as e:
        st.session_state["model_error"] = str(e)
        return
    st.session_state["model_name"] = name
    st.session_state["model_error"] = None


def model_sidebar() -> LoadedModel | None:
    """The shared sidebar block: model picker, device, load errors. Returns the working model."""
    state.init()
    with st.sidebar:
        st.markdown("### Model")
        allowed = allowed_models()  # a shared deployment's KVVIZ_ALLOWED_MODELS: offer exactly those
        options = list(allowed) if allowed is not None else [*SUGGESTED_MODELS, "other…"]
        current = st.session_state["model_name"]
        index = options.index(current) if current in options else len(options) - 1
        st.selectbox(
            "Model", options, index=index, key="model_choice", on_change=_on_model_change,
            help="'bundled' is a small Llama trained on Jane Austen, shipped with kvviz (works offline). "
            "The others download from the Hugging Face hub and need internet.",
        )
        if allowed is not None:
            st.caption(f"This deployment allows only: {', '.join(allowed)}.")
        if st.session_state.get("model_choice") == "other…":
            if "model_custom" not in st.session_state and current not in SUGGESTED_MODELS:
                st.session_state["model_custom"] = current
            st.text_input(
                "Hub id or local checkpoint path", key="model_custom", on_change=_on_custom_model,
                placeholder="e.g. HuggingFaceTB/SmolLM2-135M or /path/to/checkpoint",
            )
        if st.session_state["model_error"]:
            st.error(st.session_state["model_error"] + f"\n\nStill using **{st.session_state['model_name']}**.")
        try:
            lm = get_model(st.session_state["model_name"])
        except ModelLoadError as e:
            st.error(str(e))
            return None
        info = lm.info
        st.caption(
            f"**{info.name}** · {info.model_type} · {info.num_layers} layers · {info.num_heads} heads / "
            f"{info.num_key_value_heads} KV heads ({info.attention_kind}) · context {info.max_positions}  \n"
            f"device **{info.device}** ({info.dtype}); best available here: {pick_device().type}"
        )
    return lm
