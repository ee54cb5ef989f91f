"""Evaluate the bundled model and write the numbers its model card quotes.

Reproduces, from the committed checkpoint and corpus only:

* held-out bits per character (see ``metrics.py``) at the training context (256 tokens,
  stride 128) and at the full ``max_position_embeddings`` (512, stride 256: RoPE beyond the
  training length);
* a head analysis (``heads.json``): for every layer and head, over windows of validation text
  fed *without* BOS (as kvviz feeds a prompt), the mean share of attention that a query puts
  on the previous token, on the first token of the window, and on itself, plus the mean
  attention entropy; and an induction score, the classic test of Olsson et al. 2022 ("In-context
  Learning and Induction Heads"): on a random token sequence repeated twice, the attention a
  token of the second copy puts on the token just after its earlier occurrence. Heads are then
  labelled by the largest share (threshold 0.4) so the card can say "which heads do what";
* greedy continuations (deterministic) and sampled ones (temperature 0.8, top-k 40, one fixed
  seed per prompt) of a few prompts, given without BOS;
* timings: ``from_pretrained`` of model + tokenizer, and generating 100 tokens with the cache.

Attention weights need ``attn_implementation="eager"`` (sdpa returns none).

Run: ``python -m kvviz.training.evaluate`` (writes ``kvviz/bundled/eval.json`` and
``kvviz/bundled/heads.json``; ``--markdown`` also prints tables for the model card).
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

from kvviz.training.metrics import bits_per_char
from kvviz.training.prepare_data import DATA_DIR, REPO_ROOT, load_split_by_novel

BUNDLED_DIR = REPO_ROOT / "kvviz" / "bundled"

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "Emma Woodhouse, handsome, clever, and rich,",
    '"My dear Mr. Bennet," said his lady to him one day,',
    "Captain Wentworth",
    "Mr. Darcy looked at Elizabeth",
]
SAMPLE_SEED = 0
SAMPLE_KW = {"do_sample": True, "temperature": 0.8, "top_k": 40}
LABEL_THRESHOLD = 0.4


def load_bundled(path: Path = BUNDLED_DIR, attn: str = "eager") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint as float32 (it is stored in fp16) with the given attention implementation."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


@torch.no_grad()
def head_analysis(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    window: int = 256,
    windows_per_text: int = 8,
    n_induction: int = 8,
    induction_len: int = 64,
    seed: int = 0,
) -> dict:
    """Per-layer, per-head attention statistics; see the module docstring.

    Queries at positions < 2 are left out of every mean: there the previous and the first
    token coincide (and position 0 can only attend to itself).
    Returns ``{"layers": [[{head stats}, ...], ...], "summary": {...}, "method": {...}}``.
    """
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    sums = torch.zeros(4, L, H, dtype=torch.float64)  # (stat: prev, first, self, entropy; L, H)
    n_queries = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for w in range(min(windows_per_text, len(ids) // window)):
            x = torch.tensor([ids[w * window : (w + 1) * window]])  # (1, T), no BOS
            att = torch.stack(model(input_ids=x, output_attentions=True).attentions)  # (L, 1, H, T, T)
            att = att[:, 0, :, 2:, :].double()  # (L, H, T-2, T): queries q = 2..T-1
            q = torch.arange(2, window)
            sums[0] += att[:, :, q - 2, q - 1].sum(-1)  # weight on the previous token
            sums[1] += att[:, :, :, 0].sum(-1)  # weight on the window's first token
            sums[2] += att[:, :, q - 2, q].sum(-1)  # weight on itself
            sums[3] += -(att * att.clamp_min(1e-12).log()).sum(-1).sum(-1)  # entropy, nats
            n_queries += window - 2
    means = sums / n_queries  # (4, L, H)

    # induction: [r_1..r_n, r_1..r_n] of random ordinary tokens; a query at the second r_i
    # (position n + i - 1) attending to position i (the token after the first r_i) is an
    # induction head's signature.
    gen = torch.Generator().manual_seed(seed)
    induction = torch.zeros(L, H, dtype=torch.float64)
    first_regular = 2  # ids 0 and 1 are <|endoftext|> and <|bos|>
    for _ in range(n_induction):
        r = torch.randint(first_regular, model.config.vocab_size, (induction_len,), generator=gen)
        x = torch.cat([r, r]).unsqueeze(0)  # (1, 2n)
        att = torch.stack(model(input_ids=x, output_attentions=True).attentions)[:, 0]  # (L, H, 2n, 2n)
        q = torch.arange(induction_len + 1, 2 * induction_len)  # second copy, skip its first token
        induction += att[:, :, q, q - induction_len + 1].double().mean(-1)
    induction /= n_induction

    layers = []
    for layer in range(L):
        row = []
        for head in range(H):
            stats = {
                "prev_token": round(means[0, layer, head].item(), 4),
                "first_token": round(means[1, layer, head].item(), 4),
                "self": round(means[2, layer, head].item(), 4),
                "entropy_nats": round(means[3, layer, head].item(), 3),
                "induction": round(induction[layer, head].item(), 4),
            }
            stats["label"] = _label(stats)
            row.append(stats)
        layers.append(row)
    summary = {
        label: [f"L{li}H{hi}" for li, row in enumerate(layers) for hi, s in enumerate(row) if s["label"] == label]
        for label in ("previous-token", "first-token (sink)", "self", "induction", "mixed")
    }
    return {
        "method": {
            "text": "held-out validation split, windows of tokens without BOS",
            "window": window,
            "windows_per_text": windows_per_text,
            "queries": n_queries,
            "induction": {"sequences": n_induction, "length": induction_len, "seed": seed},
            "label_threshold": LABEL_THRESHOLD,
            "attn_implementation": "eager",
        },
        "num_key_value_heads": model.config.num_key_value_heads,
        "layers": layers,
        "summary": summary,
    }


def _label(s: dict) -> str:
    """Name a head by its dominant behaviour (induction first: it is the rarest, most specific)."""
    if s["induction"] >= LABEL_THRESHOLD:
        return "induction"
    best = max(
        ("previous-token", s["prev_token"]), ("first-token (sink)", s["first_token"]), ("self", s["self"]), key=lambda kv: kv[1]
    )
    return best[0] if best[1] >= LABEL_THRESHOLD else "mixed"


@torch.no_grad()
def continuations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int = 60
) -> list[dict]:
    """Greedy and seeded-sampled continuations of each prompt (prompt given without BOS)."""
    out = []
    for prompt in prompts:
        x = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        n = x["input_ids"].shape[1]
        greedy = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
        torch.manual_seed(SAMPLE_SEED)
        sampled = model.generate(**x, max_new_tokens=max_new_tokens, **SAMPLE_KW)
        out.append(
            {
                "prompt": prompt,
                "greedy": tokenizer.decode(greedy[0, n:], skip_special_tokens=True),
                "sampled": tokenizer.decode(sampled[0, n:], skip_special_tokens=True),
            }
        )
    return out


def timings(path: Path = BUNDLED_DIR, repeats: int = 5) -> dict:
    """Median seconds to load model + tokenizer (libraries already imported), and to generate
    100 tokens greedily with the KV cache from a short prompt (after one warm-up run)."""
    loads = []
    for _ in range(repeats):
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path))
        loads.append(time.perf_counter() - t)
    x = tok(PROMPTS[0], return_tensors="pt", add_special_tokens=False)
    kw = {"max_new_tokens": 100, "min_new_tokens": 100, "do_sample": False}
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


def evaluate(path: Path = BUNDLED_DIR, data_dir: Path = DATA_DIR) -> tuple[dict, dict]:
    """Everything above; returns ``(eval_json, heads_json)``."""
    valid = load_split_by_novel("valid", data_dir)
    texts = ["\n".join(p) for _t, p in valid]
    model, tok = load_bundled(path, attn="sdpa")
    bpc_256 = bits_per_char(model, tok, texts, context=256, stride=128)
    ctx = model.config.max_position_embeddings
    bpc_max = bits_per_char(model, tok, texts, context=ctx, stride=ctx // 2)
    per_novel = {
        title: round(bits_per_char(model, tok, [t], context=256, stride=128)["bits_per_char"], 4)
        for (title, _p), t in zip(valid, texts)
    }
    conts = continuations(model, tok, PROMPTS)
    eager, _ = load_bundled(path, attn="eager")
    heads = head_analysis(eager, tok, texts)
    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    result = {
        "held_out": {
            "split": "data/austen/valid.txt.gz (last 5% of paragraphs of each novel)",
            "context_256": bpc_256,
            f"context_{ctx}": bpc_max,
            "bits_per_char_by_novel": per_novel,
        },
        "params": sum(p.numel() for p in model.parameters()),
        "continuations": conts,
        "sampling": {"seed": SAMPLE_SEED, **SAMPLE_KW, "max_new_tokens": 60},
        "head_summary": heads["summary"],
        "timings": timings(path),
        "training": {k: training.get(k) for k in ("steps", "tokens_seen", "epochs", "seconds", "threads", "device")},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    return result, heads


def markdown(result: dict, heads: dict) -> str:
    """Tables for the model card."""
    lines = [
        "| layer | " + " | ".join(f"H{h}" for h in range(len(heads["layers"][0]))) + " |",
        "|---|" + "---|" * len(heads["layers"][0]),
    ]
    for li, row in enumerate(heads["layers"]):
        cells = [f"{s['prev_token']:.2f}/{s['first_token']:.2f}/{s['induction']:.2f} {_short(s['label'])}" for s in row]
        lines.append(f"| {li} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in result["continuations"]:
        lines += [f"**{c['prompt']}**", "", f"- greedy: {c['greedy']!r}", f"- sampled: {c['sampled']!r}", ""]
    return "\n".join(lines)


def _short(label: str) -> str:
    return {"previous-token": "prev", "first-token (sink)": "sink", "self": "self", "induction": "ind", "mixed": "·"}[label]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Evaluate the bundled model; write eval.json and heads.json.")
    ap.add_argument("--model", type=Path, default=BUNDLED_DIR)
    ap.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--out", type=Path, default=None, help="directory for eval.json/heads.json (default: --model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", action="store_true", help="also print tables for the model card")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result, heads = evaluate(args.model, args.data_dir)
    out = args.out or args.model
    (out / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "heads.json").write_text(json.dumps(heads, indent=2) + "\n")
    h = result["held_out"]["context_256"]
    print(
        f"held-out: {h['bits_per_char']:.4f} bits/char, {h['nats_per_token']:.4f} nats/token "
        f"({h['tokens']:,} tokens, {h['chars']:,} chars); timings {result['timings']}"
    )
    print(json.dumps(result["head_summary"]))
    print(f"greedy: {result['continuations'][0]['prompt']}{result['continuations'][0]['greedy']}")
    if args.markdown:
        print(markdown(result, heads))
    assert math.isfinite(h["bits_per_char"])


if __name__ == "__main__":
    main()
