"""The shape of a KV cache, from a model's config: pure arithmetic, no torch, no transformers.

This is the bottom of kvviz: the engine (`engine/`), the serving economics (`economics/`) and
the figures all read a model's cache geometry from here, so they agree on every number.

What one cached layer stores per token depends on its attention:
- MHA / GQA / MQA: one key and one value vector per KV head,
      2 x num_key_value_heads x head_dim elements (K and V may differ in size: v_head_dim);
- MLA (DeepSeek-V2/V3): one compressed latent and one shared RoPE key for all heads,
      kv_lora_rank + qk_rope_head_dim elements (576 for DeepSeek-V3: 1.4% of its 128 heads' K and V).
And the layers differ (`layer_types` in a config):
- global layers keep every token;
- windowed layers (sliding or chunked attention, window W counting the new token) keep the last
  W - 1 tokens between steps: transformers 5.23's `DynamicSlidingWindowLayer` holds min(T, W - 1)
  rows (measured; the new token's row makes W while it attends);
- layers without a KV cache (Mamba, Gated DeltaNet, KV-sharing consumers) keep nothing per token;
  Mamba and Gated DeltaNet layers keep a fixed-size state per sequence instead.
So `bytes_per_token` (what one more token costs while the context is below every window) is
    cached layers x elements per layer x bytes per element (+ the scales of a quantized cache)
and `total_bytes(T)` caps each windowed layer at W - 1 rows.

`kv_geometry` reads the config of every common family: the fields are named differently
(GPT-2: n_layer/n_head/n_embd; Falcon: multi_query/num_kv_heads; Gemma: an explicit head_dim that
is *not* hidden_size / num_heads), missing KV-head counts mean plain multi-head attention, and
families whose config derives its layer types in code (Gemma-2/3, gpt-oss, Qwen2, Jamba,
Qwen3-Next, Cohere2) get them derived here the same way transformers 5.23 does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# a model whose config names no context length is treated as having this many positions
DEFAULT_CONTEXT = 2048

# payload bits per stored element of the cache dtypes people use
DTYPE_BITS: dict[str, int] = {"float32": 32, "float16": 16, "bfloat16": 16, "fp8": 8, "int8": 8, "int4": 4}
# bytes per stored element, without the scales of a quantized cache (see QUANTIZED for those)
DTYPE_BYTES: dict[str, float] = {k: bits / 8 for k, bits in DTYPE_BITS.items()}
# short names people type -> the keys above
DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
    "float8": "fp8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
}
# the choices offered in the UI and the CLI
CACHE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "fp8", "int8", "int4")


# -- quantized caches: payload plus scales (and zero points) per group -------------------------
@dataclass(frozen=True)
class QuantFormat:
    """How a quantized cache stores its elements: `bits` each, plus per group of elements along
    one cached vector a scale (and, if asymmetric, a zero point). No group size = one scale per
    tensor, which costs nothing per token."""

    bits: int
    scale_bytes: int  # per group
    zero_point_bytes: int  # per group; 0 for symmetric formats
    default_group_size: int | None  # None: per-tensor scale
    note: str


QUANTIZED: dict[str, QuantFormat] = {
    "fp8": QuantFormat(8, 4, 0, None, "e4m3 with one fp32 scale per tensor (transformers' QuantizedCache "
                                      "backend 'fp8'; vLLM kv_cache_dtype='fp8'): nothing per token"),
    "int8": QuantFormat(8, 2, 0, 64, "symmetric absmax: one fp16 scale per group (llama.cpp q8_0: group 32)"),
    "int4": QuantFormat(4, 2, 2, 64, "asymmetric min/max: fp16 scale + fp16 zero point per group (KIVI, quanto, "
                                     "HQQ; 64 is transformers' QuantizedCache default q_group_size)"),
}
MAX_GROUP_SIZE = 1 << 20


def quantized_bytes_per_element(bits: int, group_size: int | None, scale_bytes: float = 2,
                                zero_point: bool = False) -> float:
    """Bytes per cached element of a group-quantised format, its scales included.

    Each group of `group_size` values stores `bits` per value plus one scale of `scale_bytes` (and,
    when asymmetric, a zero point / minimum of the same size); None = one scale per tensor (payload only):
        bits / 8 + scale_bytes * (2 if zero_point else 1) / group_size
    llama.cpp: q8_0 (8, 32) -> 1.0625 B (8.5 bits), q4_0 (4, 32) -> 0.5625 B (4.5 bits); int4 with an fp16
    scale and zero point per 64 -> 0.5625 B too.
    """
    if bits < 1 or (group_size is not None and group_size < 1):
        raise ValueError(f"bits and group size must be positive, got bits={bits}, group_size={group_size}")
    payload = bits / 8
    return payload if group_size is None else payload + scale_bytes * (2 if zero_point else 1) / group_size


def _groups(dims: tuple[int, ...], group_size: int) -> int:
    """Groups covering vectors of these lengths, each vector cut on its own (a group never spans two)."""
    return sum(math.ceil(d / group_size) for d in dims)


# -- layers ------------------------------------------------------------------------------------
LAYER_KINDS: tuple[str, ...] = ("global", "windowed", "no_kv")
LAYER_KIND_LABELS = {"global": "global attention", "windowed": "windowed attention", "no_kv": "no KV cache"}
# transformers' layer_types (cache_utils.DYNAMIC_LAYER_TYPE_MAPPING in 5.23) -> what kvviz sizes
LAYER_TYPE_KIND: dict[str, str] = {
    "full_attention": "global", "indexed_attention": "global", "hybrid": "global",
    "sliding_attention": "windowed", "chunked_attention": "windowed", "hybrid_sliding": "windowed",
    "linear_attention": "no_kv", "conv": "no_kv", "mamba": "no_kv", "dummy": "no_kv", "moe": "no_kv", "mlp": "no_kv",
}


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one model's KV cache."""

    model_type: str
    num_layers: int
    num_heads: int  # query heads
    num_key_value_heads: int  # KV heads: = num_heads (MHA), 1 (MQA), in between (GQA); MLA: num_heads
    head_dim: int  # of a key (MLA: qk_nope_head_dim + qk_rope_head_dim)
    hidden_size: int
    max_positions: int  # the model's context length (0 if the config does not say)
    vocab_size: int = 0
    layer_kinds: tuple[str, ...] = ()  # per layer, one of LAYER_KINDS; () = every layer global
    window: int = 0  # tokens a windowed layer attends, the new one included (0: no windowed layers)
    v_head_dim: int = 0  # of a value when it differs from head_dim (MLA: 128 vs 192); 0 = head_dim
    kv_lora_rank: int = 0  # MLA: the compressed latent cached per token and layer (0: not MLA)
    qk_rope_head_dim: int = 0  # MLA: the shared RoPE key cached beside the latent
    conv_state_elements: int = 0  # per sequence, all no_kv layers: Mamba / DeltaNet convolution states
    recurrent_state_elements: int = 0  # per sequence, all no_kv layers: SSM / DeltaNet recurrent states

    # -- what kind of cache -------------------------------------------------------------------
    @property
    def attention_kind(self) -> str:
        return "MLA" if self.kv_lora_rank else attention_kind(self.num_heads, self.num_key_value_heads)

    @property
    def group_size(self) -> int:
        """Query heads per KV head: 1 = MHA, num_heads = MQA, in between = GQA."""
        return max(1, self.num_heads // self.num_key_value_heads)

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def context_length(self) -> int:
        """Positions the model takes: its config's, or DEFAULT_CONTEXT when the config does not say."""
        return self.max_positions or DEFAULT_CONTEXT

    @property
    def kinds(self) -> tuple[str, ...]:
        """Each layer's kind (every layer global unless the config says otherwise)."""
        return self.layer_kinds or ("global",) * self.num_layers

    def layers_by_kind(self) -> dict[str, int]:
        """{kind: number of layers}, kinds in LAYER_KINDS order, only those present."""
        kinds = self.kinds
        return {k: kinds.count(k) for k in LAYER_KINDS if k in kinds}

    @property
    def cached_layers(self) -> int:
        """Layers with a KV cache (global + windowed)."""
        return sum(k != "no_kv" for k in self.kinds)

    @property
    def state_elements(self) -> int:
        return self.conv_state_elements + self.recurrent_state_elements

    # -- per token ----------------------------------------------------------------------------
    def vector_dims(self) -> tuple[int, ...]:
        """Lengths of the vectors one cached layer stores per token: K and V of each KV head, or
        MLA's latent and shared RoPE key."""
        if self.kv_lora_rank:
            return (self.kv_lora_rank, self.qk_rope_head_dim)
        return (self.head_dim,) * self.num_key_value_heads + (self.value_head_dim,) * self.num_key_value_heads

    def layer_elements_per_token(self) -> int:
        return sum(self.vector_dims())

    def elements_per_token(self) -> int:
        """Cached numbers per token while below every window: every cached layer's vectors."""
        return self.cached_layers * self.layer_elements_per_token()

    def scale_bytes_per_token(self, dtype: str = "float16", group_size: int | None = None) -> int:
        """Bytes of scales and zero points per token in a quantized cache (0 for float dtypes and
        per-tensor scales): groups of `group_size` along each cached vector."""
        g = resolve_group_size(dtype, group_size)
        if g is None:
            return 0
        q = QUANTIZED[normalize_dtype(dtype)]
        return self.cached_layers * _groups(self.vector_dims(), g) * (q.scale_bytes + q.zero_point_bytes)

    def _layer_bytes_per_token(self, dtype: str, group_size: int | None) -> int:
        """One cached layer, one token: payload + scales (whole bytes: payload bits rounded up)."""
        payload = math.ceil(self.layer_elements_per_token() * DTYPE_BITS[normalize_dtype(dtype)] / 8)
        g = resolve_group_size(dtype, group_size)
        if g is None:
            return payload
        q = QUANTIZED[normalize_dtype(dtype)]
        return payload + _groups(self.vector_dims(), g) * (q.scale_bytes + q.zero_point_bytes)

    def bytes_per_token(self, dtype: str = "float16", group_size: int | None = None) -> int:
        """What one more token costs while the context is below every window: every cached layer's
        vectors x bytes per element, plus a quantized cache's scales. The MHA/GQA/MQA case is
        2 x layers x KV heads x head_dim x bytes per element."""
        return self.cached_layers * self._layer_bytes_per_token(dtype, group_size)

    def growth_bytes_per_token(self, dtype: str = "float16", group_size: int | None = None) -> int:
        """What one more token costs once the context is past every window: global layers only."""
        return self.layers_by_kind().get("global", 0) * self._layer_bytes_per_token(dtype, group_size)

    def decompressed_bytes_per_token(self, dtype: str = "float16") -> int:
        """MLA: the per-head K and V attention multiplies (num_heads x (head_dim + v_head_dim) per
        layer), which transformers 5.23 rebuilds from the latent at every step and drops, and which
        an engine without an MLA kernel would cache. Other models: their bytes_per_token."""
        if not self.kv_lora_rank:
            return self.bytes_per_token(dtype)
        per_layer = self.num_heads * (self.head_dim + self.value_head_dim)
        return int(self.cached_layers * per_layer * dtype_bytes(dtype))

    # -- totals -------------------------------------------------------------------------------
    def rows_held(self, tokens: int) -> dict[str, int]:
        """Rows one sequence of `tokens` keeps per layer of each cached kind (global: all of them;
        windowed: the last window - 1, as transformers 5.23's DynamicSlidingWindowLayer keeps)."""
        n = self.layers_by_kind()
        out = {}
        if "global" in n:
            out["global"] = tokens
        if "windowed" in n:
            out["windowed"] = min(tokens, max(0, self.window - 1))
        return out

    def bytes_by_kind(self, tokens: int, batch: int = 1, dtype: str = "float16",
                      group_size: int | None = None) -> dict[str, int]:
        """Bytes `batch` sequences of `tokens` hold in each kind of layer; "no_kv" is the fixed
        per-sequence state (Mamba / DeltaNet) of the layers without a KV cache."""
        per = self._layer_bytes_per_token(dtype, group_size)
        n = self.layers_by_kind()
        out = {kind: batch * n[kind] * rows * per for kind, rows in self.rows_held(tokens).items()}
        if "no_kv" in n:
            out["no_kv"] = self.state_bytes(batch, dtype)
        return out

    def total_bytes(self, tokens: int, batch: int = 1, dtype: str = "float16", group_size: int | None = None) -> int:
        """The KV cache of `batch` sequences of `tokens`, windowed layers capped (states not included:
        see `state_bytes`)."""
        return sum(v for k, v in self.bytes_by_kind(tokens, batch, dtype, group_size).items() if k != "no_kv")

    def state_bytes(self, batch: int = 1, dtype: str = "bfloat16", stored_by: str = "model") -> int:
        """Fixed per-sequence state of the layers without a KV cache, for `batch` sequences.

        stored_by="model": every state element in `dtype` (a quantized cache dtype leaves states in
        16 bits); "transformers": as transformers 5.23 keeps them on CPU, convolution states in
        `dtype` but recurrent / SSM states in float32 whatever the model's dtype (measured).
        """
        if stored_by not in ("model", "transformers"):
            raise ValueError(f"stored_by must be 'model' or 'transformers', got {stored_by!r}")
        key = normalize_dtype(dtype)
        elem = 2.0 if key in QUANTIZED else DTYPE_BYTES[key]
        rec = 4.0 if stored_by == "transformers" else elem
        return int(batch * (self.conv_state_elements * elem + self.recurrent_state_elements * rec))

    def max_tokens(self, budget_bytes: float, dtype: str = "float16", batch: int = 1,
                   group_size: int | None = None, limit: int = 1 << 40) -> int:
        """Longest context per sequence such that `batch` sequences' caches and states fit in
        `budget_bytes` (0 if not even the states fit). Memory stops growing once every layer is
        windowed, so such a model fits any length: the answer is then `limit`."""
        def fits(t: int) -> bool:
            return self.total_bytes(t, batch, dtype, group_size) + self.state_bytes(batch, dtype) <= budget_bytes

        if not fits(0):
            return 0
        if fits(limit):
            return limit
        lo, hi = 0, limit  # fits(lo), not fits(hi): total_bytes only grows with tokens
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # -- other versions of the same model -----------------------------------------------------
    def with_kv_heads(self, num_key_value_heads: int) -> KVGeometry:
        """The same model with another KV-head count (what MHA/GQA/MQA would cost). An MLA model
        becomes plain attention over its decompressed heads (K head_dim, V v_head_dim)."""
        if num_key_value_heads < 1 or self.num_heads % num_key_value_heads:
            raise ValueError(
                f"{num_key_value_heads} KV heads do not divide {self.num_heads} query heads; "
                f"pick a divisor of {self.num_heads}"
            )
        return dataclasses.replace(self, num_key_value_heads=num_key_value_heads, kv_lora_rank=0, qk_rope_head_dim=0)

    def without_windows(self) -> KVGeometry:
        """The same model if every windowed layer kept every token (what a window-blind sum says)."""
        return dataclasses.replace(self, layer_kinds=tuple("global" if k == "windowed" else k for k in self.kinds),
                                   window=0)

    def variants(self) -> dict[str, KVGeometry]:
        """MHA, GQA and MQA versions of this model (an MLA model first as itself), keyed by a label;
        the model's own is marked "← this model".

        The GQA variant is the model's own grouping if it uses GQA, else 8 KV heads (Llama-3 /
        Mistral's choice) or, for models with fewer heads, the largest divisor below num_heads.
        """
        h = self.num_heads
        out: dict[str, KVGeometry] = {}
        if self.kv_lora_rank:
            out[f"MLA (latent {self.kv_lora_rank} + rope {self.qk_rope_head_dim}) ← this model"] = self
        if self.attention_kind == "GQA":
            gqa = self.num_key_value_heads
        else:
            below = [d for d in range(2, h) if h % d == 0]
            gqa = 8 if 8 in below else (max((d for d in below if d <= h // 2), default=0))
        for kind, kv in (("MHA", h), ("GQA", gqa), ("MQA", 1)):
            if kv < 1 or (kind == "GQA" and kv in (1, h)):
                continue  # no GQA between MHA and MQA for this head count (e.g. 2 heads)
            label = f"{kind} ({kv} KV head{'s' if kv > 1 else ''})"
            if kv == self.num_key_value_heads and not self.kv_lora_rank:
                label += " ← this model"
            out[label] = self.with_kv_heads(kv)
        return out

    def notes(self) -> list[str]:
        """What a reader of the numbers should know about this model's cache."""
        out = []
        n = self.layers_by_kind()
        if self.kv_lora_rank:
            out.append(f"MLA: each layer caches one {self.kv_lora_rank}-wide latent and one {self.qk_rope_head_dim}-wide "
                       "RoPE key per token, shared by all heads; attention decompresses them into per-head K and V "
                       "at every step. transformers 5.23 stores the latent too (the layer's `keys` hold the latent, "
                       "its `values` the RoPE key), as serving engines with MLA kernels do.")
        if "windowed" in n:
            out.append(f"{n['windowed']} of {self.num_layers} layers attend a window of {self.window:,} tokens and keep "
                       f"the last {max(0, self.window - 1):,}: past that, only the {n.get('global', 0)} global layers grow.")
        if "no_kv" in n:
            if self.state_elements:
                out.append(f"{n['no_kv']} layers keep no KV cache but a fixed state per sequence "
                           f"({self.state_elements:,} elements), whatever the context length.")
            else:
                out.append(f"{n['no_kv']} layers keep no KV cache; kvviz does not size their fixed state for "
                           f"model_type {self.model_type!r} (it does for Jamba's Mamba and Qwen3-Next's DeltaNet layers).")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {**dataclasses.asdict(self), "attention": self.attention_kind, "layers_by_kind": self.layers_by_kind()}
        out["layer_kinds"] = list(self.kinds)
        return out


def attention_kind(num_heads: int, num_key_value_heads: int) -> str:
    """MHA (one KV head per query head), MQA (one KV head for all) or GQA (groups in between)."""
    if num_key_value_heads == num_heads:
        return "MHA"
    if num_key_value_heads == 1:
        return "MQA"
    return "GQA"


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of a cache dtype ("float16", "fp16", "torch.bfloat16", "int4", ...),
    without a quantized cache's scales."""
    return DTYPE_BYTES[normalize_dtype(dtype)]


def normalize_dtype(dtype: str) -> str:
    key = str(dtype).replace("torch.", "").strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ValueError(f"unknown cache dtype {dtype!r}; choose one of {', '.join(CACHE_DTYPES)}")
    return key


def resolve_group_size(dtype: str, group_size: int | None = None) -> int | None:
    """The group size a quantized dtype uses (its default unless given); None for float dtypes
    and per-tensor scales."""
    q = QUANTIZED.get(normalize_dtype(dtype))
    if q is None or q.default_group_size is None:
        return None
    if group_size is None:
        return q.default_group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group size must be a whole number from 1 to {MAX_GROUP_SIZE:,}, got {group_size!r}")
    return group_size


# -- reading configs -----------------------------------------------------------------------------
_LIMITS = {  # what a real config can hold; beyond it the value is a typo or an attack
    "layers": 100_000, "heads": 1 << 20, "hidden size": 1 << 24, "head_dim": 1 << 20, "positions": 1 << 40,
    "window": 1 << 40, "vocab": 1 << 32, "rank": 1 << 20, "state": 1 << 24,
}


def _whole(value: Any, what: str, lo: int = 1, hi_key: str = "heads") -> int:
    """`value` as an int within [lo, _LIMITS[hi_key]]; a ValueError naming the field otherwise."""
    hi = _LIMITS[hi_key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value:
        raise ValueError(f"config field {what} must be a whole number, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"config field {what} = {int(value):,} is out of range ({lo:,} to {hi:,})")
    return int(value)


def _first(cfg: Mapping[str, Any], *names: str, default: Any = None) -> tuple[str, Any]:
    """(name, value) of the first field present and not null, else (names[0], default)."""
    for n in names:
        if cfg.get(n) is not None:
            return n, cfg[n]
    return names[0], default


def _field(cfg: Mapping[str, Any], *names: str, what: str = "", lo: int = 1, hi: str = "heads",
           default: int | None = None) -> int | None:
    name, v = _first(cfg, *names)
    if v is None:
        return default
    return _whole(v, what or name, lo, hi)


def _num_kv_heads(cfg: Mapping[str, Any], num_heads: int) -> int:
    """KV heads, including the two flags that override an explicit count.

    Falcon: `new_decoder_architecture` (40B/180B) uses `num_kv_heads`; otherwise `multi_query`
    (7B) means one KV head, even though FalconConfig fills `num_kv_heads` with num_heads.
    GPT-BigCode (StarCoder) has `multi_query` too and no count at all.
    """
    explicit = _field(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if cfg.get("new_decoder_architecture"):
        kv = explicit or num_heads
    elif cfg.get("multi_query"):
        kv = 1
    else:
        kv = explicit or num_heads
    if kv > num_heads:
        raise ValueError(f"the config has more KV heads ({kv}) than query heads ({num_heads})")
    return kv


def _pattern(n: int, every: int, on: str, off: str) -> list[str]:
    """Layer i is `off` when (i + 1) is a multiple of `every`, else `on` (transformers' rule)."""
    return [on if (i + 1) % every else off for i in range(n)]


def _layer_types(cfg: Mapping[str, Any], n: int) -> list[str]:
    """transformers' layer_types for a config dict: the config's own list, else what 5.23's config
    class for this family derives, else its generic rule (a sliding_window makes every layer sliding)."""
    given = cfg.get("layer_types")
    if given is not None:
        if not isinstance(given, (list, tuple)) or not all(isinstance(t, str) for t in given):
            raise ValueError("config field layer_types must be a list of strings")
        if len(given) != n:
            raise ValueError(f"config field layer_types has {len(given)} entries for {n} layers")
        return list(given)
    mt = str(cfg.get("model_type", ""))
    if mt == "jamba":
        period = _field(cfg, "attn_layer_period", default=8)
        offset = _field(cfg, "attn_layer_offset", lo=0, default=4)
        return ["full_attention" if i % period == offset else "linear_attention" for i in range(n)]
    if mt == "qwen3_next":
        return _pattern(n, _field(cfg, "full_attention_interval", default=4), "linear_attention", "full_attention")
    if mt in ("gemma2", "gpt_oss"):
        return _pattern(n, 2, "sliding_attention", "full_attention")
    if mt in ("gemma3_text", "gemma3"):
        return _pattern(n, _field(cfg, "sliding_window_pattern", default=6), "sliding_attention", "full_attention")
    if mt == "cohere2":
        return _pattern(n, _field(cfg, "sliding_window_pattern", default=4), "sliding_attention", "full_attention")
    if "use_sliding_window" in cfg:  # the Qwen2/Qwen3 families: windows only when switched on, from max_window_layers
        if not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
            return ["full_attention"] * n
        start = _field(cfg, "max_window_layers", lo=0, hi="layers", default=28)
        return ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    if cfg.get("sliding_window") is not None:
        return ["sliding_attention"] * n
    if cfg.get("attention_chunk_size") is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


def _layer_kinds(types: list[str]) -> tuple[str, ...]:
    unknown = sorted({t for t in types if t not in LAYER_TYPE_KIND})
    if unknown:
        raise ValueError(f"unknown layer type(s) {', '.join(map(repr, unknown))} in layer_types; kvviz knows "
                         f"{', '.join(sorted(LAYER_TYPE_KIND))}")
    return tuple(LAYER_TYPE_KIND[t] for t in types)


def _states(cfg: Mapping[str, Any], hidden: int, n_linear: int) -> tuple[int, int]:
    """(conv, recurrent) state elements per sequence over the `n_linear` layers without a KV cache.

    Jamba's Mamba layers: d_inner = mamba_expand x hidden; conv d_inner x d_conv, SSM d_inner x d_state.
    Qwen3-Next's Gated DeltaNet: conv over q, k, v channels (2 x key heads x key dim + value heads x
    value dim) x kernel; recurrent value heads x key dim x value dim. Defaults: the config classes'.
    """
    if not n_linear:
        return 0, 0
    if cfg.get("model_type") == "jamba" or "mamba_d_state" in cfg:
        d_inner = _field(cfg, "mamba_expand", hi="state", default=2) * hidden
        conv = d_inner * _field(cfg, "mamba_d_conv", hi="state", default=4)
        rec = d_inner * _field(cfg, "mamba_d_state", hi="state", default=16)
        return n_linear * conv, n_linear * rec
    if cfg.get("model_type") == "qwen3_next" or "linear_num_value_heads" in cfg:
        k_heads = _field(cfg, "linear_num_key_heads", hi="state", default=16)
        v_heads = _field(cfg, "linear_num_value_heads", hi="state", default=32)
        k_dim = _field(cfg, "linear_key_head_dim", hi="state", default=128)
        v_dim = _field(cfg, "linear_value_head_dim", hi="state", default=128)
        kernel = _field(cfg, "linear_conv_kernel_dim", hi="state", default=4)
        conv = (2 * k_heads * k_dim + v_heads * v_dim) * kernel
        return n_linear * conv, n_linear * v_heads * k_dim * v_dim
    return 0, 0


def config_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict: a dict as is, a transformers config through `to_dict()` (plus its
    `layer_types` when the class computes them, as JambaConfig does); the text part of a
    multimodal config."""
    if isinstance(config, Mapping):
        cfg = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        cfg = config.to_dict()
        derived = getattr(config, "layer_types", None)
        if isinstance(derived, (list, tuple)) and cfg.get("layer_types") is None:
            cfg["layer_types"] = list(derived)
    else:
        raise ValueError(f"a config must be a JSON object (a dict) or a transformers config, got {type(config).__name__}")
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and "num_hidden_layers" not in cfg:
        cfg = {**text, "model_type": text.get("model_type") or cfg.get("model_type")}
    return cfg


def kv_geometry(config: Any) -> KVGeometry:
    """Read a config (a transformers config object or its dict) of any common decoder family.

    Raises ValueError naming the field when a needed one is missing or absurd.
    """
    cfg = config_dict(config)
    model_type = str(cfg.get("model_type") or "unknown")
    num_layers = _field(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers", hi="layers")
    num_heads = _field(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads")
    hidden = _field(cfg, "hidden_size", "n_embd", "d_model", "dim", hi="hidden size")
    if num_layers is None or num_heads is None or hidden is None:
        raise ValueError(
            f"config of type {model_type!r} does not say its number of layers, heads and hidden size "
            "(looked for num_hidden_layers/n_layer, num_attention_heads/n_head, hidden_size/n_embd)"
        )
    num_kv = _num_kv_heads(cfg, num_heads)
    kv_lora_rank = _field(cfg, "kv_lora_rank", hi="rank", default=0) or 0
    if kv_lora_rank:  # MLA: cache the latent + the shared RoPE key; heads see nope + rope keys, v_head_dim values
        rope = _field(cfg, "qk_rope_head_dim", hi="rank", default=64) or 0
        nope = _field(cfg, "qk_nope_head_dim", hi="rank", default=128) or 0
        head_dim, v_head_dim = nope + rope, _field(cfg, "v_head_dim", hi="rank", default=128) or 0
    else:
        rope = 0
        head_dim = _field(cfg, "head_dim", hi="head_dim") or hidden // num_heads
        v_head_dim = 0
        if head_dim < 1:
            raise ValueError(f"hidden size {hidden} / {num_heads} heads leaves no head_dim: give head_dim in the config")
    kinds = _layer_kinds(_layer_types(cfg, num_layers))
    window = 0
    if "windowed" in kinds:
        window = _field(cfg, "sliding_window", "attention_chunk_size", what="sliding_window", hi="window") or 0
        if not window:
            raise ValueError("the config has sliding or chunked layers but no sliding_window / attention_chunk_size")
    conv, rec = _states(cfg, hidden, kinds.count("no_kv"))
    _, max_positions = _first(cfg, "max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len", default=0)
    return KVGeometry(
        model_type=model_type,
        num_layers=num_layers,
        num_heads=num_heads,
        num_key_value_heads=num_kv,
        head_dim=head_dim,
        hidden_size=hidden,
        max_positions=_whole(max_positions, "max_position_embeddings", lo=0, hi_key="positions"),
        vocab_size=_field(cfg, "vocab_size", lo=0, hi="vocab", default=0) or 0,
        layer_kinds=kinds if set(kinds) != {"global"} else (),
        window=window,
        v_head_dim=v_head_dim if v_head_dim != head_dim else 0,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=rope,
        conv_state_elements=conv,
        recurrent_state_elements=rec,
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


def human_count(n: float) -> str:
    """4_400_000 -> '4.4M', 8_030_000_000 -> '8.03B' (parameters, tokens; decimal units)."""
    n = float(n)
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:,.0f}{unit}"
    return f"{n:,.0f}"
