"""`python -m kvviz memory`: KV-cache bytes per token, per sequence and per batch for a config.

    python -m kvviz memory --config data/configs/llama-3-8b.json --tokens 8192 --batch 4
    python -m kvviz memory --config deepseek-v3 --dtype bf16 --json      # a preset name (MLA)
    python -m kvviz memory --config gemma-3-12b --tokens 32768           # windowed layers capped
    python -m kvviz memory --config llama-3-8b --dtype int4 --group-size 32
    python -m kvviz memory --layers 32 --kv-heads 8 --head-dim 128       # numbers typed in
    python -m kvviz memory --config Qwen/Qwen2.5-0.5B                    # a hub id (online)

The JSON keeps `bytes_per_token` (one more token while below every window) and `total_bytes`
(--tokens x --batch, windowed layers capped) and adds `attention` (MHA/GQA/MQA/MLA),
`layers_by_kind` ({global, windowed, no_kv: count}), `window` where there is one,
`scale_bytes_per_token` (and `group_size`) for quantized dtypes, `bytes_by_kind`, and for MLA
`decompressed_bytes_per_token`, for hybrids `state_bytes` (and as transformers stores it).
"""

from __future__ import annotations

import argparse
from typing import Any

from kvviz.cli.common import CLIError, emit
from kvviz.economics.memory import (
    dtype_table,
    estimate,
    load_config_source,
    preset_configs,
    spec_from_config,
    spec_from_numbers,
    weight_bytes,
)
from kvviz.geometry import (
    CACHE_DTYPES,
    LAYER_KIND_LABELS,
    geometry_from_numbers,
    human_bytes,
    human_count,
    kv_geometry,
    normalize_dtype,
)


def cmd_memory(args: argparse.Namespace) -> int:

    numbers = (args.layers, args.kv_heads, args.head_dim)
    if args.config and any(n is not None for n in numbers):
        raise CLIError("pass either --config or --layers/--kv-heads/--head-dim, not both")
    n_params = None
    if args.config:
        spec = spec_from_config(load_config_source(args.config), args.config)  # read strictly, fields bounded
        geo, n_params = spec.geometry, spec.parameters
    elif all(n is not None for n in numbers):
        heads = args.kv_heads if args.heads is None else args.heads
        geo = spec_from_numbers(args.layers, heads, args.kv_heads, args.head_dim).geometry  # each number checked
    else:
        raise CLIError(
            "say which model: --config PATH_OR_ID (a config.json, a checkpoint dir, a preset such as "
            f"{', '.join(list(preset_configs())[:3])}, or a hub id), or all of --layers, --kv-heads and --head-dim"
        )
    dtype = normalize_dtype(args.dtype)
    tokens = args.tokens if args.tokens is not None else geo.context_length
    est = estimate(geo, tokens, args.batch, dtype, group_size=args.group_size,
                   weights_bytes=None if n_params is None else weight_bytes(n_params, args.weights_dtype))
    payload: dict[str, Any] = {"source": args.config or "numbers", **est.to_dict()}
    if n_params is not None:
        payload["parameters"] = n_params
        payload["weights_dtype"] = normalize_dtype(args.weights_dtype)
    payload["by_dtype"] = dtype_table(geo, tokens, args.batch, args.group_size)
    emit(args, payload, format_memory(payload))
    return 0


def _per_layer_formula(d: dict[str, Any]) -> str:
    g = d["geometry"]
    if d["attention"] == "MLA":
        return f"(kv_lora_rank {g['kv_lora_rank']} + rope {g['qk_rope_head_dim']})"
    v = g["v_head_dim"] or g["head_dim"]
    if v != g["head_dim"]:
        return f"{g['num_key_value_heads']} KV heads x ({g['head_dim']} + {v})"
    return f"2 x {g['num_key_value_heads']} KV heads x {g['head_dim']}"


def format_memory(d: dict[str, Any]) -> str:
    g = d["geometry"]
    kinds = d["layers_by_kind"]
    cached = kinds.get("global", 0) + kinds.get("windowed", 0)
    layers = ", ".join(f"{n} {LAYER_KIND_LABELS[k]}" for k, n in kinds.items())
    lines = [
        f"{d['source']}: {g['model_type']}, {g['num_layers']} layers ({layers}), {g['num_heads']} query heads / "
        f"{g['num_key_value_heads']} KV heads ({d['attention']}), head_dim {g['head_dim']}"
        + (f", window {d['window']:,}" if "window" in d else ""),
        f"bytes per token  = {cached} cached layers x {_per_layer_formula(d)} x {d['dtype']}"
        + (f" + scales (group {d['group_size']})" if d.get("scale_bytes_per_token") else "")
        + f" = {d['bytes_per_token']:,} B ({human_bytes(d['bytes_per_token'])})",
    ]
    if d.get("scale_bytes_per_token"):
        lines.append(f"  of which scales/zero points: {d['scale_bytes_per_token']:,} B per token")
    if "window" in d:
        lines.append(f"past the window: +{d['growth_bytes_per_token']:,} B per token (global layers only)")
    if "decompressed_bytes_per_token" in d:
        lines.append(f"MLA decompressed per-head K/V (what attention multiplies, not kept): "
                     f"{d['decompressed_bytes_per_token']:,} B per token")
    lines += [
        f"one sequence of {d['tokens']:,} tokens: {human_bytes(d['bytes_per_sequence'])}",
        f"batch of {d['batch']}: {human_bytes(d['total_bytes'])} ({d['total_bytes']:,} B)"
        + (f"; ignoring the window it would be {human_bytes(d['total_bytes_without_windows'])}"
           if "total_bytes_without_windows" in d else ""),
    ]
    if "state_bytes" in d:
        lines.append(f"plus a fixed state for {kinds['no_kv']} layers without a KV cache: {human_bytes(d['state_bytes'])} "
                     f"in {d['state_dtype']} ({human_bytes(d['state_bytes_transformers'])} as transformers 5.23 stores it)")
    if "weights_bytes" in d:
        lines.append(
            f"weights: {human_count(d['parameters'])} parameters = {human_bytes(d['weights_bytes'])} in {d['weights_dtype']}; "
            f"weights + cache = {human_bytes(d['total_with_weights_bytes'])}"
        )
    lines.append("by cache dtype:  " + ",  ".join(f"{r['dtype']} {human_bytes(r['total_bytes'])}" for r in d["by_dtype"]))
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("memory", help="KV-cache bytes per token / per sequence / per batch for a config")
    p.add_argument("--config", default=None,
                   help="a config.json, a checkpoint directory, a preset name (data/configs) or a hub id (online)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (with --kv-heads and --head-dim)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads per layer")
    p.add_argument("--head-dim", type=int, default=None, help="size of one head")
    p.add_argument("--heads", type=int, default=None, help="query heads (default: = --kv-heads)")
    p.add_argument("--dtype", default="float16", help=f"cache dtype: {', '.join(CACHE_DTYPES)} (or fp16, bf16, fp32)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int8/int4: elements per scale (and zero point) along each cached vector (default 64)")
    p.add_argument("--weights-dtype", default="float16", help="dtype of the weights, for their share")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--batch", type=int, default=1, help="sequences held at once")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the output to this file")
    p.set_defaults(func=cmd_memory)
