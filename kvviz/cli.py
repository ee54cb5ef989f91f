"""`python -m kvviz ...`: the command line.

    trace     run a model step by step and print the recorded trace (table or --json)
    bugs      the catalogue of injectable cache bugs
    diagnose  run clean and buggy side by side and say where they part
    memory    KV-cache bytes per token / per sequence for a config
    bench     measure capture overhead, cache speed-up and trace size

Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_PROMPT = "It is a truth universally acknowledged, that"


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bundled", help="'bundled' (default), a local checkpoint dir, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: greedy)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (default)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def sampling_from_args(args: argparse.Namespace) -> Any:
    from kvviz.sampling import Sampling

    sampled = args.temperature is not None or args.top_k or args.top_p < 1.0
    if args.greedy or not sampled:
        return Sampling(seed=args.seed)
    return Sampling(greedy=False, temperature=1.0 if args.temperature is None else args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def load(args: argparse.Namespace) -> Any:
    from kvviz.models import load_model

    return load_model(args.model, device=args.device)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print JSON (with --json) or the readable text; also write --out if given."""
    out = json.dumps(payload, indent=None if args.json else 2) if args.json else text
    if getattr(args, "out", None):
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload) if args.json or args.out.endswith(".json") else text)
    print(out)


# -- trace -------------------------------------------------------------------------------------
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
    from kvviz.session import trace

    if not args.prompt.strip():
        raise CLIError("the prompt is empty: pass --prompt with some text")
    lm = load(args)
    t = trace(lm, args.prompt, args.steps, bug=args.bug, sampling=sampling_from_args(args), parity=not args.no_parity)
    d = t.to_dict()
    emit(args, d, format_trace(d))
    return 0


def add_trace(sub: Any) -> None:
    p = sub.add_parser("trace", help="run a model step by step and print what the KV cache did")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=16, help="new tokens to generate (prefill is step 0)")
    p.add_argument("--bug", default=None, help="inject a cache bug by name (see `kvviz bugs`)")
    p.add_argument("--no-parity", action="store_true", help="skip the no-cache recompute check per step")
    _add_sampling(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (Trace.to_dict())")
    p.add_argument("--out", default=None, help="also write the output to this file")
    p.set_defaults(func=cmd_trace)


# -- subcommands owned by other modules register here --------------------------------------
def _registrars() -> list[Callable[[Any], None]]:
    regs: list[Callable[[Any], None]] = [add_trace]
    for module, fn in (
        ("kvviz.cli_bugs", "add_commands"),
        ("kvviz.cli_memory", "add_commands"),
        ("kvviz.cli_bench", "add_commands"),
    ):
        try:
            mod = __import__(module, fromlist=[fn])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        regs.append(getattr(mod, fn))
    return regs


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers: stderr carries only kvviz's one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvviz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for reg in _registrars():
        reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kvviz.models import ModelLoadError
    from kvviz.session import InputError

    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_transformers()
    try:
        return int(args.func(args))
    except (CLIError, ModelLoadError, InputError, ValueError) as e:
        print(f"kvviz: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if "out of memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        print("kvviz: error: out of memory; use a smaller model, prompt or fewer steps", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
