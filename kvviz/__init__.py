"""kvviz: watch a real language model's KV cache grow, token by token, and break it on purpose.

    >>> import kvviz
    >>> lm = kvviz.load_model()                      # the bundled Austen model, offline
    >>> t = kvviz.trace(lm, "It is a truth universally acknowledged, that", 8)
    >>> t.generated_text, t.steps[3].max_abs_logit_diff

No Streamlit here: the app's pages import this package, never the other way round.
"""

from __future__ import annotations

from kvviz.bugs import CacheBug, catalogue, get_bug
from kvviz.models import LoadedModel, ModelLoadError, from_model, load_model
from kvviz.sampling import Sampling
from kvviz.session import InputError, Limits, Session, trace
from kvviz.trace import LayerStep, ModelInfo, Step, TokenProb, Trace

__all__ = [
    "CacheBug",
    "InputError",
    "LayerStep",
    "Limits",
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "Sampling",
    "Session",
    "Step",
    "TokenProb",
    "Trace",
    "catalogue",
    "from_model",
    "get_bug",
    "load_model",
    "trace",
]

__version__ = "0.1.0"
