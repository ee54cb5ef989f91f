"""`python -m kvviz evict` and `python -m kvviz quantize`: what an approximate cache costs, measured.

    python -m kvviz evict --policy {window,streaming,h2o,tova} --budget N [--sinks S] [--heavy H]
                          [--text FILE] [--tokens T] [--passages P] [--model M] [--json]
    python -m kvviz quantize --bits {8,4} [--format int|fp8] [--keys token|channel] [--group G]
                             [--zero-point] [--text FILE] [--tokens T] [--passages P] [--model M] [--json]

Both feed held-out Austen (or --text) teacher-forced, once with the exact cache and once with the
variant, and print one JSON object: ppl, ppl_exact, mean_kl, top1_agree, tokens, peak_cache_len,
cache_bytes_per_token (scales included), the parameters and more (see `kvviz.variants.quality`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvviz.cli.common import CLIError, add_model, emit, load

POLICIES = {"window": "sliding_window", "streaming": "streaming_llm", "h2o": "h2o", "tova": "tova"}
DEFAULT_TOKENS = 256
DEFAULT_PASSAGES = 4


def _passages(lm: Any, args: argparse.Namespace) -> list[list[int]]:
    from kvviz.variants import quality

    if args.tokens > lm.info.context_length:
        raise CLIError(f"--tokens {args.tokens} exceeds the model's context of {lm.info.context_length}")
    if args.text is None:
        return quality.held_out_passages(lm, args.tokens, args.passages or DEFAULT_PASSAGES)
    path = Path(args.text)
    if not path.is_file():
        raise CLIError(f"--text {args.text}: no such file")
    return quality.passages_from_text(lm, path.read_text(encoding="utf-8", errors="replace"), args.tokens,
                                      args.passages or 1)


def format_quality(d: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={d[k]}" for k in d["params"])
    return "\n".join([
        f"{d['variant']} ({params}) on {d['model']}: {d['passages']} passage(s), {d['tokens']} predicted tokens",
        f"  perplexity      {d['ppl']:.3f}   (exact cache {d['ppl_exact']:.3f})",
        f"  mean KL         {d['mean_kl']:.4g} nats per token   top-1 agreement {d['top1_agree']:.1%}",
        f"  max |Δlogit|    {d['max_abs_logit_diff']:.3g}",
        f"  peak cache      {d['peak_cache_len']} rows x {d['cache_bytes_per_token']:g} B/token "
        f"(exact {d['exact_bytes_per_token']:g} B/token, {d['dtype']})",
    ])


def _measure(args: argparse.Namespace, name: str, params: dict[str, Any], extra: dict[str, Any]) -> int:
    from kvviz.variants import quality
    from kvviz.variants.diagnose import resolve

    lm = load(args)
    variant = resolve(lm, name, **params)  # unknown parameters, bad values and unfit models fail here
    if args.tokens < 2:
        raise CLIError(f"--tokens must be at least 2, got {args.tokens}")
    result = quality.measure(lm, variant, _passages(lm, args))
    d = result.to_dict()
    d.update(extra)
    emit(args, d, format_quality({**d, "params": result.params}))
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    name = POLICIES[args.policy]
    params: dict[str, Any] = {"budget": args.budget}
    for flag, value, owner in (("sinks", args.sinks, "streaming"), ("heavy", args.heavy, "h2o")):
        if value is not None:
            if args.policy != owner:
                raise CLIError(f"--{flag} is a parameter of --policy {owner}, not {args.policy}")
            params[flag] = value
    return _measure(args, name, params, {"policy": args.policy})


def cmd_quantize(args: argparse.Namespace) -> int:
    params = {"bits": args.bits, "format": args.format, "keys": args.keys, "group": args.group,
              "zero_point": args.zero_point}
    name = "fp8" if args.format == "fp8" else f"int{args.bits}"
    return _measure(args, "int8_cache", params, {"variant": name})


def _common(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--text", default=None, help="a UTF-8 text file to measure on (default: held-out Austen)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per passage (at most the model's context)")
    p.add_argument("--passages", type=int, default=None,
                   help=f"evenly spaced passages (default {DEFAULT_PASSAGES} of held-out Austen, 1 of --text)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the output to this file")


def register(sub: Any) -> None:
    p = sub.add_parser("evict", help="quality vs memory of an eviction policy (teacher-forced, against the exact cache)")
    p.add_argument("--policy", required=True, choices=sorted(POLICIES))
    p.add_argument("--budget", type=int, required=True, help="most rows a query attends over, its own included")
    p.add_argument("--sinks", type=int, default=None, help="streaming: first rows never evicted (default 4)")
    p.add_argument("--heavy", type=int, default=None, help="h2o: heavy-hitter rows (default half the budget)")
    _common(p)
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser("quantize", help="quality vs memory of a quantised cache (teacher-forced, against the exact cache)")
    p.add_argument("--bits", type=int, default=8, choices=(8, 4))
    p.add_argument("--format", default="int", choices=("int", "fp8"))
    p.add_argument("--keys", default="token", choices=("token", "channel"),
                   help="key groups span channels of one token, or one channel over tokens (KIVI)")
    p.add_argument("--group", type=int, default=32, help="values sharing one scale (must divide head_dim)")
    p.add_argument("--zero-point", action="store_true", help="asymmetric min/max groups (as KIVI)")
    _common(p)
    p.set_defaults(func=cmd_quantize)
