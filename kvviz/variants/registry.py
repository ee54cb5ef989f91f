"""The one registry of cache variants: every cache that differs from the exact one, with a kind.

- `bug`: an accident modelled on a real project's bug (bugs.py);
- `eviction`: a policy that keeps only some rows on purpose (eviction.py);
- `quantization`: a cache stored in fewer bits on purpose (quantization.py).

A variant is a `kvviz.engine.variant.CacheVariant` (the hooks the engine calls at its seams) with
catalogue fields: what it is, what you see, what it is modelled on (papers and issues), which
parameters it takes, and which scopes it honours. Everything a page, the CLI or a diagnosis knows
about a variant comes from here (`info()`, `citation_markdown()`, `problem()`), never from its name.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from kvviz.engine.variant import SCOPES, CacheVariant
from kvviz.geometry import KVGeometry

KINDS = ("bug", "eviction", "quantization")
KIND_LABELS = {"bug": "bug", "eviction": "eviction (a trade-off)", "quantization": "quantization (a trade-off)"}
# Which piece of evidence (see `explain.py`) identifies a variant: the clue Mystery mode reveals.
CLUES = ("lengths", "shifted_rows", "extra_rows", "positions", "swapped", "kv_head_of", "prefill_mask",
         "quantisation", "evicted")
# families whose positions are learned embeddings added before layer 0 (no RoPE to re-position keys with)
LEARNED_POSITIONS = frozenset({"gpt2", "gpt_bigcode", "gpt_neo", "opt", "biogpt", "xglm", "bloom", "mpt", "falcon"})


@dataclass(frozen=True)
class Param:
    """A parameter a variant takes (a dataclass field of the same name), described for forms and the CLI."""

    name: str
    label: str
    help: str
    choices: tuple[Any, ...] | None = None  # None: an integer >= minimum
    minimum: int = 1


@dataclass(frozen=True)
class Variant(CacheVariant):
    """A catalogued variant: the hooks plus what a learner reads about it."""

    name: ClassVar[str] = "none"
    title: ClassVar[str] = "Correct cache"
    kind: ClassVar[str] = "bug"  # one of KINDS
    description: ClassVar[str] = "K <- [K; k'], V <- [V; v'] at every step, positions advance."
    corrupts: ClassVar[str] = "nothing"
    symptom: ClassVar[str] = "none: cached logits equal a full recompute"  # what you see
    source: ClassVar[str] = ""  # what it is modelled on, in words (names every linked issue as owner/repo#n)
    source_urls: ClassVar[tuple[str, ...]] = ()  # GitHub issues/PRs and papers (arxiv.org/abs/...)
    clue: ClassVar[str] = ""  # one of CLUES: the evidence that gives it away
    params: ClassVar[tuple[Param, ...]] = ()
    positions_note: ClassVar[str] = ""  # eviction: what happens to positions once rows are gone

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "title": cls.title,
            "kind": cls.kind,
            "description": cls.description,
            "corrupts": cls.corrupts,
            "symptom": cls.symptom,
            "source": cls.source,
            "source_urls": list(cls.source_urls),
            "clue": cls.clue,
            "params": {p.name: _default(cls, p.name) for p in cls.params},
            "scopes": list(cls.scopes),
            "scope_notes": dict(cls.scope_notes),
            "positions_note": cls.positions_note,
        }

    def problem(self, geometry: KVGeometry) -> str | None:
        """Why this variant, with its parameters, cannot act on a model of this geometry (None: it can)."""
        return None

    def parameters(self) -> dict[str, Any]:
        """This instance's parameter values, by name."""
        return {p.name: getattr(self, p.name) for p in self.params}

    def cache_bytes_per_element(self, exact: float) -> float:
        """Bytes one cached K or V element costs, given `exact` bytes for the model's own dtype."""
        return exact

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        """What this variant keeps about one layer that a view can show (numpy arrays), e.g. which text
        tokens its rows hold. Default: nothing (an append-only cache holds tokens 0..n-1)."""
        return {}


def _default(cls: type[Variant], name: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


REGISTRY: dict[str, type[Variant]] = {}


def register(cls: type[Variant]) -> type[Variant]:
    assert cls.kind in KINDS and cls.clue in CLUES, (cls.name, cls.kind, cls.clue)
    assert set(cls.scopes) <= set(SCOPES) and set(cls.scope_notes) == set(SCOPES) - set(cls.scopes), cls.name
    REGISTRY[cls.name] = cls
    return cls


def entries(kind: str | None = None) -> list[type[Variant]]:
    """Registered variants, bugs first, then eviction, then quantization (registration order within)."""
    _load()
    found = [cls for cls in REGISTRY.values() if kind is None or cls.kind == kind]
    return sorted(found, key=lambda cls: KINDS.index(cls.kind))


def names(kind: str | None = None) -> list[str]:
    return [cls.name for cls in entries(kind)]


def get_variant(name: str | CacheVariant | None, **params: Any) -> CacheVariant | None:
    """A variant instance by name, with parameters; None or "none" = the exact cache.

    Unknown names or parameters raise ValueError naming the valid ones."""
    if name is None or isinstance(name, CacheVariant):
        return name
    if name == "none":
        return None
    _load()
    if name not in REGISTRY:
        raise ValueError(f"unknown cache variant {name!r}; choose one of: none, {', '.join(names())}")
    cls = REGISTRY[name]
    allowed = {p.name for p in cls.params}
    extra = sorted(set(params) - allowed)
    if extra:
        raise ValueError(f"{name} takes no parameter {', '.join(extra)}; its parameters: {', '.join(sorted(allowed)) or 'none'}")
    variant = cls(**params)
    check_parameters(variant)
    return variant


def check_parameters(variant: CacheVariant) -> None:
    """Refuse parameter values outside what a variant declares (choices, minimum), naming the fix."""
    for p in getattr(variant, "params", ()):
        value = getattr(variant, p.name)
        if p.choices is not None and value not in p.choices:
            raise ValueError(f"{variant.name}: {p.name} must be one of {', '.join(map(str, p.choices))}, got {value!r}")
        if p.choices is None and (not isinstance(value, int) or value < p.minimum):
            raise ValueError(f"{variant.name}: {p.name} must be a whole number >= {p.minimum}, got {value!r}")


def catalogue(kind: str | None = None) -> list[dict[str, Any]]:
    return [cls.info() for cls in entries(kind)]


def links(cls: type[Variant]) -> list[tuple[str, str]]:
    """(label, url) of each source: owner/repo#n for GitHub, arXiv:id for papers."""
    out = []
    for url in cls.source_urls:
        parts = url.rstrip("/").split("/")
        if "github.com" in url:  # https: '' github.com owner repo issues|pull N
            out.append((f"{parts[3]}/{parts[4]}#{parts[6]}", url))
        elif "arxiv.org" in url:
            out.append((f"arXiv:{parts[-1]}", url))
        else:
            out.append((url, url))
    return out


def citation_markdown(cls: type[Variant]) -> str:
    """The sources as Markdown links (one format for the README, the pages and the CLI)."""
    return ", ".join(f"[{label}]({url})" for label, url in links(cls))


def markdown_table(kind: str | None = None) -> str:
    """The README's catalogue table, rendered from the registry (a test keeps README.md in sync)."""
    lines = [
        "| name | kind | what it does | what you see | modelled on |",
        "|---|---|---|---|---|",
    ]
    for cls in entries(kind):
        params = ", ".join(f"{k}={v}" for k, v in cls.info()["params"].items())
        name = f"`{cls.name}`" + (f" ({params})" if params else "")
        row = [name, cls.kind, cls.description, cls.symptom, citation_markdown(cls)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def _load() -> None:
    """Register every entry (the modules register themselves on import)."""
    from kvviz.variants import bugs, eviction, quantization  # noqa: F401
