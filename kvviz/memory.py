"""KV-cache size arithmetic for any decoder config.

Per token the cache stores one key and one value vector per layer and per KV head:
    bytes_per_token = 2 * num_layers * num_key_value_heads * head_dim * bytes_per_element
(the 2 is K and V). Multiply by tokens and batch for a sequence or a batch.

`kv_geometry` reads the config of every common family: the fields are named differently
(GPT-2: n_layer/n_head/n_embd; Falcon: multi_query/num_kv_heads; Gemma: an explicit head_dim that
is *not* hidden_size / num_heads), and missing KV-head counts mean plain multi-head attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# bytes per stored element for the cache dtypes people use
DTYPE_BYTES: dict[str, float] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}


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
        if self.num_key_value_heads == self.num_heads:
            return "MHA"
        if self.num_key_value_heads == 1:
            return "MQA"
        return "GQA"

    def bytes_per_token(self, dtype: str = "float16") -> int:
        """2 (K and V) x layers x KV heads x head_dim x bytes per element."""
        return int(2 * self.num_layers * self.num_key_value_heads * self.head_dim * dtype_bytes(dtype))

    def total_bytes(self, tokens: int, batch: int = 1, dtype: str = "float16") -> int:
        return self.bytes_per_token(dtype) * tokens * batch


def dtype_bytes(dtype: str) -> float:
    key = dtype.replace("torch.", "")
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def _first(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


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
    num_kv = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if num_kv is None:
        # Falcon-7B style: one shared KV head unless the new decoder architecture says otherwise
        num_kv = 1 if cfg.get("multi_query") and not cfg.get("new_decoder_architecture") else num_heads
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
