"""The shape of a KV cache, from a model's config: pure arithmetic, no torch, no transformers.

This is the bottom of kvviz: the engine (`engine/`), the serving economics (`economics/`) and
the figures all read a model's cache geometry from here, so they agree on every number.

Per token the cache stores one key and one value vector per layer and per KV head:
    bytes_per_token = 2 * num_layers * num_key_value_heads * head_dim * bytes_per_element
(the 2 is K and V). Multiply by tokens and batch for a sequence or a batch.

`kv_geometry` reads the config of every common family: the fields are named differently
(GPT-2: n_layer/n_head/n_embd; Falcon: multi_query/num_kv_heads; Gemma: an explicit head_dim that
is *not* hidden_size / num_heads), and missing KV-head counts mean plain multi-head attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# a model whose config names no context length is treated as having this many positions
DEFAULT_CONTEXT = 2048

# bytes per stored element for the cache dtypes people use (int4 ignores the per-group scales
# a real quantised cache also keeps: a few % more)
DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}
# short names people type -> the keys above
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
}
# the choices offered in the UI and the CLI
CACHE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "fp8", "int4")


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one model's KV cache."""

    model_type: str
    num_layers: int
    num_heads: int  # query heads
    num_key_value_heads: int  # KV heads: = num_heads (MHA), 1 (MQA), in between (GQA)
    head_dim: int
    hidden_size: int
    max_positions: int  # the model's context length (0 if the config does not say)
    vocab_size: int = 0

    @property
    def attention_kind(self) -> str:
        return attention_kind(self.num_heads, self.num_key_value_heads)

    @property
    def group_size(self) -> int:
        """Query heads per KV head: 1 = MHA, num_heads = MQA, in between = GQA."""
        return max(1, self.num_heads // self.num_key_value_heads)

    @property
    def context_length(self) -> int:
        """Positions the model takes: its config's, or DEFAULT_CONTEXT when the config does not say."""
        return self.max_positions or DEFAULT_CONTEXT

    def elements_per_token(self) -> int:
        """Cached numbers per token: K and V, every layer, every KV head."""
        return 2 * self.num_layers * self.num_key_value_heads * self.head_dim

    def bytes_per_token(self, dtype: str = "float16") -> int:
        """2 (K and V) x layers x KV heads x head_dim x bytes per element."""
        return int(self.elements_per_token() * dtype_bytes(dtype))

    def total_bytes(self, tokens: int, batch: int = 1, dtype: str = "float16") -> int:
        return self.bytes_per_token(dtype) * tokens * batch

    def max_tokens(self, budget_bytes: int, dtype: str = "float16") -> int:
        """How many cached tokens (summed over the batch) fit in `budget_bytes`."""
        return max(0, int(budget_bytes // self.bytes_per_token(dtype)))

    def with_kv_heads(self, num_key_value_heads: int) -> KVGeometry:
        """The same model with another KV-head count (what MHA/GQA/MQA would cost)."""
        if num_key_value_heads < 1 or self.num_heads % num_key_value_heads:
            raise ValueError(
                f"{num_key_value_heads} KV heads do not divide {self.num_heads} query heads; "
                f"pick a divisor of {self.num_heads}"
            )
        return dataclasses.replace(self, num_key_value_heads=num_key_value_heads)

    def variants(self) -> dict[str, KVGeometry]:
        """MHA, GQA and MQA versions of this model, keyed by a label (the model's own is marked).

        The GQA variant is the model's own grouping if it uses GQA, else 8 KV heads (Llama-3 /
        Mistral's choice) or, for models with fewer heads, the largest divisor below num_heads.
        """
        h = self.num_heads
        if self.attention_kind == "GQA":
            gqa = self.num_key_value_heads
        else:
            below = [d for d in range(2, h) if h % d == 0]
            gqa = 8 if 8 in below else (max((d for d in below if d <= h // 2), default=0))
        out: dict[str, KVGeometry] = {}
        for kind, kv in (("MHA", h), ("GQA", gqa), ("MQA", 1)):
            if kv < 1 or (kind == "GQA" and kv in (1, h)):
                continue  # no GQA between MHA and MQA for this head count (e.g. 2 heads)
            label = f"{kind} ({kv} KV head{'s' if kv > 1 else ''})"
            if kv == self.num_key_value_heads:
                label += " ← this model"
            out[label] = self.with_kv_heads(kv)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "attention": self.attention_kind}


def attention_kind(num_heads: int, num_key_value_heads: int) -> str:
    """MHA (one KV head per query head), MQA (one KV head for all) or GQA (groups in between)."""
    if num_key_value_heads == num_heads:
        return "MHA"
    if num_key_value_heads == 1:
        return "MQA"
    return "GQA"


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a cache dtype ("float16", "fp16", "torch.bfloat16", "int4", ...)."""
    return DTYPE_BYTES[normalize_dtype(dtype)]


def quantized_bytes_per_element(bits: int, group_size: int, scale_bytes: float = 2, zero_point: bool = False) -> float:
    """Bytes per cached element of a block-quantised format, its scales included.

    Each group of `group_size` values stores `bits` per value plus one scale of `scale_bytes` (and,
    when asymmetric, a zero point / minimum of the same size):
        bits / 8 + scale_bytes * (2 if zero_point else 1) / group_size
    llama.cpp: q8_0 (8, 32) -> 1.0625 B (8.5 bits), q4_0 (4, 32) -> 0.5625 B (4.5 bits).
    """
    if bits < 1 or group_size < 1:
        raise ValueError(f"bits and group size must be positive, got bits={bits}, group_size={group_size}")
    return bits / 8 + scale_bytes * (2 if zero_point else 1) / group_size


def normalize_dtype(dtype: str) -> str:
    key = str(dtype).replace("torch.", "").strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
    return key


def _first(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _num_kv_heads(cfg: dict[str, Any], num_heads: int) -> int:
    """KV heads, including the two flags that override an explicit count.

    Falcon: `new_decoder_architecture` (40B/180B) uses `num_kv_heads`; otherwise `multi_query`
    (7B) means one KV head, even though FalconConfig fills `num_kv_heads` with num_heads.
    GPT-BigCode (StarCoder) has `multi_query` too and no count at all.
    """
    explicit = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if cfg.get("new_decoder_architecture"):
        return int(explicit or num_heads)
    if cfg.get("multi_query"):
        return 1
    return int(explicit or num_heads)


def kv_geometry(config: Any) -> KVGeometry:
    """Read a config (a transformers config object or its dict) of any common decoder family."""
    cfg: dict[str, Any] = config if isinstance(config, dict) else config.to_dict()
    if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg.get("model_type", cfg["text_config"].get("model_type"))}
    model_type = str(cfg.get("model_type", "unknown"))
    num_layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    num_heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", "dim")
    if num_layers is None or num_heads is None or hidden is None:
        raise ValueError(
            f"config of type {model_type!r} does not say its number of layers, heads and hidden size "
            "(looked for num_hidden_layers/n_layer, num_attention_heads/n_head, hidden_size/n_embd)"
        )
    num_kv = _num_kv_heads(cfg, int(num_heads))
    head_dim = cfg.get("head_dim") or hidden // num_heads
    max_positions = _first(cfg, "max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len", default=0)
    return KVGeometry(
        model_type=model_type,
        num_layers=int(num_layers),
        num_heads=int(num_heads),
        num_key_value_heads=int(num_kv),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        max_positions=int(max_positions),
        vocab_size=int(cfg.get("vocab_size") or 0),
    )


def geometry_from_numbers(
    num_layers: int, num_key_value_heads: int, head_dim: int, num_heads: int | None = None, max_positions: int = 0
) -> KVGeometry:
    """A geometry typed in by hand (no config). Query heads default to the KV heads (MHA)."""
    for name, v in (("layers", num_layers), ("KV heads", num_key_value_heads), ("head_dim", head_dim)):
        if int(v) < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    heads = int(num_heads or num_key_value_heads)
    if heads % int(num_key_value_heads):
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({num_key_value_heads})")
    return KVGeometry(
        model_type="custom", num_layers=int(num_layers), num_heads=heads, num_key_value_heads=int(num_key_value_heads),
        head_dim=int(head_dim), hidden_size=heads * int(head_dim), max_positions=int(max_positions),
    )


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as GPU memory is reported)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
