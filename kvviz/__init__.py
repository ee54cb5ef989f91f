"""kvviz: watch a real language model's KV cache grow, token by token, and break it on purpose.

    >>> import kvviz
    >>> lm = kvviz.load_model()                      # the bundled Austen model, offline
    >>> t = kvviz.trace(lm, "It is a truth universally acknowledged, that", 8)
    >>> t.generated_text, t.steps[3].max_abs_logit_diff

The package, bottom up (each layer imports only those before it):

    geometry.py   the shape and bytes of a KV cache, from a config: pure arithmetic
    engine/       the real model and its exact cache: load, capture, cache, decode, trace
    variants/     caches that differ from the exact one (bugs, eviction, quantization) and the evidence
    economics/    what caching costs and saves: memory per token, cache vs recompute, paged serving
    figures/      Plotly builders: arrays and records in, go.Figure out (no torch, no Streamlit)
    api.py        Session and trace taking a variant by name (the engine takes only objects)
    cli/          `python -m kvviz ...`, one module per subcommand
    ui/           the only Streamlit code: state keys, the shared model, the page kit
    training/     how the bundled model was made; bundled/ is the checkpoint

The names below are imported on first use (PEP 562), so `import kvviz.figures.step` or
`import kvviz.geometry` does not pull in torch or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "load_model": "kvviz.engine.models",
    "from_model": "kvviz.engine.models",
    "LoadedModel": "kvviz.engine.models",
    "ModelLoadError": "kvviz.engine.models",
    "Sampling": "kvviz.engine.sampling",
    "Session": "kvviz.api",
    "Limits": "kvviz.engine.session",
    "InputError": "kvviz.validate",
    "trace": "kvviz.api",
    "Trace": "kvviz.engine.trace",
    "Step": "kvviz.engine.trace",
    "LayerStep": "kvviz.engine.trace",
    "TokenProb": "kvviz.engine.trace",
    "ModelInfo": "kvviz.engine.trace",
    "KVGeometry": "kvviz.geometry",
    "Variant": "kvviz.variants.registry",
    "catalogue": "kvviz.variants.registry",
    "get_variant": "kvviz.variants.registry",
    "PairedSession": "kvviz.variants.paired",
}
__all__ = [
    "InputError",
    "KVGeometry",
    "LayerStep",
    "Limits",
    "LoadedModel",
    "ModelInfo",
    "ModelLoadError",
    "PairedSession",
    "Sampling",
    "Session",
    "Step",
    "TokenProb",
    "Trace",
    "Variant",
    "catalogue",
    "from_model",
    "get_variant",
    "load_model",
    "trace",
]
__version__ = "0.2.0"

if TYPE_CHECKING:
    from kvviz.api import Session, trace
    from kvviz.engine.models import LoadedModel, ModelLoadError, from_model, load_model
    from kvviz.engine.sampling import Sampling
    from kvviz.engine.session import Limits
    from kvviz.engine.trace import LayerStep, ModelInfo, Step, TokenProb, Trace
    from kvviz.geometry import KVGeometry
    from kvviz.variants.paired import PairedSession
    from kvviz.variants.registry import Variant, catalogue, get_variant
    from kvviz.validate import InputError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvviz' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # next time, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
