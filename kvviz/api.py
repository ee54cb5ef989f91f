"""The public entry points that take a cache variant by name ("stale_cache", "h2o", "int4_cache").

The engine knows only the variant interface (`kvviz.engine.variant`); names are looked up in the
registry (`kvviz.variants.registry`) here, at the top, so the engine never imports the registry.
"""

from __future__ import annotations

from typing import Any

from kvviz.engine import session as engine
from kvviz.engine.models import LoadedModel
from kvviz.engine.trace import Trace
from kvviz.engine.variant import CacheVariant
from kvviz.validate import InputError
from kvviz.variants.paired import PairedSession
from kvviz.variants.registry import get_variant

__all__ = ["PairedSession", "Session", "trace"]


def _variant(bug: str | CacheVariant | None, params: dict[str, Any] | None) -> CacheVariant | None:
    """A registry name (with `params`) looked up, an object passed through; anything else refused in one line."""
    if bug is None or isinstance(bug, CacheVariant):
        return bug
    if not isinstance(bug, str):
        raise InputError(f"bug must be a registry name, a cache variant or None, got {type(bug).__name__}")
    try:
        return get_variant(bug, **(params or {}))
    except ValueError as e:  # an unknown name or parameter: the message lists the valid ones
        raise InputError(str(e)) from None


class Session(engine.Session):
    """`kvviz.engine.session.Session` whose `bug` may also be a registry name (or "none"), with `params`.

        kvviz.Session(lm, prompt, 16, bug="h2o", params={"budget": 32})
    """

    def __init__(self, lm: LoadedModel, prompt: str, max_new_tokens: int = 16, *,
                 bug: str | CacheVariant | None = None, params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(lm, prompt, max_new_tokens, bug=_variant(bug, params), **kwargs)


def trace(lm: LoadedModel, prompt: str, steps: int = 16, *, bug: str | CacheVariant | None = None,
          params: dict[str, Any] | None = None, **kwargs: Any) -> Trace:
    """Run prefill + decode for `steps` new tokens and return the whole recorded Trace."""
    return Session(lm, prompt, steps, bug=bug, params=params, **kwargs).run()
