"""`python -m kvviz memory`: KV-cache bytes per token, per sequence and per batch for a config.

    python -m kvviz memory --config data/configs/llama-3-8b.json --tokens 8192 --batch 4
    python -m kvviz memory --config llama-3-8b --dtype fp8 --json        # a preset name
    python -m kvviz memory --layers 32 --kv-heads 8 --head-dim 128       # numbers typed in
    python -m kvviz memory --config Qwen/Qwen2.5-0.5B                    # a hub id (online)
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
from kvviz.geometry import CACHE_DTYPES, human_bytes, normalize_dtype


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
    est = estimate(geo, tokens, args.batch, dtype,
                   weights_bytes=None if n_params is None else weight_bytes(n_params, args.weights_dtype))
    payload: dict[str, Any] = {"source": args.config or "numbers", **est.to_dict()}
    if n_params is not None:
        payload["parameters"] = n_params
        payload["weights_dtype"] = normalize_dtype(args.weights_dtype)
    payload["by_dtype"] = dtype_table(geo, tokens, args.batch)
    emit(args, payload, format_memory(payload))
    return 0


def format_memory(d: dict[str, Any]) -> str:
    g = d["geometry"]
    lines = [
        f"{d['source']}: {g['model_type']}, {g['num_layers']} layers, {g['num_heads']} query heads / "
        f"{g['num_key_value_heads']} KV heads ({g['attention']}), head_dim {g['head_dim']}",
        f"bytes per token  = 2 x {g['num_layers']} layers x {g['num_key_value_heads']} KV heads x {g['head_dim']} "
        f"x {d['dtype']} = {d['bytes_per_token']:,} B ({human_bytes(d['bytes_per_token'])})",
        f"one sequence of {d['tokens']:,} tokens: {human_bytes(d['bytes_per_sequence'])}",
        f"batch of {d['batch']}: {human_bytes(d['total_bytes'])} ({d['total_bytes']:,} B)",
    ]
    if "weights_bytes" in d:
        lines.append(
            f"weights: {d['parameters'] / 1e9:.2f} B parameters = {human_bytes(d['weights_bytes'])} in {d['weights_dtype']}; "
            f"weights + cache = {human_bytes(d['total_with_weights_bytes'])}"
        )
    lines.append("by cache dtype:  " + ",  ".join(f"{r['dtype']} {human_bytes(r['total_bytes'])}" for r in d["by_dtype"]))
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
    p.add_argument("--weights-dtype", default="float16", help="dtype of the weights, for their share")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--batch", type=int, default=1, help="sequences held at once")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the output to this file")
    p.set_defaults(func=cmd_memory)
