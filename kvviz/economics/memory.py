"""What a KV cache costs in memory, for any decoder config: estimates, presets, tables.

The per-token arithmetic lives in `kvviz.geometry`; this module adds what the memory page and
the CLI need around it: configs from files, presets, uploads or the hub, parameter counts for
the weights' share, estimates per sequence and batch, and the chart extents.

The numbers are the architecture's: what a serving engine (vLLM, TGI) stores, and what transformers
5.23 stores on CPU (measured in tests/economics/test_architectures.py for every family), with three
differences the estimate names: an MLA model's attention works on decompressed per-head K/V that
nobody keeps (`decompressed_bytes_per_token`); hybrids' recurrent states are float32 in transformers
whatever the model's dtype (`state_bytes(stored_by="transformers")`); and transformers' Falcon with
`new_decoder_architecture` (Falcon-40B) broadcasts its 8 KV heads to all 128 query heads before
caching them, 16x the formula.

Sources for the configs in `data/configs/`: each model's published `config.json` on the hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvviz.engine.config import BOUNDS, check_config, parameter_count, read_config_file
from kvviz.engine.config import parse_config_json as parse_config_json  # pages read uploads through here
from kvviz.geometry import (
    CACHE_DTYPES,
    QUANTIZED,
    KVGeometry,
    dtype_bytes,
    geometry_from_numbers,
    kv_geometry,
    normalize_dtype,
    resolve_group_size,
)
from kvviz.validate import InputError, real_number, whole_number

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

# what a calculation may be asked for (a million times any real deployment, and still exact in int arithmetic)
MAX_TOKENS = 2**40
MAX_BATCH = 10**7
MAX_PARAMETERS_BILLIONS = 100_000.0

# hand-written configs of each family (published values), for tests and the calculator's presets
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "data" / "configs"
# old preset names that still resolve: mistral-7b.json was Mistral-7B-v0.1 (v0.2/v0.3 have no window)
PRESET_ALIASES: dict[str, str] = {"mistral-7b": "mistral-7b-v0.1"}


# -- configs: files, presets, the hub ---------------------------------------------------------
def preset_configs() -> dict[str, Path]:
    """The hand-written configs shipped in data/configs, by name (file stem)."""
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def load_config_source(source: str) -> dict[str, Any]:
    """Config dict from a preset name, a config.json path/directory, or a hub id (online only).

    Presets ship with kvviz and are always readable; a path or hub id goes through the
    deployment's allow-list first (`kvviz.engine.models.check_allowed`, the same gate as loading a
    model). Every config is read strictly (`kvviz.engine.config`). Raises InputError (ModelLoadError
    is one) saying what is wrong.
    """
    if not isinstance(source, str) or not source.strip():
        raise InputError("no config given: pass a config.json path, a directory, a preset name or a hub id")
    source = source.strip()
    presets = preset_configs()
    source = PRESET_ALIASES.get(source, source)
    if source in presets:
        return read_config_file(presets[source])
    from kvviz.engine import models  # the allow-list and hub access live with model loading

    models.check_allowed(source)  # before the name touches the file system: one message either way
    if source.endswith(".json") and models.is_local(source):
        return read_config_file(source)
    return models.read_model_config(source)


def to_transformers_config(cfg: dict[str, Any]) -> Any:
    """A transformers config object for a checked config dict."""
    from transformers import AutoConfig

    model_type = cfg.get("model_type")
    if not model_type:
        raise InputError("the config has no model_type")
    fields = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(model_type, **fields)


def count_parameters(config: dict[str, Any] | Any) -> int:
    """Parameters of the model a config describes, by arithmetic from its checked fields (nothing built).

    Tied input/output embeddings count once. Exact for the families kvviz tests, an estimate for others.
    """
    cfg = config if isinstance(config, dict) else config.to_dict()
    return parameter_count(cfg)


def weight_bytes(n_params: int, dtype: str = "float16") -> int:
    return int(n_params * dtype_bytes(dtype))


# -- tables for the page and the CLI ----------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """KV cache of `batch` sequences of `tokens` tokens, optionally beside the weights.

    `total_bytes` is the KV cache (windowed layers capped at their window); the layers without a KV
    cache add a fixed state per sequence (`state_bytes`, in `state_dtype`); `group_size` is a
    quantized cache's group (None: the dtype's default).
    """

    geometry: KVGeometry
    dtype: str
    tokens: int
    batch: int
    weights_bytes: int | None = None
    group_size: int | None = None
    state_dtype: str = "bfloat16"

    @property
    def bytes_per_token(self) -> int:
        return self.geometry.bytes_per_token(self.dtype, self.group_size)

    @property
    def scale_bytes_per_token(self) -> int:
        return self.geometry.scale_bytes_per_token(self.dtype, self.group_size)

    @property
    def bytes_per_sequence(self) -> int:
        return self.geometry.total_bytes(self.tokens, 1, self.dtype, self.group_size)

    @property
    def total_bytes(self) -> int:
        return self.geometry.total_bytes(self.tokens, self.batch, self.dtype, self.group_size)

    @property
    def state_bytes(self) -> int:
        return self.geometry.state_bytes(self.batch, self.state_dtype)

    def to_dict(self) -> dict[str, Any]:
        g = self.geometry
        out: dict[str, Any] = {
            "geometry": g.to_dict(),
            "attention": g.attention_kind,
            "layers_by_kind": g.layers_by_kind(),
            "dtype": self.dtype,
            "tokens": self.tokens,
            "batch": self.batch,
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_sequence": self.bytes_per_sequence,
            "total_bytes": self.total_bytes,
            "bytes_by_kind": g.bytes_by_kind(self.tokens, self.batch, self.dtype, self.group_size),
        }
        if g.window:
            out["window"] = g.window
            out["growth_bytes_per_token"] = g.growth_bytes_per_token(self.dtype, self.group_size)
            out["total_bytes_without_windows"] = g.without_windows().total_bytes(
                self.tokens, self.batch, self.dtype, self.group_size)
        group = resolve_group_size(self.dtype, self.group_size)
        if self.dtype in QUANTIZED:
            out["group_size"] = group  # None: one scale per tensor
            out["scale_bytes_per_token"] = self.scale_bytes_per_token
        if g.kv_lora_rank:
            out["decompressed_bytes_per_token"] = g.decompressed_bytes_per_token(self.dtype)
        if "no_kv" in g.layers_by_kind():
            out["state_dtype"] = self.state_dtype
            out["state_bytes"] = self.state_bytes
            out["state_bytes_transformers"] = g.state_bytes(self.batch, self.state_dtype, stored_by="transformers")
        out["notes"] = g.notes()
        if self.weights_bytes is not None:
            out["weights_bytes"] = self.weights_bytes
            out["total_with_weights_bytes"] = self.total_bytes + self.state_bytes + self.weights_bytes
        return out


MAX_TOKENS = 1 << 40  # tokens per sequence the calculator accepts (a trillion: nothing real is longer)
MAX_BATCH = 1 << 24


def estimate(geo: KVGeometry, tokens: int, batch: int = 1, dtype: str = "float16",
             weights_bytes: int | None = None, group_size: int | None = None, state_dtype: str | None = None) -> MemoryEstimate:
    """The estimate for `batch` x `tokens` (InputError for impossible sizes). States are kept in
    `state_dtype`: by default the cache dtype, or bfloat16 when the cache is quantized."""
    tokens = whole_number(tokens, "tokens", 0, MAX_TOKENS)
    batch = whole_number(batch, "batch", 1, MAX_BATCH)
    dtype = normalize_dtype(dtype)
    resolve_group_size(dtype, group_size)  # a bad group size fails here, with its message
    if state_dtype is None:
        state_dtype = "bfloat16" if dtype in QUANTIZED else dtype
    return MemoryEstimate(geo, dtype, tokens, batch, weights_bytes, group_size, normalize_dtype(state_dtype))


def dtype_table(geo: KVGeometry, tokens: int, batch: int = 1, group_size: int | None = None) -> list[dict[str, Any]]:
    """Bytes per token (scales included) and in total for every cache dtype."""
    return [
        {"dtype": d, "bytes_per_token": geo.bytes_per_token(d, group_size),
         "scale_bytes_per_token": geo.scale_bytes_per_token(d, group_size),
         "total_bytes": geo.total_bytes(tokens, batch, d, group_size)}
        for d in CACHE_DTYPES
    ]


def context_points(max_context: int, n: int = 64, window: int = 0) -> list[int]:
    """Context lengths from 1 to `max_context` for a memory-vs-context chart (sorted, unique);
    with a window, its corner (window - 1) is a point too, so the kink is drawn where it is."""
    max_context = max(1, int(max_context))
    step = max(1, max_context // n)
    pts = set(range(step, max_context + 1, step)) | {1, max_context}
    if 1 < window <= max_context:
        pts.add(window - 1)
    return sorted(pts)


def max_context_on(geo: KVGeometry, device_bytes: int, batch: int, dtype: str, weights_bytes: int = 0,
                   group_size: int | None = None, limit: int = MAX_TOKENS) -> int:
    """Longest context per sequence such that weights + batch x (cache + state) fit in `device_bytes`
    (`limit` when it never stops fitting: every layer windowed)."""
    free = device_bytes - weights_bytes
    if free <= 0:
        return 0
    return geo.max_tokens(free, dtype, batch, group_size, limit=limit)


def chart_extent(variants: dict[str, KVGeometry], device_bytes: int, batch: int, dtype: str, weights_bytes: int = 0,
                 fallback: int = 8192, group_size: int | None = None) -> int:
    """Context length a memory-vs-context chart should reach to show the device filling up: a bit
    past the point where the hungriest variant fills it (so the crossing shows), or `fallback` if
    nothing fits or nothing ever fills it."""
    fits = [max_context_on(g, device_bytes, batch, dtype, weights_bytes, group_size) for g in variants.values()]
    first = min((f for f in fits if f < MAX_TOKENS), default=0)
    return int(first * 1.15) if first > 0 else fallback


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
    """A config's geometry and parameter count (checked first: the caller may hand any dict)."""
    check_config(cfg, label)
    try:
        geo = kv_geometry(cfg)
    except ValueError as e:  # no layers / heads / hidden size
        raise InputError(str(e)) from None
    return ModelSpec(label, geo, count_parameters(cfg))


def spec_from_model(model: Any, label: str) -> ModelSpec:
    """A loaded model: geometry from its config, parameters counted on the real tensors."""
    return ModelSpec(label, kv_geometry(model.config), sum(p.numel() for p in model.parameters()))


def spec_from_numbers(num_layers: int, num_heads: int, num_key_value_heads: int, head_dim: int,
                      parameters_billions: float = 0.0, max_positions: int = 0) -> ModelSpec:
    """Numbers typed in, each a whole number within `kvviz.engine.config.BOUNDS`."""
    num_layers = whole_number(num_layers, "layers", *BOUNDS["layers"])
    num_heads = whole_number(num_heads, "query heads", *BOUNDS["heads"])
    num_key_value_heads = whole_number(num_key_value_heads, "KV heads", *BOUNDS["kv_heads"])
    head_dim = whole_number(head_dim, "head_dim", *BOUNDS["head_dim"])
    max_positions = whole_number(max_positions, "context", *BOUNDS["positions"])
    parameters_billions = real_number(parameters_billions, "parameters (billions)", 0.0, MAX_PARAMETERS_BILLIONS)
    if num_key_value_heads > num_heads or num_heads % num_key_value_heads:
        raise InputError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_key_value_heads})")
    geo = geometry_from_numbers(num_layers, num_key_value_heads, head_dim, num_heads=num_heads, max_positions=max_positions)
    params = int(parameters_billions * 1e9) if parameters_billions > 0 else None
    return ModelSpec("typed in", geo, params, note="" if params else "type a parameter count to see the weights' share")


def presets_table(tokens: int = 8192, dtype: str = "bfloat16") -> list[dict[str, Any]]:
    """Every shipped config at a glance: attention, layer kinds, window, bytes per token, one
    sequence of `tokens` with windows capped, and what a window-blind sum would say."""
    rows = []
    for name, path in preset_configs().items():
        g = kv_geometry(read_config_file(path))
        kinds = g.layers_by_kind()
        rows.append({
            "model": name, "type": g.model_type, "attention": g.attention_kind,
            "layers": " + ".join(f"{n} {k.replace('_', ' ')}" for k, n in kinds.items()),
            "window": g.window or None,
            "heads / KV heads": f"{g.num_heads} / {g.num_key_value_heads}",
            f"KiB per token ({dtype})": round(g.bytes_per_token(dtype) / 1024, 2),
            f"GiB for {tokens:,} tokens": round(g.total_bytes(tokens, 1, dtype) / 2**30, 3),
            "GiB if windows were ignored": round(g.without_windows().total_bytes(tokens, 1, dtype) / 2**30, 3)
            if g.window else None,
            "fixed state (MiB)": round(g.state_bytes(1, dtype) / 2**20, 1) if g.state_elements else None,
        })
    return rows
