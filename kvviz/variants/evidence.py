"""Exact vs variant: the evidence, in numpy only (figures import it; no torch, no transformers).

Two recorded runs of the same tokens: the exact cache (`clean`) and a variant (`buggy`),
*teacher-forced* on the exact run's tokens, so every difference is the variant's own.

Per step and layer:
- max |Δlogit|, KL(exact || variant) between the next-token distributions (nats) and whether the
  top token agrees;
- a K/V row diff of the cache each query attended over: every slot is `same`, `wrong` (matches no
  exact row), `shifted` (equals a *different* exact row: written into the wrong slot), `missing`
  (the exact cache has it, the variant is shorter), `extra` (beyond or in front of the exact rows)
  or `re-positioned` (its value equals an exact row's but its key does not: the same token's row
  with its RoPE position changed). Rows are matched per KV head (a policy may keep different rows
  in different heads);
- the attention diff (slot-aligned |Δweight|), the cache lengths, the first layer whose rows differ.

`detected` is true when logits or attention weights differ beyond a stated tolerance or any cache row
differs from the exact one; the tolerances (`Tolerance.for_dtype`) sit far above float32 noise (identical runs are
bitwise equal on CPU; reordered kernels differ by ~1e-6) and far below any real bug's effect.

Also here, for the step page's Cache control: the attention each cached token has received so far
(what H2O ranks), which tokens a cache holds, and the quantisation error of each row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvviz.engine.trace import Trace

# K/V slot status codes (the heatmap's categories, in display order)
SAME, WRONG, SHIFTED, MISSING, EXTRA, REPOSITIONED = 0, 1, 2, 3, 4, 5
STATUS_NAMES = ("same", "wrong", "shifted", "missing", "extra", "re-positioned")


@dataclass(frozen=True)
class Tolerance:
    """What counts as a real difference between two runs (below it: floating-point noise)."""

    logit: float  # max |Δlogit| allowed
    kv_atol: float  # a cache row equals another if max|Δ| <= kv_atol + kv_rtol * max|exact K or V|
    kv_rtol: float
    attention: float  # max |Δweight| allowed

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerance:
        if "float32" in dtype or "float64" in dtype:
            return cls(logit=1e-3, kv_atol=1e-5, kv_rtol=1e-4, attention=1e-4)
        return cls(logit=5e-2, kv_atol=1e-3, kv_rtol=1e-2, attention=1e-2)  # half precision, GPU kernels

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Run:
    """A recorded run plus the full next-token logits of each step (for KL)."""

    trace: Trace
    logits: np.ndarray  # (steps, vocab) float32


# -- logits ----------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(..., vocab) -> log-probabilities in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(clean_logits: np.ndarray, buggy_logits: np.ndarray) -> np.ndarray:
    """KL(clean || buggy) in nats per step: (steps, vocab) x2 -> (steps,)."""
    lp, lq = log_softmax(clean_logits), log_softmax(buggy_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def logit_metrics(clean_logits: np.ndarray, buggy_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step: (max |Δlogit|, KL(clean || buggy) nats, top-1 agrees); (steps, vocab) x2 -> (steps,) x3."""
    dlogit = np.abs(clean_logits.astype(np.float64) - buggy_logits).max(axis=-1)
    top1 = clean_logits.argmax(axis=-1) == buggy_logits.argmax(axis=-1)
    return dlogit, kl_divergence(clean_logits, buggy_logits), top1


# -- K/V rows --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVDiff:
    """The cache one layer's query attended over at one step, variant vs exact, slot by slot."""

    layer: int
    step: int
    clean_len: int
    buggy_len: int
    status: np.ndarray  # (max(clean_len, buggy_len + ...),) int8 codes SAME..REPOSITIONED per slot
    holds: np.ndarray  # (buggy_len,) the exact row each variant row equals (K and V) in every head, -1 = none
    swapped_rows: int  # aligned slots whose variant K equals the exact V and variant V the exact K
    max_abs: float  # largest |ΔK|, |ΔV| over the slots both caches have
    max_rel: float  # largest |Δ| / max|exact row of that head| over those slots
    max_rel_layer: float = 0.0  # largest |ΔK| / max|exact K| (and the same for V) over those slots: the layer's scale
    offset: int = 0  # variant slots in front of the first exact row (slot i is compared with exact row i - offset)
    head_holds: np.ndarray | None = None  # (num_kv_heads, buggy_len) the exact row each head's row equals, -1 = none
    value_holds: np.ndarray | None = None  # (num_kv_heads, buggy_len) for rows matching none: the exact row whose
    #                                         value alone it equals (its key moved), -1 = none

    @property
    def differs(self) -> bool:
        return bool((self.status != SAME).any())

    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in enumerate(STATUS_NAMES)}


def _match(buggy: np.ndarray, clean: np.ndarray, tol: np.ndarray | float) -> np.ndarray:
    """For each buggy row, the index of a clean row equal to it within `tol`, else -1.

    The nearest clean row by L2 (one matmul) is the candidate; equality is then checked entry-wise.
    buggy (n, D), clean (m, D), tol scalar or (D,) -> (n,)
    """
    if len(buggy) == 0 or len(clean) == 0:
        return np.full(len(buggy), -1)
    d2 = (buggy**2).sum(1)[:, None] + (clean**2).sum(1)[None, :] - 2.0 * buggy @ clean.T  # (n, m)
    best = d2.argmin(axis=1)  # (n,)
    ok = (np.abs(buggy - clean[best]) <= tol).all(axis=1)
    return np.where(ok, best, -1)


def kv_diff(clean: Trace, buggy: Trace, layer: int, step: int, tol: Tolerance, offset: int = 0) -> KVDiff:
    """Slot-by-slot comparison of the K/V one layer attended over at one step.

    `offset` rows of the variant cache come before its first exact row (a leaked earlier request):
    variant slot i is compared with exact row i - offset, and the first `offset` slots are extra.
    """
    kc, vc = clean.keys(layer, step), clean.values(layer, step)  # (H, Lc, d)
    kb, vb = buggy.keys(layer, step), buggy.values(layer, step)  # (H, Lb, d)
    heads, lc, lb = kc.shape[0], kc.shape[1], kb.shape[1]
    tol_k = tol.kv_atol + tol.kv_rtol * float(np.abs(kc).max(initial=0.0))
    tol_v = tol.kv_atol + tol.kv_rtol * float(np.abs(vc).max(initial=0.0))
    n = max(0, min(lc, lb - offset))  # slots compared with an exact row: variant offset..offset+n-1
    bk, bv = kb[:, offset:offset + n], vb[:, offset:offset + n]  # (H, n, d) aligned variant rows
    same_h = (np.abs(bk - kc[:, :n]) <= tol_k).all(-1) & (np.abs(bv - vc[:, :n]) <= tol_v).all(-1)  # (H, n)
    same = same_h.all(0)  # (n,)

    head_holds = np.full((heads, lb), -1)
    value_holds = np.full((heads, lb), -1)
    for h in range(heads):
        head_holds[h, offset:offset + n][same_h[h]] = np.arange(n)[same_h[h]]
        todo = np.flatnonzero(head_holds[h] == -1)
        if len(todo):
            # match K and V together: in layer 0 two equal tokens have equal V rows (no RoPE on V)
            both_b = np.concatenate([kb[h, todo], vb[h, todo]], axis=1)
            both_c = np.concatenate([kc[h], vc[h]], axis=1)
            tols = np.concatenate([np.full(kc.shape[2], tol_k), np.full(vc.shape[2], tol_v)])
            head_holds[h, todo] = _match(both_b, both_c, tols)
            rest = todo[head_holds[h, todo] < 0]
            value_holds[h, rest] = _match(vb[h, rest], vc[h], tol_v)  # the value alone: a moved key
    agree = (head_holds == head_holds[:1]).all(0)
    holds = np.where(agree, head_holds[0], -1)  # (lb,)
    slots = np.arange(lb)
    matched = (head_holds >= 0).all(0)
    moved = (head_holds != slots - offset).any(0)
    repositioned = ((head_holds >= 0) | (value_holds >= 0)).all(0) & ~matched

    width = max(lb, lc + offset)
    status = np.full(width, WRONG, dtype=np.int8)
    status[:offset] = EXTRA  # in front of the first exact row
    status[offset:offset + n][same] = SAME
    status[:lb][matched & moved] = SHIFTED
    aligned = (slots >= offset) & (slots < offset + n)  # a leaked or surplus row is extra, whatever its token
    status[:lb][repositioned & aligned & (status[:lb] != SAME)] = REPOSITIONED
    status[lb:] = MISSING  # the exact cache is longer
    beyond = slice(lc + offset, lb)
    status[beyond][~matched[beyond] & ~repositioned[beyond]] = EXTRA  # beyond the exact cache, equal to nothing in it

    swapped = int(((np.abs(bk - vc[:, :n]) <= tol_v).all(-1) & (np.abs(bv - kc[:, :n]) <= tol_k).all(-1)).all(0).sum())
    delta = np.maximum(np.abs(bk - kc[:, :n]), np.abs(bv - vc[:, :n]))  # (H, n, d)
    # relative to each (row, head)'s largest exact entry: the unit an int8 absmax scale works in
    rel_k = np.abs(bk - kc[:, :n]).max(-1, initial=0.0) / np.maximum(np.abs(kc[:, :n]).max(-1, initial=0.0), 1e-12)
    rel_v = np.abs(bv - vc[:, :n]).max(-1, initial=0.0) / np.maximum(np.abs(vc[:, :n]).max(-1, initial=0.0), 1e-12)
    return KVDiff(
        layer=layer, step=step, clean_len=lc, buggy_len=lb, status=status, holds=holds, swapped_rows=swapped,
        max_abs=float(delta.max(initial=0.0)), max_rel=float(max(rel_k.max(initial=0.0), rel_v.max(initial=0.0))),
        max_rel_layer=float(max(np.abs(bk - kc[:, :n]).max(initial=0.0) / max(float(np.abs(kc).max(initial=0.0)), 1e-12),
                                np.abs(bv - vc[:, :n]).max(initial=0.0) / max(float(np.abs(vc).max(initial=0.0)), 1e-12))),
        offset=offset, head_holds=head_holds, value_holds=value_holds,
    )


def leading_offset(first_layer: KVDiff) -> int:
    """Rows in front of the exact ones: where layer 0's variant cache holds exact row 0, if it is longer.

    Layer 0 rows depend only on token and position, so a leaked prefix shows there as the exact
    prompt rows starting at a later slot; deeper layers are changed by the prefix and cannot tell.
    """
    extra = first_layer.buggy_len - first_layer.clean_len
    starts = np.flatnonzero(first_layer.holds == 0)
    if extra > 0 and len(starts) and 0 < starts[0] <= extra:
        return int(starts[0])
    return 0


def attention_diff(clean: Trace, buggy: Trace, layer: int, step: int) -> float:
    """max |Δweight| of one step's attention rows, slots aligned (the shorter padded with zeros)."""
    wc = clean.steps[step].layers[layer].weights  # (num_heads, q_len, kv_len_clean)
    wb = buggy.steps[step].layers[layer].weights  # (num_heads, q_len, kv_len_buggy)
    width = max(wc.shape[-1], wb.shape[-1])
    pc = np.zeros((*wc.shape[:-1], width), np.float32)
    pb = np.zeros((*wb.shape[:-1], width), np.float32)
    pc[..., : wc.shape[-1]] = wc
    pb[..., : wb.shape[-1]] = wb
    return float(np.abs(pc - pb).max())


# -- the evidence of a whole run -------------------------------------------------------------------
@dataclass(frozen=True)
class Evidence:
    """Everything measured about one variant against the exact cache: the runs and the per-step evidence."""

    bug: str  # the variant's name ("none" = the exact cache)
    title: str
    kind: str  # "bug", "eviction", "quantization" or "none"
    clue: str  # the registry's signature clue for this variant ("" for none)
    scope_layers: tuple[int, ...] | None
    start_step: int
    clean: Run
    buggy: Run  # teacher-forced on the clean tokens
    free: Trace | None  # the variant run choosing its own tokens
    tolerance: Tolerance
    max_abs_logit_diff: np.ndarray  # (steps,)
    kl: np.ndarray  # (steps,) nats
    top1_agree: np.ndarray  # (steps,) bool
    kv: tuple[tuple[KVDiff, ...], ...]  # [step][layer]
    attention: np.ndarray  # (steps, num_layers) max |Δweight|
    first_divergence_step: int | None
    first_divergent_token_step: int | None
    first_divergent_layer: int | None
    first_attention_layer: int | None
    detected: bool
    reports: tuple[tuple[dict[str, Any], ...], ...] = ()  # [step][layer] what the variant said it holds

    @property
    def steps(self) -> int:
        return len(self.clean.trace.steps)

    @property
    def clean_lengths(self) -> list[int]:
        return [s.cache_len for s in self.clean.trace.steps]

    def buggy_lengths(self, layer: int | None = None) -> list[int]:
        """Rows the variant's query attended over per step, in `layer` (default: first layer that differs)."""
        layer = (self.first_divergent_layer or 0) if layer is None else layer
        return [row[layer].buggy_len for row in self.kv]

    def buggy_kept(self) -> list[int]:
        """Rows the variant cache stored after each step (layer 0)."""
        return [s.cache_len for s in self.buggy.trace.steps]

    def _stack(self, diffs: list[KVDiff]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(d.status) for d in diffs)
        status = np.full((len(diffs), width), -1, dtype=np.int8)
        holds = np.full((len(diffs), width), -1, dtype=np.int64)
        for r, d in enumerate(diffs):
            status[r, : len(d.status)] = d.status
            holds[r, : len(d.holds)] = d.holds
        return status, holds

    def status_by_layer(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(status, holds), each (num_layers, slots): the K/V row diff of every layer at one step (-1 = no slot)."""
        return self._stack(list(self.kv[step]))

    def status_by_step(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(status, holds), each (steps, slots): the K/V row diff of one layer at every step (-1 = no slot)."""
        return self._stack([row[layer] for row in self.kv])

    def share_differing(self) -> np.ndarray:
        """(num_layers, steps): share of slots (of either cache) that are not `same`."""
        return np.array([[float((row[layer].status != SAME).mean()) for row in self.kv]
                         for layer in range(len(self.kv[0]))])

    def held_tokens(self, layer: int, step: int) -> np.ndarray | None:
        """(num_kv_heads, rows): the text token each variant row holds, when the variant tracks it (eviction)."""
        if not self.reports or not self.reports[step]:
            return None
        return self.reports[step][layer].get("tokens")


def compare(clean: Run, buggy: Run, free: Trace | None, *, bug: str = "none", title: str = "Correct cache",
            kind: str = "none", clue: str = "", scope_layers: tuple[int, ...] | None = None, start_step: int = 0,
            reports: tuple[tuple[dict[str, Any], ...], ...] = ()) -> Evidence:
    """Measure a variant run against the exact run of the same tokens (both `Run`s of equal length)."""
    ct, bt = clean.trace, buggy.trace
    tol = Tolerance.for_dtype(ct.model.dtype)
    n_steps, n_layers = len(ct.steps), ct.model.num_layers
    dlogit, kl, top1 = logit_metrics(clean.logits, buggy.logits)
    offsets = [leading_offset(kv_diff(ct, bt, 0, s, tol)) for s in range(n_steps)]
    kv = tuple(tuple(kv_diff(ct, bt, layer, s, tol, offsets[s]) for layer in range(n_layers)) for s in range(n_steps))
    attn = np.array([[attention_diff(ct, bt, layer, s) for layer in range(n_layers)] for s in range(n_steps)])

    logit_steps = np.flatnonzero(dlogit > tol.logit)
    kv_steps = [s for s in range(n_steps) if any(d.differs for d in kv[s])]
    attn_steps = np.flatnonzero((attn > tol.attention).any(axis=1))  # e.g. an unmasked last layer: logits unmoved
    candidates = [int(x[0]) for x in (logit_steps, attn_steps) if len(x)] + kv_steps[:1]
    first_step = min(candidates) if candidates else None
    kv_layers = [layer for layer in range(n_layers) if any(kv[s][layer].differs for s in range(n_steps))]
    attn_layers = np.flatnonzero((attn > tol.attention).any(axis=0))
    token_steps = [i for i in range(n_steps) if bt.steps[i].token_id != ct.steps[i].token_id]
    return Evidence(
        bug=bug, title=title, kind=kind, clue=clue, scope_layers=scope_layers, start_step=start_step,
        clean=clean, buggy=buggy, free=free, tolerance=tol,
        max_abs_logit_diff=dlogit, kl=kl, top1_agree=top1, kv=kv, attention=attn,
        first_divergence_step=first_step,
        first_divergent_token_step=token_steps[0] if token_steps else None,
        first_divergent_layer=kv_layers[0] if kv_layers else None,
        first_attention_layer=int(attn_layers[0]) if len(attn_layers) else None,
        detected=first_step is not None, reports=reports,
    )


# -- for the Cache control: what the cache holds and what it cost ---------------------------------
def held_mask(tokens: np.ndarray | None, n_tokens: int, num_kv_heads: int) -> np.ndarray:
    """(num_kv_heads, n_tokens) bool: which text tokens each KV head's cache holds (None: all of them)."""
    mask = np.zeros((num_kv_heads, n_tokens), dtype=bool)
    if tokens is None:
        mask[:] = True
        return mask
    for h in range(num_kv_heads):
        held = tokens[h][(tokens[h] >= 0) & (tokens[h] < n_tokens)]
        mask[h, held] = True
    return mask


def accumulated_attention(trace: Trace, layer: int, step: int,
                          tokens_by_step: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Attention each text token's row has received, summed over every query up to `step` and over the
    query heads reading each KV head: (num_kv_heads, tokens so far). This is what H2O ranks rows by.

    `tokens_by_step[s]` (num_kv_heads, kv_len): the text token each attended row held at step s (an
    evicting cache); None: row j is token j (an append-only cache).
    """
    heads = trace.model.num_key_value_heads
    n_tokens = len(trace.prompt_ids) + step
    out = np.zeros((heads, n_tokens), dtype=np.float64)
    for s in range(step + 1):
        rec = trace.steps[s].layers[layer]
        received = rec.weights.sum(axis=1)  # (num_heads, kv_len): summed over this step's queries
        per_kv = np.zeros((heads, received.shape[1]))
        np.add.at(per_kv, rec.kv_head_of, received)  # each query head adds to the KV head it read
        held = None if tokens_by_step is None else tokens_by_step[s]
        if held is None:
            width = min(per_kv.shape[1], n_tokens)
            out[:, :width] += per_kv[:, :width]
        else:
            for h in range(heads):
                np.add.at(out[h], held[h], per_kv[h, : held.shape[1]])
    return out


def quantization_error(trace: Trace, layer: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(K error, V error), each (num_kv_heads, kv_len, head_dim): the rows attended (dequantised) minus the
    exact k'/v' the same run wrote. Only for a cache that keeps every row in place (quantisation)."""
    kept_k, kept_v = trace.keys(layer, step), trace.values(layer, step)
    own_k = np.concatenate([s.layers[layer].key_states for s in trace.steps[: step + 1]], axis=1)
    own_v = np.concatenate([s.layers[layer].value_states for s in trace.steps[: step + 1]], axis=1)
    if own_k.shape != kept_k.shape:
        raise ValueError(f"the cache holds {kept_k.shape[1]} rows but {own_k.shape[1]} were written: its rows "
                         "moved, so there is no per-row quantisation error to show")
    return kept_k - own_k, kept_v - own_v
