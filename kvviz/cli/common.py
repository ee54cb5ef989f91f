"""What the subcommands share: the model and sampling options, loading, output, the error type."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kvviz.engine import DEFAULT_PROMPT
from kvviz.validate import InputError, dumps, real_number, whole_number

__all__ = ["DEFAULT_PROMPT", "CLIError", "add_model", "add_sampling", "check_out", "emit", "load", "sampling_from_args"]


class CLIError(InputError):
    """A user-facing failure of the command line: printed as one line, exit code 2."""


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
    """Greedy unless a sampling option is given; every option checked first (`--top-p nan` is not 'off')."""
    from kvviz.engine.sampling import Sampling

    top_p = real_number(args.top_p, "--top-p", 0.0, 1.0, lo_open=True)
    top_k = whole_number(args.top_k, "--top-k", 0)
    temperature = None if args.temperature is None else real_number(args.temperature, "--temperature", 0.0)
    sampled = temperature is not None or top_k or top_p < 1.0
    if args.greedy or not sampled:
        return Sampling(seed=args.seed)
    return Sampling(greedy=False, temperature=1.0 if temperature is None else temperature,
                    top_k=top_k, top_p=top_p, seed=args.seed)


def check_out(args: argparse.Namespace) -> None:
    """`--out` must name a file in an existing folder: checked before the work, not after it."""
    out = getattr(args, "out", None)
    if out is None:
        return
    path = Path(out).expanduser()
    if not out.strip() or path.is_dir():
        raise CLIError(f"--out {out!r} is a directory: give a file name, e.g. {Path(out) / 'trace.json'}")
    if not path.parent.is_dir():
        raise CLIError(f"--out {out!r}: the folder {str(path.parent)!r} does not exist")


def load(args: argparse.Namespace) -> Any:
    from kvviz.engine.models import load_model

    return load_model(args.model, device=args.device)


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """Print JSON (with --json) or the readable text; also write --out if given."""
    out = dumps(payload) if args.json else text  # strict JSON: NaN is written as null
    if getattr(args, "out", None):
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(dumps(payload) if args.json or args.out.endswith(".json") else text)
        except OSError as e:
            raise CLIError(f"cannot write --out {args.out!r}: {e.strerror or type(e).__name__}") from None
    print(out)
