"""`python -m kvviz trace`: run a model step by step and print what the KV cache did."""

from __future__ import annotations

import argparse
from typing import Any

from kvviz.cli.common import CLIError, add_model, add_sampling, emit, load, sampling_from_args
from kvviz.validate import text


def format_trace(d: dict[str, Any]) -> str:
    lines = [
        f"model {d['model']} on {d['device']} ({d['config']['attention']}, {d['config']['num_layers']} layers, "
        f"{d['config']['num_heads']} heads / {d['config']['num_key_value_heads']} KV heads)",
        f"prompt: {d['prompt']!r} ({len(d['prompt_ids'])} tokens)",
        "",
        f"{'step':>4}  {'phase':<7} {'token':<16} {'p':>6}  {'cache':>5}  {'|Δlogit|':>9}  {'ms':>7}  top-3",
    ]
    for s in d["steps"]:
        top = ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in s["top_k"][:3])
        diff = "-" if s["max_abs_logit_diff"] is None else f"{s['max_abs_logit_diff']:.1e}"
        lines.append(
            f"{s['step']:>4}  {s['phase']:<7} {s['token']!r:<16} {s['prob']:>6.3f}  {s['cache_len']:>5}  {diff:>9}"
            f"  {s['time_ms']:>7.1f}  {top}"
        )
    lines += ["", f"generated: {d['generated_text']!r}"]
    return "\n".join(lines)


def cmd_trace(args: argparse.Namespace) -> int:
    from kvviz.api import trace

    if not text(args.prompt, "--prompt").strip():
        raise CLIError("the prompt is empty: pass --prompt with some text")
    sampling = sampling_from_args(args)  # checked before the model loads
    lm = load(args)
    t = trace(lm, args.prompt, args.steps, bug=args.bug, sampling=sampling, parity=not args.no_parity)
    d = t.to_dict()
    emit(args, d, format_trace(d))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("trace", help="run a model step by step and print what the KV cache did")
    add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=16, help="new tokens to generate (prefill is step 0)")
    p.add_argument("--bug", default=None, help="inject a cache bug by name (see `kvviz bugs`)")
    p.add_argument("--no-parity", action="store_true", help="skip the no-cache recompute check per step")
    add_sampling(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (Trace.to_dict())")
    p.add_argument("--out", default=None, help="also write the output to this file")
    p.set_defaults(func=cmd_trace)
