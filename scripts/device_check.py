"""Check kvviz on a GPU: parity in half precision, capture overhead, step time, Play's frame supply.

Run it as-is on a CUDA machine (no browser needed):

    python scripts/device_check.py                 # bundled model and a GPT-2-small-sized random model, bf16 + fp16
    python scripts/device_check.py --device cpu    # the same checks on the CPU (float32): a dry run of the script

It prints one JSON object. Per model and dtype:
- parity_max_abs_logit_diff: largest |cached - full-recompute| next-token logit over a run (half
  precision is looser than float32's ~1e-6; the page colours it green under 1e-4 in float32);
- capture_overhead: a kvviz step with full recording / a plain transformers step, same weights
  (kvviz.bench, median over contexts), and step_ms: the kvviz decode step's median;
- transfers_per_step: device -> host copies one recorded step makes (kvviz moves a step's records
  in one transfer, into pinned memory, instead of one per layer and tensor);
- play_frames_per_s: how fast the server produces Play's frames: the remaining steps of a run
  (parity on, as the page runs) plus the step view's payload, per second. The browser then shows
  them at the speed picked (`scripts/browser_bench.py` measures that side).
Without CUDA it says so and exits 2 (unless --device cpu).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a file

MODELS = ("bundled", "random:gpt2-small")


def load(name: str, device: str, dtype: str) -> Any:
    """A LoadedModel on `device` in `dtype`: the bundled checkpoint, a random GPT-2-small, or a tiny test model."""
    import torch

    import kvviz
    from kvviz.bench import synthetic_model
    from kvviz.engine.models import from_model
    from kvviz.testing import tiny_model

    if name == "bundled":
        return kvviz.load_model("bundled", device=device, dtype=dtype)
    built = synthetic_model(name) if name.startswith("random:") else tiny_model(name.removeprefix("tiny:") or "llama_gqa")
    model = built.model.to(device=torch.device(device), dtype=getattr(torch, dtype))
    return from_model(model, built.tokenizer, name=name)


def count_transfers(lm: Any, prompt: str) -> int:
    """How many device -> host transfers one decode step makes."""
    import kvviz
    from kvviz.engine import capture

    calls = []
    real = capture._one_transfer
    capture._one_transfer = lambda tensors: calls.append(len(tensors)) or real(tensors)
    try:
        session = kvviz.Session(lm, prompt, 2, parity=False, stop_at_eos=False)
        session.step()
        calls.clear()
        session.step()
    finally:
        capture._one_transfer = real
    return len(calls)


def play_rate(lm: Any, prompt: str, steps: int) -> dict[str, float]:
    """The server side of Play: the remaining steps of a run (parity on) and the view's payload."""
    import kvviz
    from kvviz.figures.step import step_view_payload
    from kvviz.geometry import kv_geometry

    session = kvviz.Session(lm, prompt, steps, stop_at_eos=False)
    session.step()  # prefill: on screen before Play
    t0 = time.perf_counter()
    session.run()
    t1 = time.perf_counter()
    t = session.trace()
    per_token = kv_geometry(lm.model.config).bytes_per_token(t.model.dtype)
    step_view_payload(t, lm.info.num_layers - 1, 0, rope=True, bytes_per_token=per_token)
    t2 = time.perf_counter()
    return {"steps": steps - 1, "compute_s": round(t1 - t0, 3), "payload_s": round(t2 - t1, 3),
            "play_frames_per_s": round((steps - 1) / (t2 - t0), 1),
            "step_ms": round(statistics.median(s.time_ms for s in t.steps[1:]), 2),
            "parity_max_abs_logit_diff": max(s.max_abs_logit_diff or 0.0 for s in t.steps)}


def check(name: str, device: str, dtype: str, steps: int, repeats: int) -> dict[str, Any]:
    from kvviz.bench import prompt_of_length, run_bench

    lm = load(name, device, dtype)
    prompt = prompt_of_length(lm.tokenizer, 32)
    bench = run_bench(lm, contexts=[16, min(256, lm.info.context_length - repeats - 10)], repeats=repeats, warmup=2)
    return {"model": name, "device": lm.info.device, "dtype": lm.info.dtype, "threads": lm.threads,
            "parameters": bench["model"]["parameters"], "capture_overhead": round(bench["capture_overhead"], 3),
            "capture_overhead_by_context": {k: round(v, 3) for k, v in bench["capture_overhead_by_context"].items()},
            "bench_step_ms": {k: round(v, 2) for k, v in bench["step_ms"].items()},
            "transfers_per_step": count_transfers(lm, prompt), **play_rate(lm, prompt, steps)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="bundled, random:gpt2-small, tiny:llama_gqa, ...")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: bfloat16 float16 on cuda, float32 on cpu")
    ap.add_argument("--steps", type=int, default=24, help="tokens in the Play run")
    ap.add_argument("--repeats", type=int, default=20, help="paired steps per context for the capture overhead")
    args = ap.parse_args(argv)

    import torch

    from kvviz.bench import machine_info

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "error": "scripts/device_check.py needs a CUDA GPU: torch.cuda.is_available() is "
                          "False on this machine. Run it on a GPU machine, or pass --device cpu for a dry run on the CPU."}))
        return 2
    dtypes = args.dtypes or (["bfloat16", "float16"] if args.device.startswith("cuda") else ["float32"])
    results = [check(m, args.device, d, args.steps, args.repeats) for m in args.models for d in dtypes]
    print(json.dumps({"cuda": args.device.startswith("cuda"), "machine": machine_info(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
