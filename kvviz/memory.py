"""KV-cache size arithmetic for any decoder config.

Per token the cache stores one key and one value vector per layer and per KV head:
    bytes_per_token = 2 * num_layers * num_key_value_heads * head_dim * bytes_per_element
(the 2 is K and V). Multiply by tokens and batch for a sequence or a batch.

`kv_geometry` reads the config of every common family: the fields are named differently
(GPT-2: n_layer/n_head/n_embd; Falcon: multi_query/num_kv_heads; Gemma: an explicit head_dim that
is *not* hidden_size / num_heads), and missing KV-head counts mean plain multi-head attention.

The numbers are the architecture's: what a serving engine (vLLM, TGI) stores. One implementation
stores more: transformers' Falcon with `new_decoder_architecture` (Falcon-40B) broadcasts its 8 KV
heads to all 128 query heads before caching them, 16x the formula.

Sources for the configs in `data/configs/`: each model's published `config.json` on the hub.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvviz.models import LoadedModel

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

# Usable device memory of common accelerators, in bytes (marketing "GB" are GiB here: an
# A100-80GB reports 81,920 MiB). The CUDA context takes a few hundred MiB more in practice.
GPU_PRESETS: dict[str, int] = {
    "Apple M-series, 16 GB unified": 16 * 2**30,
    "NVIDIA T4 (16 GB)": 15 * 2**30,
    "NVIDIA RTX 4090 / L4 / A10 (24 GB)": 24 * 2**30,
    "NVIDIA A100 (40 GB)": 40 * 2**30,
    "NVIDIA A100 / H100 (80 GB)": 80 * 2**30,
    "NVIDIA H200 (141 GB)": 141 * 2**30,
    "AMD MI300X (192 GB)": 192 * 2**30,
}

# hand-written configs of each family (published values), for tests and the calculator's presets
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "data" / "configs"


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
        """Query heads sharing one KV head."""
        return max(1, self.num_heads // self.num_key_value_heads)

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


# -- configs: files, presets, the hub ---------------------------------------------------------
def preset_configs() -> dict[str, Path]:
    """The hand-written configs shipped in data/configs, by name (file stem)."""
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config.json (or a directory holding one) as a dict; ValueError saying what is wrong."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ValueError(f"no config.json at {str(path)!r}: pass a config.json file or a checkpoint directory")
    return parse_config_json(p.read_text(encoding="utf-8"), source=str(p))


def parse_config_json(text: str | bytes, source: str = "the uploaded file") -> dict[str, Any]:
    """Parse config.json text (an upload, a file) into a dict, with a readable error."""
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source} is not valid JSON ({e}): upload the model's config.json") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{source} is JSON but not an object: upload the model's config.json")
    return cfg


def load_config_source(source: str) -> dict[str, Any]:
    """Config dict from a preset name, a config.json path/directory, or a hub id (online only).

    Raises ValueError for a bad file and `kvviz.models.ModelLoadError` (a ValueError) when a hub
    id cannot be fetched (offline, unknown, needs remote code).
    """
    source = source.strip()
    if not source:
        raise ValueError("no config given: pass a config.json path, a directory, a preset name or a hub id")
    presets = preset_configs()
    if source in presets:
        return read_config_file(presets[source])
    p = Path(source).expanduser()
    if p.exists() or source.endswith(".json"):
        return read_config_file(p)
    from kvviz.models import load_config  # a hub id: needs the network (or the local HF cache)

    return load_config(source).to_dict()


def to_transformers_config(cfg: dict[str, Any]) -> Any:
    """A transformers config object for a config dict (for counting parameters)."""
    from transformers import AutoConfig

    model_type = cfg.get("model_type")
    if not model_type:
        raise ValueError("the config has no model_type, so its parameters cannot be counted")
    fields = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(model_type, **fields)


@lru_cache(maxsize=64)
def _count_parameters(config_json: str) -> int:
    import torch

    from kvviz.models import estimate_weight_bytes

    config = to_transformers_config(json.loads(config_json))
    # at one byte per element the byte count is the parameter count (counted on the meta device)
    return estimate_weight_bytes(config, torch.int8)


def count_parameters(config: dict[str, Any] | Any) -> int:
    """Parameters of the model a config describes, counted on the meta device (nothing allocated).

    Tied input/output embeddings count once. Raises ValueError when transformers does not know
    the model_type.
    """
    cfg = config if isinstance(config, dict) else config.to_dict()
    try:
        return _count_parameters(json.dumps(cfg, sort_keys=True, default=str))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"cannot count the parameters of model_type {cfg.get('model_type')!r}: {e}") from e


def weight_bytes(n_params: int, dtype: str = "float16") -> int:
    return int(n_params * dtype_bytes(dtype))


# -- tables for the page and the CLI ----------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """KV cache of `batch` sequences of `tokens` tokens, optionally beside the weights."""

    geometry: KVGeometry
    dtype: str
    tokens: int
    batch: int
    weights_bytes: int | None = None

    @property
    def bytes_per_token(self) -> int:
        return self.geometry.bytes_per_token(self.dtype)

    @property
    def bytes_per_sequence(self) -> int:
        return self.geometry.total_bytes(self.tokens, 1, self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.geometry.total_bytes(self.tokens, self.batch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "geometry": self.geometry.to_dict(),
            "dtype": self.dtype,
            "tokens": self.tokens,
            "batch": self.batch,
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_sequence": self.bytes_per_sequence,
            "total_bytes": self.total_bytes,
        }
        if self.weights_bytes is not None:
            out["weights_bytes"] = self.weights_bytes
            out["total_with_weights_bytes"] = self.total_bytes + self.weights_bytes
        return out


def estimate(geo: KVGeometry, tokens: int, batch: int = 1, dtype: str = "float16",
             weights_bytes: int | None = None) -> MemoryEstimate:
    if tokens < 0 or batch < 1:
        raise ValueError(f"tokens must be >= 0 and batch >= 1, got tokens={tokens}, batch={batch}")
    return MemoryEstimate(geo, normalize_dtype(dtype), int(tokens), int(batch), weights_bytes)


def dtype_table(geo: KVGeometry, tokens: int, batch: int = 1) -> list[dict[str, Any]]:
    """Bytes per token and in total for every cache dtype."""
    return [
        {"dtype": d, "bytes_per_token": geo.bytes_per_token(d), "total_bytes": geo.total_bytes(tokens, batch, d)}
        for d in CACHE_DTYPES
    ]


def context_points(max_context: int, n: int = 64) -> list[int]:
    """Context lengths from 1 to `max_context` for a memory-vs-context chart (sorted, unique)."""
    max_context = max(1, int(max_context))
    step = max(1, max_context // n)
    return sorted(set(range(step, max_context + 1, step)) | {1, max_context})


def max_context_on(geo: KVGeometry, device_bytes: int, batch: int, dtype: str, weights_bytes: int = 0) -> int:
    """Longest context per sequence such that weights + batch x cache fit in `device_bytes`."""
    free = device_bytes - weights_bytes
    if free <= 0:
        return 0
    return int(free // (geo.bytes_per_token(dtype) * batch))


def chart_extent(variants: dict[str, KVGeometry], device_bytes: int, batch: int, dtype: str, weights_bytes: int = 0,
                 fallback: int = 8192) -> int:
    """Context length a memory-vs-context chart should reach: a bit past the point where the
    hungriest variant fills the device (so the crossing shows), or `fallback` if nothing fits."""
    first = min((max_context_on(g, device_bytes, batch, dtype, weights_bytes) for g in variants.values()), default=0)
    return int(first * 1.15) if first > 0 else fallback


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as GPU memory is reported)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- the running model's cache, measured ------------------------------------------------------
@dataclass(frozen=True)
class CacheMeasurement:
    """A real cache's tensor bytes beside the formula's prediction."""

    tokens: int
    batch: int
    dtype: str
    measured_bytes: int  # KVVizCache.nbytes(): numel x element_size of every stored K and V
    formula_bytes: int
    shapes: tuple[tuple[int, ...], ...]  # each layer's key_states shape (batch, kv_heads, seq, head_dim)

    @property
    def equal(self) -> bool:
        return self.measured_bytes == self.formula_bytes


def measure_cache(lm: LoadedModel, tokens: int, batch: int = 1, seed: int = 0) -> CacheMeasurement:
    """Prefill `batch` x `tokens` random token ids into a fresh cache and weigh its tensors.

    Uses the shared model read-only (no recorder: plain attention); the cache is thrown away.
    """
    import torch

    from kvviz.cache import KVVizCache

    cap = lm.info.max_positions or tokens
    if not 1 <= tokens <= cap:
        raise ValueError(f"tokens must be between 1 and the model's context ({cap}), got {tokens}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, lm.info.vocab_size, (batch, tokens), generator=gen).to(lm.device)  # (batch, tokens)
    cache = KVVizCache(config=lm.model.config)
    with torch.inference_mode():
        lm.model(input_ids=ids, past_key_values=cache, use_cache=True)
    shapes = tuple(tuple(kv[0].shape) for kv in (cache.layer_kv(i) for i in range(len(cache.layers))) if kv is not None)
    geo = kv_geometry(lm.model.config)
    dtype = lm.info.dtype
    return CacheMeasurement(tokens, batch, dtype, cache.nbytes(), geo.total_bytes(tokens, batch, dtype), shapes)


# -- what the memory page and the paged simulator start from ----------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A model's cache geometry and (when known) parameter count, from whatever source."""

    label: str
    geometry: KVGeometry
    parameters: int | None = None  # None: unknown (numbers typed in, or a model_type transformers lacks)
    note: str = ""  # why the parameters are unknown, for the UI

    def weights_bytes(self, dtype: str = "float16") -> int:
        return 0 if self.parameters is None else weight_bytes(self.parameters, dtype)


def spec_from_config(cfg: dict[str, Any], label: str) -> ModelSpec:
    geo = kv_geometry(cfg)
    try:
        return ModelSpec(label, geo, count_parameters(cfg))
    except ValueError as e:
        return ModelSpec(label, geo, None, note=str(e))


def spec_from_model(model: Any, label: str) -> ModelSpec:
    """A loaded model: geometry from its config, parameters counted on the real tensors."""
    return ModelSpec(label, kv_geometry(model.config), sum(p.numel() for p in model.parameters()))


def spec_from_numbers(num_layers: int, num_heads: int, num_key_value_heads: int, head_dim: int,
                      parameters_billions: float = 0.0, max_positions: int = 0) -> ModelSpec:
    geo = geometry_from_numbers(num_layers, num_key_value_heads, head_dim, num_heads=num_heads, max_positions=max_positions)
    params = int(parameters_billions * 1e9) if parameters_billions > 0 else None
    return ModelSpec("typed in", geo, params, note="" if params else "type a parameter count to see the weights' share")


def presets_table(tokens: int = 8192, dtype: str = "float16") -> list[dict[str, Any]]:
    """Every shipped config at a glance: geometry, bytes per token, one sequence of `tokens`."""
    rows = []
    for name, path in preset_configs().items():
        g = kv_geometry(read_config_file(path))
        rows.append({
            "model": name, "type": g.model_type, "layers": g.num_layers,
            "heads / KV heads": f"{g.num_heads} / {g.num_key_value_heads}",
            "attention": g.attention_kind, "head_dim": g.head_dim, f"KiB per token ({dtype})": g.bytes_per_token(dtype) / 1024,
            f"GiB for {tokens:,} tokens": round(g.total_bytes(tokens, 1, dtype) / 2**30, 2),
        })
    return rows


def session_cache_measurement(session: Any) -> CacheMeasurement | None:
    """The cache of a running `kvviz.Session` weighed against the formula (None before prefill)."""
    cache = session.cache
    kvs = [cache.layer_kv(i) for i in range(len(cache.layers))]
    if not kvs or any(kv is None for kv in kvs):
        return None
    tokens = int(cache.seq_lengths()[0])
    dtype = session.lm.info.dtype
    formula = kv_geometry(session.lm.model.config).total_bytes(tokens, 1, dtype)
    return CacheMeasurement(tokens, 1, dtype, cache.nbytes(), formula, tuple(tuple(kv[0].shape) for kv in kvs))
