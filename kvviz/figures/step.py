"""The step view's data: one run, one layer and head, every recorded step, ready for the browser.

The step page draws in the browser (`kvviz/ui/stepview/`): Play and the slider move through
recorded steps there, with no server round trip per frame. So what this module builds is not a
figure per step but the whole run once, compactly, from which any step's picture is a slice:

- K and V of the chosen KV head are stored once (a correct cache only appends, so K at step t is
  the first `cache_len[t]` rows of the final K); a cache that rewrites history (a bug variant
  recorded what it attended) gets one block per step instead,
- the attention rows of the chosen head, one per query row, in order (prefill's causal triangle,
  then one row per decode step): the matrix at step t is the first rows of it,
- per step: q′ k′ v′, the top-k, the newest query row of every head and every layer, the timings,
  one sentence about where q′ looked, the story of the step, and optionally its arithmetic.
Float arrays travel as base64 float32 (`b64`): 4 bytes a number, decoded in one call in JS.

Pure: a `Trace` (numpy) in, a JSON-ready dict out. No torch, no Streamlit.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import plotly.colors

from kvviz.engine.tokens import merged_characters, show_token
from kvviz.engine.trace import Step, Trace
from kvviz.figures.common import CACHED_COLOR, HIGHLIGHT, VALUE_SCALE, WEIGHT_SCALE

MAX_POSITIONS = 48  # rows/columns of K, V and attention drawn at most (the newest); a minimap shows the rest
MAX_BARS = 256  # positions in the one-row overviews (heads, layers) at most
PROMPT_COLOR = "#8c9bb5"  # prompt positions (token strip, attention bars)
GENERATED_COLOR = CACHED_COLOR


@lru_cache(maxsize=8)
def colorscale(name: str) -> list[list]:
    """A named Plotly colour scale as explicit [[t, colour], ...]: the browser paints with the same stops.

    Cached: plotly looks names up by scanning every scale it knows (~30 ms), and every payload asks."""
    return [[float(t), c] for t, c in plotly.colors.get_colorscale(name)]


def b64(a: np.ndarray) -> str:
    """A float array as base64 of little-endian float32 (what `Float32Array` reads), flattened row-major."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def crop_start(n: int, limit: int) -> int:
    """First index kept when only the last `limit` of `n` positions are drawn."""
    return max(0, n - limit)


# -- words --------------------------------------------------------------------------------------
def kv_sharing_text(kv_head_of: Sequence[int], head: int) -> str:
    """'query head 4 reads KV head 1: query heads 4, 5, 6, 7 share it' (GQA), or the MHA/MQA special cases."""
    kv = int(kv_head_of[head])
    group = [h for h, k in enumerate(kv_head_of) if int(k) == kv]
    n_kv = len({int(k) for k in kv_head_of})
    if len(group) == 1:
        return f"query head {head} has its own KV head {kv} (MHA: {len(kv_head_of)} query heads, {n_kv} KV heads)"
    kind = "MQA" if n_kv == 1 else "GQA"
    return (f"query head {head} reads KV head {kv}: query heads {', '.join(map(str, group))} share it "
            f"({kind}: {len(kv_head_of)} query heads, {n_kv} KV heads)")


def looks_most_at(weights: np.ndarray, tokens: Sequence[str], *, query_token: str, query_position: int) -> str:
    """One sentence: where the newest query looked most. weights (kv_len,), tokens: the cached positions' texts."""
    if weights.size == 0:
        return "q′ had nothing to attend to."
    top = int(np.argmax(weights))
    where = f"“{show_token(tokens[top])}” (pos {top})" if top < len(tokens) else f"pos {top}"
    order = np.argsort(weights)[::-1]
    runner = ""
    if len(order) > 1 and weights[order[1]] >= 0.05:
        second = int(order[1])
        label = show_token(tokens[second]) if second < len(tokens) else "?"
        runner = f"; next “{label}” (pos {second}) {weights[second]:.2f}"
    return (f"q′ of “{show_token(query_token)}” (pos {query_position}) looks most at {where}: "
            f"{weights[top]:.2f}{runner}.")


def step_story_html(step: Step, n_prompt: int, *, fed_token: str, num_layers: int, head_dim: int, rope: bool,
                    greedy: bool) -> str:
    """The ordered actions of one step, as escaped HTML. fed_token: the token chosen at the step before."""
    e = html.escape
    choice = "greedy: the most likely" if greedy else "sampled"
    nxt = f"<code>{e(show_token(step.token))}</code> ({choice}, p = {step.prob:.1%})"
    if step.is_prefill:
        items = [
            f"<b>Feed</b> all {n_prompt} prompt tokens, positions 0…{n_prompt - 1}.",
            f"<b>Project</b>: each of the {num_layers} layers computes q, k, v for every prompt position at once.",
            f"<b>Store</b>: K and V of all {n_prompt} positions go into the cache ({n_prompt} rows per layer and KV head).",
            "<b>Attend</b> with the causal mask: position i sees positions 0…i (the triangle).",
            f"<b>Choose</b> from the last position's logits: {nxt}.",
        ]
        head = "<b>Prefill</b>: the whole prompt in one forward. Each later step feeds one token; only its q′, k′, v′ are new."
    else:
        pos = step.positions[-1]
        where = "RoPE turns q′ and k′ by position" if rope else "the embedding adds position"
        items = [
            f"<b>Feed</b> <code>{e(show_token(fed_token))}</code> (id {step.input_ids[-1]}) at position {pos}.",
            f"<b>Project</b>: in each of the {num_layers} layers, q′, k′, v′ for this token only ({head_dim} numbers per "
            f"head); {where} {pos}.",
            f"<b>Append</b>: K ← [K; k′], V ← [V; v′]: the cache grows to {step.cache_len} positions.",
            f"<b>Attend</b>: softmax(q′Kᵀ/√{head_dim}) over all {step.cache_len} cached positions: the prompt, every "
            "generated token, and itself. No mask: nothing cached is in the future.",
            "<b>Mix</b>: the output is those weights times V; the next layer repeats Project to Mix.",
            f"<b>Choose</b> from the last layer's logits: {nxt}.",
        ]
        head = f"<b>Decode step {step.step}</b>: one token in, one token out."
    return f"<p>{head}</p><ol>" + "".join(f"<li>{i}</li>" for i in items) + "</ol>"


# -- the payload ----------------------------------------------------------------------------------
def _ragged(blocks: Sequence[np.ndarray]) -> dict[str, Any]:
    """Arrays of any shapes in one base64 buffer: {"data", "offsets", "shapes"} (offsets in numbers)."""
    offsets, shapes, total = [], [], 0
    for b in blocks:
        offsets.append(total)
        shapes.append(list(b.shape))
        total += int(b.size)
    data = np.concatenate([np.ravel(b) for b in blocks]) if blocks else np.zeros(0)
    return {"data": b64(data), "offsets": offsets, "shapes": shapes}


def _kv_blocks(trace: Trace, layer: int, kv: int, steps: int) -> dict[str, Any]:
    """K and V of KV head `kv` at every step, as slices of shared blocks.

    ref[t] = [block, rows]: step t's K is the first `rows` rows of block `block`. One block for an
    append-only cache; one per step when a step recorded what it attended (a history-rewriting variant).
    """
    rewrites = any(trace.steps[t].layers[layer].attended_keys is not None for t in range(steps))
    if not rewrites:
        keys, values = trace.keys(layer, steps - 1)[kv], trace.values(layer, steps - 1)[kv]  # (kv_len, head_dim)
        return {"K": _ragged([keys]), "V": _ragged([values]),
                "ref": [[0, trace.steps[t].layers[layer].kv_len] for t in range(steps)]}
    ks = [trace.keys(layer, t)[kv] for t in range(steps)]
    vs = [trace.values(layer, t)[kv] for t in range(steps)]
    return {"K": _ragged(ks), "V": _ragged(vs), "ref": [[t, len(ks[t])] for t in range(steps)]}


def _overview_rows(step: Step, head_max: int = MAX_BARS) -> tuple[np.ndarray, np.ndarray]:
    """(newest row of every head in every layer, zero-padded): (num_layers, num_heads, kv_len) and its layer means."""
    kv_len = max(ls.kv_len for ls in step.layers)
    rows = np.zeros((len(step.layers), step.layers[0].weights.shape[0], kv_len), dtype=np.float32)
    for i, ls in enumerate(step.layers):
        rows[i, :, : ls.kv_len] = ls.weights[:, -1, :]
    start = crop_start(kv_len, head_max)
    return rows[:, :, start:], rows[:, :, start:].mean(axis=1)


def _arithmetic_payload(parts: Sequence[Any]) -> dict[str, Any]:
    """Per-step arithmetic (objects shaped like `kvviz.engine.arithmetic.HeadArithmetic`), stacked per field."""
    first = parts[0]
    stack = {name: b64(np.stack([getattr(p, name) for p in parts]))
             for name in ("x", "q", "k", "v", "q_rot", "k_rot", "output", "o_part")}
    return {
        **stack,
        "angles": b64(np.stack([p.angles for p in parts])) if first.rope else None,
        "pairs": [list(p) for p in first.pairs],
        "rope": bool(first.rope),
        "hidden": int(first.x.shape[0]),
        "position": [int(p.position) for p in parts],
        "scaling": [float(p.scaling) for p in parts],
        "check": [max(p.check.values()) if p.check else None for p in parts],
        "dots": _ragged([p.dots for p in parts]),
        "scores": _ragged([p.scores for p in parts]),
        "weights": _ragged([p.weights for p in parts]),
    }


def step_view_payload(trace: Trace, layer: int, head: int, *, rope: bool, bytes_per_token: int,
                      arithmetic: Sequence[Any] | None = None, arithmetic_note: str | None = None) -> dict[str, Any]:
    """Everything the browser needs to draw any recorded step of `trace` for (layer, head).

    arithmetic: one HeadArithmetic per recorded step for this (layer, head), or None (not asked
    for, or `arithmetic_note` says why it cannot be shown).
    """
    info = trace.model
    if not (0 <= layer < info.num_layers and 0 <= head < info.num_heads):
        raise ValueError(f"layer {layer} / head {head} out of range ({info.num_layers} layers, {info.num_heads} heads)")
    steps = len(trace.steps)
    n_prompt = len(trace.prompt_ids)
    tokens = trace.tokens
    greedy = bool(trace.sampling.get("greedy", True))
    kv_of = trace.steps[0].layers[layer].kv_head_of
    kv = int(kv_of[head])

    per_step, rows, heads, layers = [], [], [], []
    for t, s in enumerate(trace.steps):
        ls = s.layers[layer]
        newest = ls.weights[head, -1]  # (kv_len,)
        rows.extend(ls.weights[head])  # this step's query rows, each (kv_len,)
        h, lmean = _overview_rows(s)
        heads.append(h[layer])
        layers.append(lmean)
        qpos = s.positions[-1]
        per_step.append({
            "cache_len": s.cache_len,
            "kv_len": ls.kv_len,
            "q_len": len(s.input_ids),
            "position": qpos,
            "token": show_token(s.token),
            "token_id": s.token_id,
            "prob": s.prob,
            "top": [[show_token(p.token), p.prob, p.token_id] for p in s.top_k],
            "parity": s.max_abs_logit_diff,
            "ms": s.time_ms,
            "recompute_ms": s.recompute_ms,
            "sentence": looks_most_at(newest, tokens[: ls.kv_len], query_token=tokens[qpos] if qpos < len(tokens) else "",
                                      query_position=qpos),
            "story": step_story_html(s, n_prompt, fed_token=trace.steps[t - 1].token if t else "",
                                     num_layers=info.num_layers, head_dim=info.head_dim, rope=rope, greedy=greedy),
        })
    payload: dict[str, Any] = {
        "model": info.name,
        "layer": layer,
        "head": head,
        "kv_head": kv,
        "kv_head_of": [int(k) for k in kv_of],
        "sharing": kv_sharing_text(kv_of, head),
        "num_layers": info.num_layers,
        "num_heads": info.num_heads,
        "head_dim": info.head_dim,
        "dtype": info.dtype,
        "bytes_per_token": int(bytes_per_token),
        "n_prompt": n_prompt,
        "tokens": [show_token(x) for x in tokens],
        "ids": [int(i) for i in (*trace.prompt_ids, *trace.generated_ids)],
        "merged": merged_characters(tokens),
        "steps": per_step,
        "kv": _kv_blocks(trace, layer, kv, steps),
        "q": b64(np.stack([s.layers[layer].query_states[head, -1] for s in trace.steps])),  # (steps, head_dim)
        "k_new": b64(np.stack([s.layers[layer].key_states[kv, -1] for s in trace.steps])),
        "v_new": b64(np.stack([s.layers[layer].value_states[kv, -1] for s in trace.steps])),
        "attention": _ragged(rows),  # one (kv_len,) row per query row, in order
        "heads_rows": _ragged(heads),  # per step (num_heads, kv_len shown)
        "layers_rows": _ragged(layers),  # per step (num_layers, kv_len shown)
        "arithmetic": _arithmetic_payload(arithmetic) if arithmetic else None,
        "arithmetic_note": arithmetic_note,
        "look": {"crop": MAX_POSITIONS, "value_scale": colorscale(VALUE_SCALE), "weight_scale": colorscale(WEIGHT_SCALE),
                 "highlight": HIGHLIGHT, "prompt": PROMPT_COLOR, "generated": GENERATED_COLOR},
    }
    return payload
