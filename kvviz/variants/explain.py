"""The written diagnosis: one small detector per clue, each reading only the evidence.

A detector takes an `Evidence` (see `evidence.py`) and returns the findings it can support, never
looking at the variant's name: the same evidence from an unknown cache would read the same. Their
order in `DETECTORS` is the order findings are written, most telling first. Numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvviz.variants.evidence import MISSING, SAME, Evidence


@dataclass(frozen=True)
class Finding:
    """One observation drawn from the evidence; `kind` is one of registry.CLUES or a general kind."""

    kind: str
    text: str


Detector = Callable[[Evidence], list[Finding]]


def _decode(e: Evidence) -> range:
    """The decode steps the variant acted on."""
    return range(max(1, e.start_step), e.steps)


def _ranges(idx: np.ndarray) -> str:
    """[0 1 2 3 9 10 11] -> '0..3, 9..11'."""
    parts: list[str] = []
    for i in (int(x) for x in idx):
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])  # type: ignore[arg-type]
    return ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in parts) or "none"


# -- the detectors ----------------------------------------------------------------------------------
def positions(e: Evidence) -> list[Finding]:
    for s_c, s_b in zip(e.clean.trace.steps, e.buggy.trace.steps):
        if s_c.positions != s_b.positions:
            return [Finding("positions", (
                f"At step {s_b.step} the new token was fed at position {list(s_b.positions)[-1]}; the exact run "
                f"used {list(s_c.positions)[-1]}. The positions (RoPE angles) do not advance with the text."
            ))]
    return []


def head_mapping(e: Evidence) -> list[Finding]:
    for s_c, s_b in zip(e.clean.trace.steps, e.buggy.trace.steps):
        for i, (lc, lb) in enumerate(zip(s_c.layers, s_b.layers)):
            if not np.array_equal(lc.kv_head_of, lb.kv_head_of):
                return [Finding("kv_head_of", (
                    f"In layer {i} the query heads read KV heads {lb.kv_head_of.tolist()}; the exact mapping is "
                    f"{lc.kv_head_of.tolist()}. The cache is fine, the heads read the wrong part of it."
                ))]
    return []


def prefill_mask(e: Evidence) -> list[Finding]:
    """Attention above the diagonal at prefill, in the first layer that has any."""
    for layer, rec in enumerate(e.buggy.trace.steps[0].layers):
        w = rec.weights  # (num_heads, P, P) for a prefill over the prompt
        if w.shape[-1] != w.shape[-2] or w.shape[-1] < 2:
            return []
        upper = np.triu(np.ones(w.shape[1:], dtype=bool), k=1)
        above = float(w[:, upper].sum() / w.sum())
        if above > e.tolerance.attention:
            return [Finding("prefill_mask", (
                f"In prefill, {above:.0%} of layer {layer}'s attention falls above the diagonal: prompt tokens attend "
                "to tokens after them. The exact run has none there. The causal mask is missing."
            ))]
    return []


def _lengths(e: Evidence, layer: int) -> tuple[list[int], list[int]]:
    """Rows attended per step in `layer`: (variant, exact)."""
    return [row[layer].buggy_len for row in e.kv], [row[layer].clean_len for row in e.kv]


def lengths(e: Evidence) -> list[Finding]:
    layer = e.first_divergent_layer
    if layer is None:
        return []
    lens_b, lens_c = _lengths(e, layer)
    decode = _decode(e)
    kept = [s.cache_len for s in e.buggy.trace.steps]
    if lens_b == lens_c:
        return [Finding("lengths", "Cache lengths match the exact run at every step.")]
    if len(decode) and all(lens_b[s] == 1 for s in decode):
        return [Finding("lengths", (
            f"At every decode step the variant's query attended over 1 row (the exact one over {lens_c[1]}..{lens_c[-1]}): "
            "the cache is emptied before each step, the prompt and history are gone."
        ))]
    if len(decode) > 1 and len({kept[s] for s in decode}) == 1 and lens_c[-1] > lens_c[decode[0]]:
        text = (f"The cache stopped growing: it keeps {kept[-1]} rows after every decode step while the exact cache "
                f"grew to {lens_c[-1]}.")
        if lens_b[-1] > kept[-1]:
            text += (f" Each step attends over {lens_b[-1]}: the newest row is used for its own step, then dropped.")
        return [Finding("lengths", text)]
    return []


def extra_rows(e: Evidence) -> list[Finding]:
    layer = e.first_divergent_layer
    if layer is None:
        return []
    lens_b, lens_c = _lengths(e, layer)
    if not all(b > c for b, c in zip(lens_b, lens_c)):
        return []
    text = (f"The variant cache holds {lens_b[0] - lens_c[0]} more rows than there are tokens, from prefill on: the "
            f"prompt has {len(e.clean.trace.prompt_ids)} tokens but step 0 attended over {lens_b[0]} rows.")
    lead = e.kv[0][0].offset
    if lead:
        text += (f" In layer 0 the prompt's rows sit at slots {lead}.. and equal the exact rows; the {lead} rows in "
                 "front match no token of this prompt: they come from an earlier request.")
    return [Finding("extra_rows", text)]


def _in_order(buggy: np.ndarray, clean: np.ndarray, tol: float) -> np.ndarray | None:
    """Match each variant row to an exact row with an equal value, in increasing order (earliest first).

    buggy (n, d), clean (m, d) -> (n,) exact row indices, or None when the rows are not an ordered
    subset of the exact ones. Values, because a moved key is re-rotated while its value stays; ties
    (a token repeated in the text has equal layer-0 values) resolve to the earliest row still free.
    """
    equal = (np.abs(buggy[:, None, :] - clean[None, :, :]) <= tol).all(-1)  # (n, m)
    out, prev = np.empty(len(buggy), dtype=np.int64), -1
    for i, row in enumerate(equal):
        later = np.flatnonzero(row[prev + 1:])
        if not len(later):
            return None
        prev = out[i] = prev + 1 + later[0]
    return out


def evicted(e: Evidence) -> list[Finding]:
    """Rows dropped on purpose: fewer rows than the exact cache, each an exact row (by value), in order."""
    step, last = e.steps - 1, e.kv[-1][0]  # layer 0: rows depend only on token and position
    dropped = last.clean_len - last.buggy_len
    if dropped <= 0 or last.offset or last.buggy_len <= 1 or e.buggy.trace.steps[-1].cache_len < last.buggy_len:
        return []  # nothing dropped, something leaked in front, or the newest row is not even kept
    ct, bt = e.clean.trace, e.buggy.trace
    vc, vb = ct.values(0, step), bt.values(0, step)  # (H, Lc, d), (H, Lb, d)
    tol = e.tolerance.kv_atol + e.tolerance.kv_rtol * float(np.abs(vc).max(initial=0.0))
    rows = [_in_order(vb[h], vc[h], tol) for h in range(vc.shape[0])]
    if any(r is None for r in rows):
        return []
    lens_b, lens_c = _lengths(e, 0)
    first = next(s for s in range(e.steps) if lens_b[s] < lens_c[s])
    if all((r == rows[0]).all() for r in rows):
        which = f"the exact rows {_ranges(rows[0])}"
    else:
        which = "different rows per KV head (" + "; ".join(f"head {h}: {_ranges(r)}" for h, r in enumerate(rows)) + ")"
    text = (f"From step {first} the cache holds fewer rows than the exact one: at step {step} it attends over "
            f"{last.buggy_len} of {last.clean_len}, and in layer 0 they are {which}, in order. {dropped} rows were "
            "evicted.")
    kc, kb = ct.keys(0, step), bt.keys(0, step)
    tol_k = e.tolerance.kv_atol + e.tolerance.kv_rtol * float(np.abs(kc).max(initial=0.0))
    moved = np.zeros(last.buggy_len, dtype=bool)
    for h, r in enumerate(rows):
        moved |= np.abs(kb[h] - kc[h][r]).max(-1) > tol_k  # same value, another key
    if moved.any():
        text += (f" {int(moved.sum())} kept rows (slots {_ranges(np.flatnonzero(moved))}) have the exact value but a "
                 "different key: they moved to new slots and their keys were re-rotated there (positions are slots "
                 "in the cache, not places in the text).")
    else:
        text += " The kept rows are untouched copies of exact rows (keys at their original positions)."
    return [Finding("evicted", text)]


def shifted_rows(e: Evidence) -> list[Finding]:
    layer = e.first_divergent_layer
    if layer is None:
        return []
    last = e.kv[-1][layer]
    moved = [(i, int(j)) for i, j in enumerate(last.holds) if j >= 0 and j != i - last.offset]
    if not moved:
        return []
    decode = _decode(e)
    lens_b, lens_c = _lengths(e, layer)
    if len(moved) == 1 and moved[0][1] == last.clean_len - 1:
        slot = moved[0][0]
        every = [s for s in decode if e.kv[s][layer].holds[slot] == e.kv[s][layer].clean_len - 1]
        where = (f"In layer {layer}, slot {slot} holds the newest token's row (exact row {last.clean_len - 1} at step "
                 f"{e.steps - 1}) where exact row {slot} belongs; it held the newest row at {len(every)} of "
                 f"{len(decode)} decode steps")
        if e.buggy.trace.steps[-1].cache_len < last.buggy_len:
            return [Finding("shifted_rows", where + ": the newest row is attended for one step, never kept.")]
        return [Finding("shifted_rows", where + ": one slot is overwritten at every step.")]
    offsets = {j - i for i, j in moved}
    if len(offsets) == 1:
        off = offsets.pop()
        rel = f"row i holds the exact row i{off:+d}"
        if off == -1:
            rel += " (the previous token's k′/v′: the write lags one step)"
        text = f"In layer {layer} at step {e.steps - 1}, slots {moved[0][0]}..{moved[-1][0]} are filled but shifted: {rel}."
        if off < 0 and moved[0][0] + off == 0 and lens_b[0] > lens_c[0]:
            return [Finding("extra_rows", text + f" The first {-off} rows match no token of this prompt: they come "
                                                 "from somewhere else.")]
        return [Finding("shifted_rows", text)]
    examples = ", ".join(f"slot {i} holds exact row {j}" for i, j in moved[:3])
    return [Finding("shifted_rows", (f"In layer {layer} at step {e.steps - 1} rows sit in other slots: {examples}"
                                     f"{' …' if len(moved) > 3 else ''}."))]


def missing_rows(e: Evidence) -> list[Finding]:
    layer = e.first_divergent_layer
    if layer is None:
        return []
    missing = int((e.kv[-1][layer].status == MISSING).sum())
    if not missing:
        return []
    return [Finding("lengths", f"{missing} rows of the exact cache are missing from the variant at step {e.steps - 1}.")]


def swapped(e: Evidence) -> list[Finding]:
    layer = e.first_divergent_layer
    if layer is None:
        return []
    swaps = [row[layer] for row in e.kv if row[layer].swapped_rows]
    if not swaps:
        return []
    k = swaps[0]
    return [Finding("swapped", (
        f"In layer {layer} at step {k.step}, {k.swapped_rows} of {min(k.clean_len, k.buggy_len)} key rows equal the "
        "exact value rows, and the values equal the exact keys: K and V are exchanged."
    ))]


def quantisation(e: Evidence) -> list[Finding]:
    """Small differences in most rows of the first layer that differs: rounding."""
    layer = e.first_divergent_layer
    if layer is None:
        return []
    first = [row[layer] for row in e.kv]
    aligned = [k.status[k.offset: k.offset + min(k.clean_len, k.buggy_len - k.offset)] for k in first]
    differing = sum(int((a != SAME).sum()) for a in aligned)
    total = sum(len(a) for a in aligned)
    worst = max(k.max_rel_layer for k in first)
    if not total or differing < total / 2 or not 0 < worst < 0.1:
        return []
    return [Finding("quantisation", (
        f"{differing / total:.0%} of the rows of layer {layer} differ, but only by up to {worst:.2%} of the layer's "
        f"largest K or V entry (per row: {max(k.max_rel for k in first):.2%} of the row's largest; an int8 rounding "
        f"step is {1 / 254:.2%} of it, an int4 one {1 / 14:.1%}): the signature of reduced precision, not of a "
        "logic error."
    ))]


def depth(e: Evidence) -> list[Finding]:
    layer = e.first_divergent_layer
    if layer is None:
        if e.first_attention_layer is not None:
            return [Finding("layers", f"No cache row differs, but attention differs from layer {e.first_attention_layer}.")]
        return []
    if layer == 0:
        return [Finding("layers", "Cache rows differ already in layer 0: what is stored (or where) is different, not "
                                  "only what later layers compute from it.")]
    below = "layer 0 holds" if layer == 1 else f"layers 0..{layer - 1} hold"
    text = f"Cache rows first differ in layer {layer}; {below} exactly the exact rows."
    if e.first_attention_layer is not None and e.first_attention_layer < layer:
        text += (f" Yet attention already differs in layer {e.first_attention_layer}: the fault is in how attention "
                 "reads the cache (mask or head mapping), not in what it stores.")
    return [Finding("layers", text)]


def logits(e: Evidence) -> list[Finding]:
    s = e.first_divergence_step
    if s is None:
        return []
    t = e.first_divergent_token_step
    ct, bt = e.clean.trace, e.buggy.trace
    text = (f"Logits part at step {s} (max |Δlogit| {e.max_abs_logit_diff[s]:.3g}, KL {e.kl[s]:.3g} nats); largest over "
            f"the run: |Δlogit| {e.max_abs_logit_diff.max():.3g}, KL {e.kl.max():.3g} nats; the top token agrees at "
            f"{int(e.top1_agree.sum())} of {e.steps} steps.")
    if t is not None:
        text += f" The first different token is at step {t}: exact {ct.steps[t].token!r}, variant {bt.steps[t].token!r}."
    else:
        text += f" No chosen token changed within {e.steps} steps."
    return [Finding("logits", text)]


DETECTORS: tuple[Detector, ...] = (positions, head_mapping, prefill_mask, lengths, extra_rows, evicted, shifted_rows,
                                   missing_rows, swapped, quantisation, depth, logits)


def explain(e: Evidence) -> tuple[Finding, ...]:
    """Every detector's findings, in order (none when nothing was detected)."""
    if not e.detected:
        return ()
    return tuple(f for detect in DETECTORS for f in detect(e))


def write(e: Evidence, findings: tuple[Finding, ...]) -> str:
    """The short written diagnosis: a verdict, then the findings in order."""
    tol = e.tolerance
    if not e.detected:
        scope = "" if e.kind == "none" else f" with `{e.bug}`"
        text = (f"No divergence{scope}: at every one of {e.steps} steps the logits agree within {tol.logit:g} and every "
                f"cache row equals the exact one (within {tol.kv_atol:g} + {tol.kv_rtol:g}·max|K|).")
        if e.kind != "none":
            text += (" The variant changed nothing here: check its scope (layers, start step), its parameters (a "
                     "budget larger than the text evicts nothing) and whether it can act on this model.")
        return text
    head = f"Divergence from step {e.first_divergence_step}"
    if e.first_divergent_layer is not None:
        head += f"; cache rows differ from layer {e.first_divergent_layer}"
    head += "."
    if e.kind in ("eviction", "quantization"):
        head = (f"A trade-off, not a bug: this cache is approximate by design. Measured cost: max |Δlogit| "
                f"{e.max_abs_logit_diff.max():.3g}, KL up to {e.kl.max():.2g} nats per step. ") + head
    body = " ".join(f.text for f in findings)
    return f"{head} {body}".strip()
