"""`python -m kvviz ...`: the command line.

    trace     run a model step by step and print the recorded trace (table or --json)
    bugs      the registry of cache variants: bugs, eviction policies, quantised caches
    diagnose  run the exact and a variant cache side by side and say where they part
    evict     quality vs memory of an eviction policy (held-out text, teacher-forced)
    quantize  quality vs memory of a quantised cache (held-out text, teacher-forced)
    memory    KV-cache bytes per token / per sequence for a config
    bench     measure capture overhead, cache speed-up and trace size
    reuse     serve two requests; the second reuses the first's cached prefix (or continues its chat)
    speculate prompt-lookup speculative decoding; rejected draft rows cropped from the cache
    beam      beam search on one cache whose rows are reordered by beam index

Each subcommand lives in its own module with a `register(subparsers)`; `COMMANDS` lists them.
Every failure a user can cause ends in one line on stderr and exit code 2 (`kvviz.InputError`,
argparse's usage errors); anything else is a kvviz bug and ends in one line and exit code 1
(KVVIZ_TRACEBACK=1 shows where). Never a traceback by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from kvviz.cli import bench, bugs, memory, serving, trace, variants
from kvviz.cli.common import check_out
from kvviz.validate import InputError, one_line, settings

# every subcommand module, in help order: one line each, no discovery
COMMANDS = (trace, bugs, variants, memory, bench, serving)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, like every other kvviz error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        say(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def say(message: str) -> None:
    """One line on stderr. Lone surrogates (a non-UTF-8 command line) are escaped, not a crash while erroring."""
    line = f"kvviz: error: {one_line(message)}"
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers: stderr carries only kvviz's one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m kvviz", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from kvviz.engine.session import is_out_of_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_transformers()
    try:
        settings()  # a deployment's KVVIZ_* variables, checked before any work
        check_out(args)  # a bad --out fails now, not after a long run
        return int(args.func(args))
    except ValueError as e:  # InputError and its kinds (ModelLoadError, RunAborted); geometry's ValueErrors
        say(str(e))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if is_out_of_memory(e):
            say("out of memory; use a smaller model, prompt or fewer steps")
            return 2
        if os.environ.get("KVVIZ_TRACEBACK"):
            traceback.print_exc()
        say(f"unexpected {type(e).__name__}: {e} (a kvviz bug: please report it; KVVIZ_TRACEBACK=1 shows where)")
        return 1


__all__ = ["COMMANDS", "InputError", "build_parser", "main"]
