"""Measure the serving operations on a model and print README-ready markdown tables.

    python scripts/serving_bench.py [--model bundled] [--threads 1] [--repeats 7]

- prefix reuse: a second request sharing a system prompt (short, and long) with the first, per block
  size: prompt tokens reused / computed, prefill ms cold vs reused (medians), the parity;
- chat: the second turn continuing the first turn's cache;
- speculation: prompt-lookup acceptance and forwards per prompt and draft length k, decode ms
  against plain greedy decoding;
- beams: rows the cache holds (a copy per beam) against the distinct rows.
The machine's load average is printed before and after: timings on a busy machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `kvviz` importable

from kvviz.engine.models import load_model
from kvviz.serving import defaults as d
from kvviz.serving.beam import beam_search
from kvviz.serving.reuse import Conversation, PrefixStore, serve
from kvviz.serving.speculative import speculate

LONG_SYSTEM = (
    "You are a careful reader of Jane Austen. " + d.SYSTEM_PROMPT + " However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered as the rightful property of some one or other of their daughters. "
    "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is let at last? Mr. Bennet "
    "replied that he had not. But it is, returned she; for Mrs. Long has just been here, and she told me all about it."
)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def reuse_table(lm, repeats: int) -> list[str]:
    rows = ["| system prompt | block | 2nd prompt tokens | reused | computed | cold prefill | reused prefill | saved "
            "| max abs dlogit |", "|---|---|---|---|---|---|---|---|---|"]
    for label, system in (("short (Austen's first sentence)", d.SYSTEM_PROMPT), ("long (~140 tokens)", LONG_SYSTEM)):
        for block in (8, 16):
            store = PrefixStore(block)
            serve(lm, store, system + " Mr. Bennet said", 4, repeats=repeats)
            r = serve(lm, store, system + " Elizabeth replied", 4, repeats=repeats)
            rows.append(f"| {label} | {block} | {len(r.prompt_ids)} | {r.reused_tokens} | {r.computed_tokens} | "
                        f"{r.cold_prefill_ms:.2f} ms | {r.prefill_ms:.2f} ms | {r.prefill_ms_saved:.2f} ms "
                        f"({r.prefill_ms_saved / r.cold_prefill_ms:.0%}) | {r.max_abs_logit_diff:.1e} |")
    conv = Conversation(lm)
    conv.say(LONG_SYSTEM, 16, repeats=repeats)
    t = conv.say(" Then Elizabeth said", 8, repeats=repeats)
    rows.append(f"| chat turn 2 (after the long prompt + 16 tokens) | – | {len(t.prompt_ids)} | {t.reused_tokens} | "
                f"{t.computed_tokens} | {t.cold_prefill_ms:.2f} ms | {t.prefill_ms:.2f} ms | {t.prefill_ms_saved:.2f} ms "
                f"({t.prefill_ms_saved / t.cold_prefill_ms:.0%}) | {t.max_abs_logit_diff:.1e} |")
    return rows


def speculation_table(lm, steps: int) -> list[str]:
    rows = ["| prompt | k | drafted | accepted | acceptance | forwards for tokens | decode ms (greedy ms) | equals greedy |",
            "|---|---|---|---|---|---|---|---|"]
    prompts = {"the demo prompt (repeats itself)": d.SPECULATE_PROMPT,
               "Austen's first line": "It is a truth universally acknowledged, that",
               "a passage, then its start again": LONG_SYSTEM + " " + LONG_SYSTEM[:120]}
    for label, prompt in prompts.items():
        for k in (2, 4, 8):
            r = speculate(lm, prompt, steps, k)
            rate = "–" if r.acceptance_rate is None else f"{r.acceptance_rate:.0%}"
            rows.append(f"| {label} | {k} | {r.proposed} | {r.accepted} | {rate} | {1 + len(r.steps)} / "
                        f"{len(r.generated_ids)} | {r.spec_ms:.0f} ({r.greedy_ms:.0f}) | {r.matches_greedy} |")
    return rows


def beam_table(lm, steps: int) -> list[str]:
    rows = ["| beams | steps run | rows held (beams × length) | distinct rows | cache bytes |", "|---|---|---|---|---|"]
    for n in (2, 4, 8):
        r = beam_search(lm, "It is a truth universally acknowledged, that", n, steps)
        held = n * r.steps[-1].cache_shape[1]
        rows.append(f"| {n} | {len(r.steps)} | {held} | {r.distinct_rows()} ({r.distinct_rows() / held:.0%}) | "
                    f"{r.cache_bytes:,} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=64, help="tokens per speculation run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    print(f"model {lm.name}, {args.threads} torch thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average before {load()}\n")
    for table in (reuse_table(lm, args.repeats), speculation_table(lm, args.steps), beam_table(lm, 16)):
        print("\n".join(table), "\n")
    print(f"load average after {load()}")


if __name__ == "__main__":
    main()
