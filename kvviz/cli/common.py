"""What the subcommands share: the model and sampling options, loading, output, the error type."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvviz.engine import DEFAULT_PROMPT

__all__ = ["DEFAULT_PROMPT", "CLIError", "add_model", "add_sampling", "emit", "load", "sampling_from_args"]


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bundled", help="'bundled' (default), a local checkpoint dir, or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: greedy)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (default)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)


def sampling_from_args(args: argparse.Namespace) -> Any:
    from kvviz.engine.sampling import Sampling

    sampled = args.temperature is not None or args.top_k or args.top_p < 1.0
    if args.greedy or not sampled:
        return Sampling(seed=args.seed)
    return Sampling(greedy=False, temperature=1.0 if args.temperature is None else args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def load(args: argparse.Namespace) -> Any:
    from kvviz.engine.models import load_model

    return load_model(args.model, device=args.device)


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """Print JSON (with --json) or the readable text; also write --out if given."""
    out = json.dumps(payload, indent=None if args.json else 2) if args.json else text
    if getattr(args, "out", None):
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(payload) if args.json or args.out.endswith(".json") else text)
    print(out)
