"""`python -m kvviz ...`: the command line.

    trace     run a model step by step and print the recorded trace (table or --json)
    bugs      the catalogue of injectable cache bugs
    diagnose  run clean and buggy side by side and say where they part
    memory    KV-cache bytes per token / per sequence for a config
    bench     measure capture overhead, cache speed-up and trace size
    reuse     serve two requests; the second reuses the first's cached prefix (or continues its chat)
    speculate prompt-lookup speculative decoding; rejected draft rows cropped from the cache
    beam      beam search on one cache whose rows are reordered by beam index

Each subcommand lives in its own module with a `register(subparsers)`; `COMMANDS` lists them.
Every failure a user can cause ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvviz.cli import bench, bugs, memory, serving, trace
from kvviz.cli.common import CLIError

# every subcommand module, in help order: one line each, no discovery
COMMANDS = (trace, bugs, memory, bench, serving)


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers: stderr carries only kvviz's one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvviz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kvviz.engine.models import ModelLoadError
    from kvviz.engine.session import InputError

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
