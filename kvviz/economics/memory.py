"""What a KV cache costs in memory, for any decoder config: estimates, presets, tables.

The per-token arithmetic lives in `kvviz.geometry`; this module adds what the memory page and
the CLI need around it: configs from files, presets, uploads or the hub, parameter counts for
the weights' share, estimates per sequence and batch, and the chart extents.

The numbers are the architecture's: what a serving engine (vLLM, TGI) stores. One implementation
stores more: transformers' Falcon with `new_decoder_architecture` (Falcon-40B) broadcasts its 8 KV
heads to all 128 query heads before caching them, 16x the formula.

Sources for the configs in `data/configs/`: each model's published `config.json` on the hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvviz.engine.config import BOUNDS, check_config, parameter_count, read_config_file
from kvviz.engine.config import parse_config_json as parse_config_json  # pages read uploads through here
from kvviz.geometry import CACHE_DTYPES, KVGeometry, dtype_bytes, geometry_from_numbers, kv_geometry, normalize_dtype
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
    tokens = whole_number(tokens, "tokens", 0, MAX_TOKENS)
    batch = whole_number(batch, "batch", 1, MAX_BATCH)
    return MemoryEstimate(geo, normalize_dtype(dtype), tokens, batch, weights_bytes)


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
