"""`python -m kvviz reuse | speculate | beam`: serving operations on the real cache.

    reuse      serve --prompt, then --then through a prefix store (or as the chat's next turn, --chat);
               the second request's reused rows, parity against a cold run, prefill time saved
    speculate  prompt-lookup drafts verified in one forward, rejected rows cropped; equals greedy decoding
    beam       beam search on one shared-prompt cache reordered by beam index; equals generate(num_beams=...)
"""

from __future__ import annotations

import argparse
from typing import Any

from kvviz.cli.common import CLIError, add_model, emit, load


def _text(lm: Any, ids: list[int]) -> str:
    return lm.tokenizer.decode(ids, skip_special_tokens=True)


def _check_prompt(text: str, flag: str) -> None:
    if not text.strip():
        raise CLIError(f"the prompt is empty: pass {flag} with some text")


def cmd_reuse(args: argparse.Namespace) -> int:
    from kvviz.serving.reuse import reuse_pair

    _check_prompt(args.prompt, "--prompt")
    _check_prompt(args.then, "--then")
    if args.repeats < 1:
        raise CLIError(f"--repeats must be at least 1, got {args.repeats}")
    lm = load(args)
    first, second = reuse_pair(lm, args.prompt, args.then, args.steps, block_size=args.block_size, chat=args.chat,
                               repeats=args.repeats)
    d = second.to_dict()
    payload = {**d, "mode": "chat" if args.chat else "prefix", "first": first.to_dict(),
               "requests": [first.request_ids().to_dict(), second.request_ids().to_dict()]}
    how = "turn 2 continued turn 1's cache" if args.chat else f"prefix store, blocks of {args.block_size} tokens"
    text = "\n".join([
        f"{how}",
        f"second request: {len(second.prompt_ids)} prompt tokens, {second.reused_tokens} reused, "
        f"{second.computed_tokens} computed",
        f"prefill: {second.prefill_ms:.1f} ms reused vs {second.cold_prefill_ms:.1f} ms cold "
        f"(saved {second.prefill_ms_saved:.1f} ms, medians of {args.repeats})",
        f"max |Δlogit| reused vs cold: {second.max_abs_logit_diff:.1e}; same output: {second.same_output}",
        f"generated: {_text(lm, list(second.output_ids))!r}",
    ])
    emit(args, payload, text)
    return 0


def cmd_speculate(args: argparse.Namespace) -> int:
    from kvviz.serving.speculative import speculate

    _check_prompt(args.prompt, "--prompt")
    lm = load(args)
    run = speculate(lm, args.prompt, args.steps, args.draft_tokens, max_ngram=args.ngram)
    rate = "-" if run.acceptance_rate is None else f"{run.acceptance_rate:.0%}"
    lines = [f"{'step':>4}  {'drafted':>7}  {'accepted':>8}  {'cropped':>7}  {'cache':>11}  new"]
    for s in run.steps:
        lines.append(f"{s.step:>4}  {s.proposed:>7}  {s.accepted:>8}  {s.rolled_back:>7}  "
                     f"{s.cache_len_verified:>4} → {s.cache_len_after:<4}  {_text(lm, list(s.new_ids))!r}")
    lines += ["", f"proposed {run.proposed}, accepted {run.accepted} ({rate}), rolled back {run.rolled_back_rows} rows; "
              f"{1 + len(run.steps)} forwards for {len(run.generated_ids)} tokens; equals greedy: {run.matches_greedy}",
              f"generated: {_text(lm, list(run.generated_ids))!r}"]
    emit(args, run.to_dict(), "\n".join(lines))
    return 0


def cmd_beam(args: argparse.Namespace) -> int:
    from kvviz.serving.beam import beam_search

    _check_prompt(args.prompt, "--prompt")
    lm = load(args)
    run = beam_search(lm, args.prompt, args.beams, args.steps)
    lines = [f"{i + 1}. {h.score:8.4f}  {_text(lm, list(h.ids))!r}" for i, h in enumerate(run.beams)]
    lines += ["", f"cache at the end: {run.num_beams} beams x {run.steps[-1].cache_shape[1]} rows "
              f"({run.cache_bytes:,} bytes); distinct rows {run.distinct_rows()}"]
    emit(args, run.to_dict(), "\n".join(lines))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the output to this file")


def register(sub: Any) -> None:
    from kvviz.serving.defaults import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, DEFAULT_DRAFT_TOKENS, DEFAULT_MAX_NGRAM, MAX_BEAMS

    p = sub.add_parser("reuse", help="serve two requests; the second reuses the first one's cached prefix")
    p.add_argument("--prompt", required=True, help="the first request")
    p.add_argument("--then", required=True, help="the second request (shares a prefix with the first, or --chat)")
    p.add_argument("--steps", type=int, default=8, help="tokens each request generates")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, choices=BLOCK_SIZES,
                   help="tokens per prefix block (vLLM uses 16)")
    p.add_argument("--chat", action="store_true", help="--then is the next chat turn, continuing the first's cache")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per path (medians)")
    _common(p)
    p.set_defaults(func=cmd_reuse)

    p = sub.add_parser("speculate", help="prompt-lookup speculative decoding; rejected rows cropped from the cache")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=32, help="new tokens to generate")
    p.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, help="most tokens drafted per step (k)")
    p.add_argument("--ngram", type=int, default=DEFAULT_MAX_NGRAM, help="longest n-gram looked up")
    _common(p)
    p.set_defaults(func=cmd_speculate)

    p = sub.add_parser("beam", help="beam search on one cache reordered by beam index")
    p.add_argument("--prompt", required=True)
    p.add_argument("--beams", type=int, default=3, help=f"number of beams (1-{MAX_BEAMS})")
    p.add_argument("--steps", type=int, default=16, help="most new tokens")
    _common(p)
    p.set_defaults(func=cmd_beam)
