"""`python -m kvviz bugs` and `python -m kvviz diagnose`: the registry of variants and the exact-vs-variant check.

    python -m kvviz bugs [--kind bug|eviction|quantization] [--json]
    python -m kvviz diagnose --bug NAME [--param KEY=VALUE ...] [--model M] [--prompt TEXT] [--steps N]
                             [--layers L ...] [--start-step S] [sampling options] [--json]

An unknown name, parameter or scope, or an out-of-range layer, ends in one line on stderr and exit
code 2 (`cli.main` turns the ValueError into that line).
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from kvviz.cli.common import DEFAULT_PROMPT, CLIError, add_model, add_sampling, emit, load, sampling_from_args
from kvviz.validate import text, whole_number


def format_catalogue(entries: list[dict[str, Any]]) -> str:
    lines = []
    for e in entries:
        params = ", ".join(f"{k}={v}" for k, v in e["params"].items())
        lines.append(f"{e['name']} [{e['kind']}]: {e['title']}" + (f"  ({params})" if params else ""))
        for label in ("description", "symptom", "source"):
            wrapped = textwrap.wrap(e[label], width=96, initial_indent=f"    {label}: ", subsequent_indent="      ")
            lines.extend(wrapped)
        for scope, why in e["scope_notes"].items():
            lines.extend(textwrap.wrap(f"no {scope.replace('_', ' ')} scope: {why}", width=96,
                                       initial_indent="    ", subsequent_indent="      "))
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_bugs(args: argparse.Namespace) -> int:
    from kvviz.variants.registry import catalogue

    entries = catalogue(args.kind)
    emit(args, entries, format_catalogue(entries))  # type: ignore[arg-type]
    return 0


def format_diagnosis(d: dict[str, Any]) -> str:
    scope = "all layers" if d["layers"] is None else f"layers {d['layers']}"
    lines = [
        f"{d['kind']} {d['bug']} ({d['title']}) on {d['model']}, {scope}, from step {d['start_step']}",
        f"detected: {d['detected']}   first divergence step: {d['first_divergence_step']}   "
        f"first divergent layer: {d['first_divergent_layer']}   first different token: {d['first_divergent_token_step']}",
        "",
        f"{'step':>4}  {'exact':<14} {'variant':<14} {'|Δlogit|':>9} {'KL':>9}  {'cache exact/var':>15}  "
        "rows wrong/shifted/missing/extra/re-positioned",
    ]
    for s in d["steps"]:
        r = s["kv_rows"]
        lines.append(
            f"{s['step']:>4}  {s['clean_token']!r:<14} {s['buggy_token']!r:<14} {s['max_abs_logit_diff']:>9.2e} "
            f"{s['kl']:>9.2e}  {s['clean_cache_len']:>7}/{s['buggy_cache_len']:<7}  "
            f"{r['wrong']}/{r['shifted']}/{r['missing']}/{r['extra']}/{r['re-positioned']}"
        )
    lines += ["", *textwrap.wrap(d["diagnosis"], width=100), "",
              f"exact:   {d['clean_text']!r}", f"variant: {d['buggy_text']!r}"]
    return "\n".join(lines)


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """["budget=16", "zero_point=true", "format=fp8"] -> {"budget": 16, "zero_point": True, "format": "fp8"}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--param {pair!r}: write KEY=VALUE, e.g. --param budget=16")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.lstrip("-").isdigit():
            value = int(raw)
        out[key] = value
    return out


def cmd_diagnose(args: argparse.Namespace) -> int:
    from kvviz.variants.diagnose import diagnose
    from kvviz.variants.registry import get_variant

    params = parse_params(args.param)
    get_variant(args.bug, **params)  # an unknown name or parameter fails here, before a model is loaded
    if not text(args.prompt, "--prompt").strip():
        raise CLIError("the prompt is empty: pass --prompt with some text")
    steps = whole_number(args.steps, "--steps", 1)
    whole_number(args.start_step, "--start-step", 0, steps)  # a bug from step 1000 of 8 would never show
    sampling = sampling_from_args(args)
    lm = load(args)
    d = diagnose(lm, args.bug, args.prompt, args.steps, layers=args.layers, start_step=args.start_step,
                 sampling=sampling, **params).to_dict()
    emit(args, d, format_diagnosis(d))
    return 0


def register(sub: Any) -> None:
    from kvviz.variants.diagnose import DEFAULT_STEPS
    from kvviz.variants.registry import KINDS

    p = sub.add_parser("bugs", help="the registry of cache variants: bugs, eviction policies, quantised caches")
    p.add_argument("--kind", choices=KINDS, default=None, help="only this kind")
    p.add_argument("--json", action="store_true", help="print a JSON list of the entries")
    p.set_defaults(func=cmd_bugs)

    p = sub.add_parser("diagnose", help="run the exact and a variant cache side by side and say where they part")
    p.add_argument("--bug", required=True, help="a registry name (see `kvviz bugs`), or 'none' for the exact cache")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="a parameter of the variant (e.g. budget=16)")
    add_model(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="new tokens (prefill is step 0)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="act only in these layers (default: all)")
    p.add_argument("--start-step", type=int, default=0, help="act from this step on (0 = from prefill)")
    add_sampling(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the output to this file")
    p.set_defaults(func=cmd_diagnose)
