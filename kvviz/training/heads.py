"""What each attention head of a checkpoint does, measured: the numbers behind ``heads.json``.

Scores per layer and query head, all shares of attention weight in [0, 1]:

* ``sink``: weight on position 0, the **attention sink** of Xiao et al. 2023 ("Efficient
  Streaming Language Models with Attention Sinks", StreamingLLM): heads that have nothing to
  attend to park their weight on the first token. Measured on held-out windows of ``window``
  tokens tokenized as kvviz tokenizes a prompt (``tokenizer(text)``: for v2 that is
  ``[BOS] + window - 1`` text tokens; for v1, which adds no BOS, ``window`` text tokens),
  averaged over queries at positions ``>= min_query`` (early queries have few keys, so any
  head puts much weight on position 0 there).
* ``prev_token``, ``self``: weight on position q - 1 / on q itself, same windows and queries.
* ``entropy``: entropy of the attention row in nats, same windows and queries.
* ``induction``: the test of Olsson et al. 2022 ("In-context Learning and Induction Heads"):
  on ``[BOS] R R``, R a run of random ordinary tokens, the weight a token of the second copy
  puts on the token just after its earlier occurrence (where an induction head looks to copy
  what came next), averaged over every token of the second copy and over sequences.

A head is then labelled by its strongest score if that passes ``LABEL_THRESHOLD`` (induction
first: it is the rarest, and an induction head also parks on the sink when nothing repeats).
Attention weights need ``attn_implementation="eager"`` (sdpa returns none).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

LABEL_THRESHOLD = 0.4
MIN_QUERY = 16
TEXT_SCORES = ("prev_token", "sink", "self", "entropy")
LABELS = {"previous-token": "prev_token", "sink": "sink", "self": "self", "induction": "induction"}  # label -> score


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts in front of every text by itself ([BOS] for v2, [] for v1)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    prefix = full[: len(full) - len(plain)]
    if full[len(prefix) :] != plain:
        raise ValueError(f"tokenizer adds special tokens other than a prefix: {full} vs {plain}")
    return prefix


def text_windows(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], window: int, per_text: int) -> Iterator[list[int]]:
    """Up to ``per_text`` consecutive windows of each text, each ``window`` ids long, as the app
    tokenizes a prompt: the tokenizer's special prefix, then text tokens."""
    prefix = special_prefix(tokenizer)
    body = window - len(prefix)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        for w in range(min(per_text, len(ids) // body)):
            yield prefix + ids[w * body : (w + 1) * body]


@torch.no_grad()
def attention(model: PreTrainedModel, ids: Sequence[int]) -> torch.Tensor:
    """Attention weights of one sequence, every layer: (num_layers, num_heads, T, T), float64."""
    x = torch.tensor([list(ids)], device=model.device)  # (1, T)
    out = model(input_ids=x, output_attentions=True)
    if out.attentions is None or out.attentions[0] is None:
        raise ValueError('no attention weights: load the model with attn_implementation="eager"')
    return torch.stack(out.attentions)[:, 0].double().cpu()  # (L, H, T, T)


def text_scores(model: PreTrainedModel, windows: Sequence[Sequence[int]], min_query: int = MIN_QUERY) -> dict[str, torch.Tensor]:
    """Mean ``prev_token``, ``sink``, ``self`` weight and ``entropy`` per head over the windows'
    queries at positions ``>= min_query``: each (num_layers, num_heads)."""
    sums: dict[str, torch.Tensor] = {}
    n_queries = 0
    for ids in windows:
        att = attention(model, ids)[:, :, min_query:, :]  # (L, H, Q, T): queries q = min_query..T-1
        q = torch.arange(min_query, len(ids))  # (Q,)
        rows = q - min_query  # row of query q in att
        per_query = {  # each (L, H, Q)
            "prev_token": att[:, :, rows, q - 1],
            "sink": att[..., 0],
            "self": att[:, :, rows, q],
            "entropy": -(att * att.clamp_min(1e-12).log()).sum(-1),
        }
        for name, v in per_query.items():
            sums[name] = sums.get(name, 0) + v.sum(-1)  # (L, H)
        n_queries += len(q)
    if not n_queries:
        raise ValueError(f"no query positions >= {min_query}: give longer windows")
    return {name: s / n_queries for name, s in sums.items()}


def random_repeats(tokenizer: PreTrainedTokenizerBase, n_seqs: int, length: int, seed: int) -> list[list[int]]:
    """``n_seqs`` sequences ``[BOS] R R``, R ``length`` random non-special tokens: (2 * length + 1,) each."""
    gen = torch.Generator().manual_seed(seed)
    first_regular = max(tokenizer.all_special_ids) + 1  # ids below are <|endoftext|>, <|bos|>
    seqs = []
    for _ in range(n_seqs):
        r = torch.randint(first_regular, len(tokenizer), (length,), generator=gen).tolist()
        seqs.append([tokenizer.bos_token_id, *r, *r])
    return seqs


def induction_scores(model: PreTrainedModel, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Olsson et al.'s induction score per head, (num_layers, num_heads), on ``[BOS] R R`` sequences.

    With BOS at 0 and R at 1..n, the second copy's i-th token (position n + i, i = 1..n) has
    its earlier occurrence at i; the token after it is at i + 1, so key = query - n + 1.
    """
    total = torch.zeros(())
    for ids in seqs:
        n = (len(ids) - 1) // 2
        att = attention(model, ids)  # (L, H, 2n+1, 2n+1)
        q = torch.arange(n + 1, 2 * n + 1)  # (n,): the second copy
        total = total + att[:, :, q, q - n + 1].mean(-1)  # (L, H)
    return total / len(seqs)


def label(stats: dict) -> str:
    """Name a head by its dominant behaviour, or "mixed" when no score reaches LABEL_THRESHOLD."""
    if stats["induction"] >= LABEL_THRESHOLD:
        return "induction"
    name, value = max(((n, stats[s]) for n, s in LABELS.items() if n != "induction"), key=lambda kv: kv[1])
    return name if value >= LABEL_THRESHOLD else "mixed"


def head_table(scores: dict[str, torch.Tensor]) -> list[list[dict]]:
    """``[[{prev_token, sink, self, entropy, induction, label}, ...per head], ...per layer]``."""
    num_layers, num_heads = scores["sink"].shape
    layers = []
    for li in range(num_layers):
        row = []
        for hi in range(num_heads):
            stats = {k: round(scores[k][li, hi].item(), 3 if k == "entropy" else 4) for k in (*TEXT_SCORES, "induction")}
            stats["label"] = label(stats)
            row.append(stats)
        layers.append(row)
    return layers


def summarize(layers: list[list[dict]]) -> dict:
    """``summary``: label -> ["L{layer}H{head}", ...]; ``best``: per label, its strongest head
    (by that label's score) or None; ``max``: per score, the strongest head whatever its label."""
    heads = [(f"L{li}H{hi}", s) for li, row in enumerate(layers) for hi, s in enumerate(row)]
    summary = {name: [h for h, s in heads if s["label"] == name] for name in (*LABELS, "mixed")}
    best = {}
    for name, score in LABELS.items():
        labelled = [(h, s[score]) for h, s in heads if s["label"] == name]
        best[name] = None if not labelled else dict(zip(("head", "score"), max(labelled, key=lambda hs: hs[1])))
    top = {
        score: dict(zip(("head", "score"), max(((h, s[score]) for h, s in heads), key=lambda hs: hs[1])))
        for score in LABELS.values()
    }
    return {"summary": summary, "best": best, "max": top}


def analyse(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    window: int = 256,
    windows_per_text: int = 8,
    n_induction: int = 8,
    induction_len: int = 64,
    seed: int = 0,
) -> dict:
    """The whole ``heads.json``: method, per-head table, summary, best and max."""
    windows = list(text_windows(tokenizer, texts, window, windows_per_text))
    scores = text_scores(model, windows)
    scores["induction"] = induction_scores(model, random_repeats(tokenizer, n_induction, induction_len, seed))
    layers = head_table(scores)
    return {
        "method": {
            "text": "held-out validation split, windows tokenized as the app tokenizes a prompt",
            "special_prefix": special_prefix(tokenizer),
            "window": window,
            "windows": len(windows),
            "min_query": MIN_QUERY,
            "entropy_unit": "nats",
            "induction": {"sequences": n_induction, "length": induction_len, "seed": seed, "form": "[BOS] R R"},
            "label_threshold": LABEL_THRESHOLD,
            "attn_implementation": "eager",
            "references": [
                "Olsson et al. 2022, In-context Learning and Induction Heads",
                "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks",
            ],
        },
        "num_key_value_heads": model.config.num_key_value_heads,
        "layers": layers,
        **summarize(layers),
    }
