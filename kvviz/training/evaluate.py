"""Evaluate a checkpoint of the bundled model and write every number its model card quotes.

Works on any checkpoint directory (``--model DIR``; the committed ``kvviz/bundled`` by default),
v1 (no BOS) and v2 (BOS added by the tokenizer) alike, from the checkpoint and corpus only:

* held-out bits per character (``metrics.py``) at the training context (256 tokens, stride
  128), per novel, and at ``max_position_embeddings`` (512, stride 256: RoPE past training);
* the head analysis of ``heads.py`` -> ``heads.json``: per layer and head the previous-token,
  sink (Xiao et al. 2023, StreamingLLM), self and induction (Olsson et al. 2022) scores and the
  attention entropy, a label, and per label the list of heads and the strongest one; plus
  ``heads.svg``, a layers x heads heatmap of the sink and induction scores for the card;
* repetition: 200 greedy tokens after the README's prompt, and their distinct 4-grams;
* greedy and seeded-sampled continuations of a few prompts, tokenized as the app does
  (``tokenizer(prompt)``: with BOS for v2, without for v1);
* timings: loading model + tokenizer, generating 100 tokens with the cache;
* the issue's targets (issue 13), each with its value and whether it is met.

``--compare DIR`` evaluates a second checkpoint (e.g. v1) the same way and records its
headline numbers beside this one's in ``eval.json`` (``compare``). ``--quick`` scores a slice
(the first 20,000 held-out characters of each novel, fewer windows and sequences for the
heads) and skips context 512, the prompt continuations and timings: a progress check.

Run: ``python -m kvviz.training.evaluate [--model DIR] [--compare DIR] [--quick] [--markdown]``
(writes ``eval.json``, ``heads.json`` and ``heads.svg`` into ``--out``, default ``--model``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kvviz.training import heads as head_scores
from kvviz.training.metrics import bits_per_char, distinct_ngrams
from kvviz.training.prepare_data import DATA_DIR, REPO_ROOT, load_split_by_novel
from kvviz.training.svg import heatmap_svg

BUNDLED_DIR = REPO_ROOT / "kvviz" / "bundled"

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Emma Woodhouse, handsome, clever, and rich,",
    '"My dear Mr. Bennet," said his lady to him one day,',
    "Captain Wentworth",
    "Mr. Darcy looked at Elizabeth",
]
REPEAT_PROMPT = PROMPTS[0]  # the README's
REPEAT_TOKENS = 200
SAMPLE_SEED = 0
SAMPLE_KW = {"do_sample": True, "temperature": 0.8, "top_k": 40}
QUICK_CHARS = 20_000  # held-out characters per novel in --quick
FULL_HEADS = {"windows_per_text": 8, "n_induction": 8}
QUICK_HEADS = {"windows_per_text": 2, "n_induction": 4}
TARGETS = {"bits_per_char_max": 1.36, "bits_per_char_aim": 1.28, "sink_min": 0.5, "induction_min": 0.5}


def load(path: Path = BUNDLED_DIR, attn: str = "eager") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint as float32 (it is stored in fp16) with the given attention implementation."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def held_out(model: PreTrainedModel, tok: PreTrainedTokenizerBase, novels: list[tuple[str, str]], quick: bool) -> dict:
    """Bits/char at context 256 (per novel too) and, unless quick, at the model's full context."""
    texts = [t[:QUICK_CHARS] if quick else t for _title, t in novels]
    at_256 = bits_per_char(model, tok, texts, context=256, stride=128)
    out = {
        "split": "data/austen/valid.txt.gz (last 5% of paragraphs of each novel)"
        + (f", first {QUICK_CHARS:,} characters of each novel (--quick)" if quick else ""),
        "context_256": {k: v for k, v in at_256.items() if k != "bits_per_char_by_text"},
        "bits_per_char_by_novel": {title: round(b, 4) for (title, _t), b in zip(novels, at_256["bits_per_char_by_text"])},
    }
    if not quick:
        ctx = model.config.max_position_embeddings
        full = bits_per_char(model, tok, texts, context=ctx, stride=ctx // 2)
        out[f"context_{ctx}"] = {k: v for k, v in full.items() if k != "bits_per_char_by_text"}
    return out


@torch.no_grad()
def greedy_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, n: int) -> list[int]:
    """Exactly ``n`` greedy tokens after ``prompt`` (tokenized as the app does; EOS suppressed)."""
    x = tok(prompt, return_tensors="pt")
    out = model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, x["input_ids"].shape[1] :].tolist()


def repetition(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> dict:
    """Distinct 4-grams (count and ratio) of 200 greedy tokens after the README's prompt."""
    ids = greedy_ids(model, tok, REPEAT_PROMPT, REPEAT_TOKENS)
    text = tok.decode(ids, skip_special_tokens=True)
    return {"prompt": REPEAT_PROMPT, "tokens": REPEAT_TOKENS, "distinct_4grams": distinct_ngrams(ids, 4), "text": text}


@torch.no_grad()
def continuations(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 60
) -> list[dict]:
    """Greedy and seeded-sampled continuations of each prompt (tokenized as the app does)."""
    out = []
    for prompt in prompts:
        x = tok(prompt, return_tensors="pt")
        n = x["input_ids"].shape[1]
        greedy = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        torch.manual_seed(SAMPLE_SEED)
        sampled = model.generate(**x, max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id, **SAMPLE_KW)
        out.append(
            {
                "prompt": prompt,
                "greedy": tok.decode(greedy[0, n:], skip_special_tokens=True),
                "sampled": tok.decode(sampled[0, n:], skip_special_tokens=True),
            }
        )
    return out


def timings(path: Path, repeats: int = 5) -> dict:
    """Median seconds to load model + tokenizer (libraries already imported), and to generate
    100 tokens greedily with the KV cache from the README's prompt (after one warm-up run)."""
    loads = []
    for _ in range(repeats):
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
        loads.append(time.perf_counter() - t)
    x = tok(REPEAT_PROMPT, return_tensors="pt")
    kw = {"max_new_tokens": 100, "min_new_tokens": 100, "do_sample": False, "pad_token_id": tok.eos_token_id}
    with torch.no_grad():
        model.generate(**x, **kw)  # warm-up: the first forwards after loading are slow
        gens = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(**x, **kw)
            gens.append(time.perf_counter() - t)
    return {
        "load_seconds_median": round(statistics.median(loads), 3),
        "load_seconds_first": round(loads[0], 3),
        "generate_100_tokens_seconds_median": round(statistics.median(gens), 3),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "attn_implementation": "sdpa (default)",
    }


def headline(result: dict, heads: dict) -> dict:
    """The few numbers the issue asks about, flat (for the progress log and ``--compare``)."""
    rep = result["repetition"]["distinct_4grams"]
    return {
        "model": result["model"],
        "step": result["training"].get("steps"),
        "bits_per_char_256": round(result["held_out"]["context_256"]["bits_per_char"], 4),
        "quick": result["quick"],
        **{f"max_{score}": heads["max"][score] for score in ("sink", "induction", "prev_token")},
        "distinct_4grams": rep["distinct"],
        "distinct_4grams_ratio": round(rep["ratio"], 4),
    }


def targets(result: dict, heads: dict, compare: dict | None) -> dict:
    """Issue 13's targets: each measured value and whether it is met (bits/char only counts
    on the whole held-out split, not a --quick slice)."""
    bpc = result["held_out"]["context_256"]["bits_per_char"]
    out = {
        "bits_per_char_256": {
            "value": round(bpc, 4),
            "max": TARGETS["bits_per_char_max"],
            "aim": TARGETS["bits_per_char_aim"],
            "met": bpc <= TARGETS["bits_per_char_max"],
            "aim_met": bpc <= TARGETS["bits_per_char_aim"],
            "whole_split": not result["quick"],
        },
        "sink": {**heads["max"]["sink"], "min": TARGETS["sink_min"], "met": heads["max"]["sink"]["score"] >= TARGETS["sink_min"]},
        "induction": {
            **heads["max"]["induction"],
            "min": TARGETS["induction_min"],
            "met": heads["max"]["induction"]["score"] >= TARGETS["induction_min"],
        },
        "previous_token_head": {"heads": heads["summary"]["previous-token"], "met": bool(heads["summary"]["previous-token"])},
    }
    if compare is not None:
        mine, theirs = result["repetition"]["distinct_4grams"]["distinct"], compare["distinct_4grams"]
        out["repeats_less_than_compare"] = {"distinct_4grams": mine, "compare": theirs, "met": mine > theirs}
    return out


def evaluate(path: Path = BUNDLED_DIR, data_dir: Path = DATA_DIR, quick: bool = False) -> tuple[dict, dict]:
    """Everything above but targets; returns ``(eval_json, heads_json)``."""
    valid = load_split_by_novel("valid", data_dir)
    novels = [(title, "\n".join(p)) for title, p in valid]
    model, tok = load(path, attn="sdpa")
    eager, _ = load(path, attn="eager")
    heads = head_scores.analyse(eager, tok, [t for _title, t in novels], **(QUICK_HEADS if quick else FULL_HEADS))
    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    result = {
        "model": str(path),
        "quick": quick,
        "held_out": held_out(model, tok, novels, quick),
        "params": sum(p.numel() for p in model.parameters()),
        "tokenizer_prefix": head_scores.special_prefix(tok),
        "repetition": repetition(model, tok),
        "head_summary": heads["summary"],
        "head_best": heads["best"],
        "head_max": heads["max"],
        "training": {k: training.get(k) for k in ("status", "steps", "tokens_seen", "epochs", "seconds", "threads", "device")},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    if not quick:
        result["continuations"] = continuations(model, tok, PROMPTS)
        result["sampling"] = {"seed": SAMPLE_SEED, **SAMPLE_KW, "max_new_tokens": 60}
        result["timings"] = timings(path)
    return result, heads


def heads_svg(heads: dict, name: str) -> str:
    """The card's heatmap: sink and induction score per layer (rows) and head (columns)."""
    grid = {s: [[h[s] for h in row] for row in heads["layers"]] for s in ("sink", "induction")}
    m = heads["method"]
    return heatmap_svg(
        [("sink: weight on position 0", grid["sink"]), ("induction: [BOS] R R", grid["induction"])],
        caption=f"{name}; sink over {m['windows']} held-out windows of {m['window']}, queries >= {m['min_query']}",
    )


def markdown(result: dict, heads: dict) -> str:
    """Tables for the model card: per head prev/sink/induction and label; continuations."""
    n_heads = len(heads["layers"][0])
    lines = ["| layer | " + " | ".join(f"H{h}" for h in range(n_heads)) + " |", "|---|" + "---|" * n_heads]
    for li, row in enumerate(heads["layers"]):
        cells = [f"{s['prev_token']:.2f} / {s['sink']:.2f} / {s['induction']:.2f} {_short(s['label'])}" for s in row]
        lines.append(f"| {li} | " + " | ".join(cells) + " |")
    lines += ["", "best: " + json.dumps(heads["best"]), ""]
    for c in result.get("continuations", []):
        lines += [f"**{c['prompt']}**", "", f"- greedy: {c['greedy']!r}", f"- sampled: {c['sampled']!r}", ""]
    return "\n".join(lines)


def _short(label: str) -> str:
    return {"previous-token": "**prev**", "sink": "**sink**", "self": "**self**", "induction": "**ind**", "mixed": ""}[label]


def write(out: Path, result: dict, heads: dict) -> None:
    """``eval.json``, ``heads.json`` and ``heads.svg`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "heads.json").write_text(json.dumps(heads, indent=2) + "\n")
    step = result["training"].get("steps")
    (out / "heads.svg").write_text(heads_svg(heads, f"{Path(result['model']).name}" + (f", step {step}" if step else "")))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate a bundled-model checkpoint; write eval.json, heads.json, heads.svg.")
    ap.add_argument("--model", type=Path, default=BUNDLED_DIR)
    ap.add_argument("--compare", type=Path, default=None, help="a second checkpoint (e.g. v1) to evaluate the same way")
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--out", type=Path, default=None, help="directory for the outputs (default: --model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--quick", action="store_true", help="a held-out slice, fewer head samples; no context 512, continuations, timings"
    )
    ap.add_argument("--markdown", action="store_true", help="also print tables for the model card")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result, heads = evaluate(args.model, args.data_dir, args.quick)
    compare = headline(*evaluate(args.compare, args.data_dir, args.quick)) if args.compare else None
    result["targets"] = targets(result, heads, compare)
    if compare is not None:
        result["compare"] = compare
    write(args.out or args.model, result, heads)
    for row in (headline(result, heads), compare):
        if row is not None:
            print(json.dumps(row))
    print(json.dumps({k: v["met"] for k, v in result["targets"].items()}))
    print(f"greedy: {REPEAT_PROMPT}{result['repetition']['text'][:300]!r}")
    if args.markdown:
        print(markdown(result, heads))
    assert math.isfinite(result["held_out"]["context_256"]["bits_per_char"])


if __name__ == "__main__":
    main()
