"""The three places where serving stacks get the cache wrong, as overridable hooks.

The serving code calls these and nothing else for the operations a bug could break:
- `block_key`  names a prefix block (reuse.py): a wrong key serves another prompt's rows,
- `rollback`   removes rejected draft rows (speculative.py): skipped, the rejected rows stay,
- `reorder`    follows the surviving beams (beam.py): skipped, a beam reads another beam's history.
The defaults are exact. A serving variant (a subclass registered in `kvviz.variants`) overrides
one hook, as cache variants override `kvviz.engine.variant.CacheVariant`'s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvviz.engine.cache import KVVizCache


class ServingHooks:
    """Exact serving. Subclasses override one hook each."""

    name = "exact"

    def block_key(self, parent: bytes, token_ids: Sequence[int]) -> bytes:
        """A full block's name, chained as vLLM's prefix caching does: H(parent's name, the block's ids).

        Chaining makes equal names mean equal prefixes, not merely equal blocks; sha256 (not Python's
        `hash`) so a crafted prompt cannot collide with another's block."""
        data = parent + b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids)
        return hashlib.sha256(data).digest()[:16]

    def rollback(self, cache: KVVizCache, rejected: int) -> None:
        """Remove the rows of `rejected` draft tokens from the end of the cache.

        Called after every verification, even with 0 (as transformers' assisted decoding does: on
        sliding-window layers crop(0) trims the rows recorded past the window)."""
        cache.crop(-rejected)

    def reorder(self, cache: KVVizCache, beam_idx: torch.Tensor) -> None:
        """Make beam slot b continue from the rows of slot beam_idx[b] (beam_idx: (num_beams,))."""
        cache.reorder_cache(beam_idx)


EXACT = ServingHooks()
