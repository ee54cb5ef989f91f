"""`python -m kvviz bench`: capture overhead, cache speed-up and trace size (see `kvviz/bench.py`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from kvviz.cli.common import emit, load
from kvviz.validate import whole_number


def cmd_bench(args: argparse.Namespace) -> int:
    from kvviz import bench

    if args.threads is not None:
        torch.set_num_threads(whole_number(args.threads, "--threads", 1, 1024))
    lm = bench.synthetic_model(args.model) if args.model.startswith("random:") else load(args)
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = bench.run_bench(lm, contexts=args.contexts, repeats=args.repeats, warmup=args.warmup, progress=progress)
    emit(args, result, bench.format_bench(result))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure capture overhead, cache speed-up and trace bytes per step")
    p.add_argument("--model", default="bundled",
                   help="'bundled' (default), a local checkpoint dir, a hub id, or random:gpt2-small "
                   "(GPT-2-small-sized, random weights, nothing downloads)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: best available)")
    p.add_argument("--repeats", type=int, default=50, help="timed decode steps per context (medians are reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps per context before timing")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="context lengths in tokens (default: 16 64 256 1024, those that fit the model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the output to this file")
    p.set_defaults(func=cmd_bench)
