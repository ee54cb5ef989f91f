"""Quality against memory for every eviction policy and quantised cache: writes docs/variant_quality.json.

The Bug lab's "Quality against memory" chart and the README's table read this file. Each point is
`kvviz.variants.quality.measure` on the same held-out passages (teacher-forced: every variant sees
the exact run's tokens), i.e. the numbers `python -m kvviz evict` / `quantize` print for one setting.

    python scripts/variant_quality.py                       # bundled model, 4 passages of 256 tokens
    python scripts/variant_quality.py --passages 2 --tokens 128 --out /tmp/q.json
    python scripts/variant_quality.py --markdown            # also print the README table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import kvviz  # noqa: E402
from kvviz.variants import quality  # noqa: E402
from kvviz.variants.registry import get_variant  # noqa: E402

BUDGETS = (16, 32, 64, 128)
# (series, variant name, parameters, point label): one line per policy / format on the chart
EVICTION = [(series, name, {"budget": b, **extra}, f"budget {b}")
            for series, name, extra in (("sliding window", "sliding_window", {}),
                                        ("StreamingLLM (4 sinks)", "streaming_llm", {"sinks": 4}),
                                        ("H2O", "h2o", {}),
                                        ("TOVA", "tova", {}))
            for b in BUDGETS]
QUANTIZATION = [
    ("int8 per token", "int8_cache", {"group": 32}, "group 32"),
    ("int8 per token", "int8_cache", {"group": 16}, "group 16"),
    ("fp8 e4m3 per token", "fp8_cache", {"group": 32}, "group 32"),
    ("int4 per token", "int4_cache", {"group": 32}, "group 32"),
    ("int4 per token", "int4_cache", {"group": 16}, "group 16"),
    ("KIVI 4-bit (keys per channel)", "kivi", {"group": 32}, "group 32"),
    ("KIVI 4-bit (keys per channel)", "kivi", {"group": 16}, "group 16"),
]


def measure_all(lm: kvviz.LoadedModel, passages: list[list[int]]) -> list[dict[str, Any]]:
    exact = [quality.forced_logits(lm, ids, None)[0] for ids in passages]  # computed once, reused by every point
    rows = []
    for series, name, params, label in EVICTION + QUANTIZATION:
        t0 = time.perf_counter()
        q = quality.measure(lm, get_variant(name, **params), passages, exact)
        row = q.to_dict() | {"series": series, "label": label}
        rows.append(row)
        print(f"{series:32s} {label:10s} ppl {q.ppl:7.3f} (exact {q.ppl_exact:.3f})  KL {q.mean_kl:.4f}  "
              f"top-1 {q.top1_agree:.3f}  {q.peak_cache_bytes / 1024:7.1f} KiB  {time.perf_counter() - t0:.1f} s",
              flush=True)
    return rows


def markdown(data: dict[str, Any]) -> str:
    lines = ["| variant | setting | peak cache (KiB) | perplexity | mean KL (nats) | top-1 agreement |",
             "|---|---|---|---|---|---|",
             f"| exact cache | float32 | {data['exact_kib']:.0f} | {data['ppl_exact']:.3f} | 0 | 100% |"]
    for r in data["rows"]:
        lines.append(f"| {r['series']} | {r['label']} | {r['peak_cache_bytes'] / 1024:.0f} | {r['ppl']:.3f} | "
                     f"{r['mean_kl']:.2g} | {r['top1_agree']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per passage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "variant_quality.json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = kvviz.load_model(args.model)
    passages = quality.held_out_passages(lm, args.tokens, args.passages)
    t0 = time.perf_counter()
    rows = measure_all(lm, passages)
    first = rows[0]
    data = {
        "model": lm.info.name, "passages": len(passages), "tokens": args.tokens,
        "measured": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": round(time.perf_counter() - t0, 1), "machine": platform.processor() or platform.machine(),
        "torch_threads": args.threads, "ppl_exact": first["ppl_exact"],
        "exact_kib": first["exact_bytes_per_token"] * first["tokens"] / first["passages"] / 1024,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({len(rows)} points, {data['seconds']} s)")
    if args.markdown:
        print(markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
