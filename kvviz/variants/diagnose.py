"""Compare a clean and a buggy run: where they part, and what the evidence says.

Three runs of the same prompt and sampling:
- clean:  the correct cache, free-running (its tokens are the reference text);
- buggy:  the injected bug, *teacher-forced* on the clean run's tokens. Every step sees exactly the
          clean step's input, so every difference in logits, K/V rows and attention is caused by
          the bug and not by a different token fed earlier. Its own choice at each step is still
          recorded (`Step.token_id`), so the first step where it would have said something else
          is known exactly;
- free:   the buggy run left to choose its own tokens: the text a user would actually see.

Evidence, per step and layer:
- max |Δlogit| and KL(clean || buggy) between the two next-token distributions (nats);
- a K/V row diff of the cache each query attended over: every slot is `same`, `wrong` (matches no
  clean row), `shifted` (equals a *different* clean row: a row written into the wrong slot),
  `missing` (the clean cache has it, the buggy one is shorter) or `extra` (beyond the clean cache);
- the attention diff (slot-aligned |Δweight|), the cache lengths, the first layer whose rows differ.

`detected` is true when logits differ beyond a stated tolerance or any cache row differs from the
clean one; the tolerances (`Tolerance.for_dtype`) sit far above float32 noise (identical runs are
bitwise equal on CPU; reordered kernels differ by ~1e-6) and far below any real bug's effect.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvviz.engine.models import LoadedModel
from kvviz.engine.sampling import Sampling
from kvviz.engine.session import Limits, Session
from kvviz.engine.trace import Trace
from kvviz.variants.bugs import CacheBug, get_bug

DEFAULT_STEPS = 12  # enough decode steps for every catalogued bug to show on the bundled model

# K/V slot status codes (the heatmap's categories, in display order)
SAME, WRONG, SHIFTED, MISSING, EXTRA = 0, 1, 2, 3, 4
STATUS_NAMES = ("same", "wrong", "shifted", "missing", "extra")


@dataclass(frozen=True)
class Tolerance:
    """What counts as a real difference between two runs (below it: floating-point noise)."""

    logit: float  # max |Δlogit| allowed
    kv_atol: float  # a cache row equals another if max|Δ| <= kv_atol + kv_rtol * max|clean K or V|
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


@dataclass(frozen=True)
class KVDiff:
    """The cache one layer's query attended over at one step, buggy vs clean, slot by slot."""

    layer: int
    step: int
    clean_len: int
    buggy_len: int
    status: np.ndarray  # (max(clean_len, buggy_len),) int8 codes SAME..EXTRA per slot
    holds: np.ndarray  # (buggy_len,) the clean row each buggy row equals (K and V), -1 = none
    swapped_rows: int  # aligned slots whose buggy K equals the clean V and buggy V the clean K
    max_abs: float  # largest |ΔK|, |ΔV| over the slots both caches have
    max_rel: float  # largest |Δ| / max|clean row of that head| over those slots
    offset: int = 0  # buggy slots in front of the first clean row (slot i is compared with clean row i - offset)

    @property
    def differs(self) -> bool:
        return bool((self.status != SAME).any())

    def counts(self) -> dict[str, int]:
        return {name: int((self.status == code).sum()) for code, name in enumerate(STATUS_NAMES)}


@dataclass(frozen=True)
class Finding:
    """One observation drawn from the evidence; `kind` is one of bugs.CLUES or a general kind."""

    kind: str
    text: str


# -- running ---------------------------------------------------------------------------------------
def run(
    lm: LoadedModel,
    prompt: str,
    steps: int = DEFAULT_STEPS,
    *,
    bug: str | CacheBug | None = None,
    sampling: Sampling | None = None,
    forced_ids: list[int] | None = None,
    limits: Limits | None = None,
) -> Run:
    """One recorded run (no parity recompute) that also keeps each step's full logits.

    With `forced_ids` the run is teacher-forced: it feeds those tokens (one per step) whatever it chose."""
    n = steps if forced_ids is None else len(forced_ids)
    session = Session(lm, prompt, n, bug=get_bug(bug), sampling=sampling, parity=False, limits=limits, stop_at_eos=False,
                      forced_ids=forced_ids, keep_logits=True)
    trace = session.run()
    return Run(trace=trace, logits=np.stack([s.logits for s in trace.steps]))


# -- comparing -------------------------------------------------------------------------------------
def _rows(x: np.ndarray) -> np.ndarray:
    """(num_kv_heads, seq, head_dim) -> (seq, num_kv_heads * head_dim)."""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def _match(buggy: np.ndarray, clean: np.ndarray, tol: np.ndarray) -> np.ndarray:
    """For each buggy row, the index of a clean row equal to it within `tol` (per column), else -1.

    The nearest clean row by L2 (one matmul) is the candidate; equality is then checked entry-wise.
    buggy (n, D), clean (m, D), tol (D,) -> (n,)
    """
    if len(buggy) == 0 or len(clean) == 0:
        return np.full(len(buggy), -1)
    d2 = (buggy**2).sum(1)[:, None] + (clean**2).sum(1)[None, :] - 2.0 * buggy @ clean.T  # (n, m)
    best = d2.argmin(axis=1)  # (n,)
    ok = (np.abs(buggy - clean[best]) <= tol).all(axis=1)
    return np.where(ok, best, -1)


def kv_diff(clean: Trace, buggy: Trace, layer: int, step: int, tol: Tolerance, offset: int = 0) -> KVDiff:
    """Slot-by-slot comparison of the K/V one layer attended over at one step.

    `offset` rows of the buggy cache come before its first clean row (a leaked earlier request):
    buggy slot i is compared with clean row i - offset, and the first `offset` slots are extra.
    """
    kc, vc = _rows(clean.keys(layer, step)), _rows(clean.values(layer, step))  # (Lc, D)
    kb, vb = _rows(buggy.keys(layer, step)), _rows(buggy.values(layer, step))  # (Lb, D)
    lc, lb = len(kc), len(kb)
    tol_k = np.full(kc.shape[1], tol.kv_atol + tol.kv_rtol * float(np.abs(kc).max(initial=0.0)))
    tol_v = np.full(vc.shape[1], tol.kv_atol + tol.kv_rtol * float(np.abs(vc).max(initial=0.0)))
    n = max(0, min(lc, lb - offset))  # slots compared with a clean row: buggy offset..offset+n-1
    ab, bk, bv = slice(offset, offset + n), kb[offset:offset + n], vb[offset:offset + n]  # aligned buggy rows
    same = (np.abs(bk - kc[:n]) <= tol_k).all(1) & (np.abs(bv - vc[:n]) <= tol_v).all(1)  # (n,)

    holds = np.full(lb, -1)
    holds[ab][same] = np.arange(n)[same]
    todo = np.flatnonzero(holds == -1)
    if len(todo):
        # match K and V together: in layer 0 two equal tokens have equal V rows (no RoPE on V)
        both = np.concatenate([kb[todo], vb[todo]], axis=1)  # (n_todo, 2D)
        holds[todo] = _match(both, np.concatenate([kc, vc], axis=1), np.concatenate([tol_k, tol_v]))

    width = max(lb, lc + offset)
    status = np.full(width, WRONG, dtype=np.int8)
    status[:offset] = EXTRA  # in front of the first clean row
    status[ab][same] = SAME
    slots = np.arange(lb)
    status[:lb][(holds >= 0) & (holds != slots - offset)] = SHIFTED
    status[lb:] = MISSING  # the clean cache is longer
    status[lc + offset:lb][holds[lc + offset:] < 0] = EXTRA  # beyond the clean cache and equal to nothing in it

    swapped = int(((np.abs(bk - vc[:n]) <= tol_v).all(1) & (np.abs(bv - kc[:n]) <= tol_k).all(1)).sum())
    delta = np.maximum(np.abs(bk - kc[:n]), np.abs(bv - vc[:n]))  # (n, D)
    heads = clean.model.num_key_value_heads
    # relative to each (row, head)'s largest clean entry: the unit an int8 absmax scale works in
    scale_k = np.abs(kc[:n]).reshape(n, heads, -1).max(-1)  # (n, heads)
    scale_v = np.abs(vc[:n]).reshape(n, heads, -1).max(-1)
    rel_k = np.abs(bk - kc[:n]).reshape(n, heads, -1).max(-1) / np.maximum(scale_k, 1e-12)
    rel_v = np.abs(bv - vc[:n]).reshape(n, heads, -1).max(-1) / np.maximum(scale_v, 1e-12)
    return KVDiff(
        layer=layer, step=step, clean_len=lc, buggy_len=lb, status=status, holds=holds, swapped_rows=swapped,
        max_abs=float(delta.max(initial=0.0)), max_rel=float(max(rel_k.max(initial=0.0), rel_v.max(initial=0.0))),
        offset=offset,
    )


def leading_offset(first_layer: KVDiff) -> int:
    """Rows in front of the clean ones: where layer 0's buggy cache holds clean row 0, if it is longer.

    Layer 0 rows depend only on token and position, so a leaked prefix shows there as the clean
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


def kl_divergence(clean_logits: np.ndarray, buggy_logits: np.ndarray) -> np.ndarray:
    """KL(clean || buggy) in nats per step: (steps, vocab) x2 -> (steps,)."""
    lp = torch.log_softmax(torch.from_numpy(clean_logits).double(), dim=-1)
    lq = torch.log_softmax(torch.from_numpy(buggy_logits).double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0).numpy()


# -- the diagnosis ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Diagnosis:
    """Everything the Bug lab shows for one bug: the runs, the per-step evidence and the verdict."""

    bug: str
    title: str
    kind: str  # "bug", "tradeoff" or "none"
    clue: str  # the catalogue's signature clue for this bug ("" for none)
    scope_layers: tuple[int, ...] | None
    start_step: int
    clean: Run
    buggy: Run  # teacher-forced on the clean tokens
    free: Trace | None  # the buggy run choosing its own tokens
    tolerance: Tolerance
    max_abs_logit_diff: np.ndarray  # (steps,)
    kl: np.ndarray  # (steps,) nats
    kv: tuple[tuple[KVDiff, ...], ...]  # [step][layer]
    attention: np.ndarray  # (steps, num_layers) max |Δweight|
    first_divergence_step: int | None
    first_divergent_token_step: int | None
    first_divergent_layer: int | None
    first_attention_layer: int | None
    detected: bool
    findings: tuple[Finding, ...]
    text: str

    @property
    def steps(self) -> int:
        return len(self.clean.trace.steps)

    @property
    def clean_lengths(self) -> list[int]:
        return [s.cache_len for s in self.clean.trace.steps]

    def buggy_lengths(self, layer: int | None = None) -> list[int]:
        """Rows the buggy query attended over per step, in `layer` (default: first layer that differs)."""
        layer = (self.first_divergent_layer or 0) if layer is None else layer
        return [row[layer].buggy_len for row in self.kv]

    def buggy_kept(self) -> list[int]:
        """Rows the buggy cache stored after each step (layer 0)."""
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

    def clue_text(self) -> str:
        """The finding that identifies the bug (what Mystery mode's reveal quotes)."""
        for f in self.findings:
            if f.kind == self.clue:
                return f.text
        return self.findings[0].text if self.findings else self.text

    def to_dict(self) -> dict[str, Any]:
        ct, bt = self.clean.trace, self.buggy.trace
        tok = self.first_divergent_token_step
        steps = []
        for i in range(self.steps):
            counts: dict[str, int] = {name: 0 for name in STATUS_NAMES}
            for d in self.kv[i]:
                for name, c in d.counts().items():
                    counts[name] += c
            steps.append({
                "step": i,
                "clean_token": ct.steps[i].token,
                "buggy_token": bt.steps[i].token,
                "max_abs_logit_diff": float(self.max_abs_logit_diff[i]),
                "kl": float(self.kl[i]),
                "clean_cache_len": ct.steps[i].cache_len,
                "buggy_cache_len": bt.steps[i].cache_len,
                "buggy_attended_len": [d.buggy_len for d in self.kv[i]],
                "kv_rows": counts,
                "attention_max_diff": [float(x) for x in self.attention[i]],
            })
        return {
            "bug": self.bug,
            "title": self.title,
            "kind": self.kind,
            "model": ct.model.name,
            "prompt": ct.prompt,
            "layers": None if self.scope_layers is None else list(self.scope_layers),
            "start_step": self.start_step,
            "detected": self.detected,
            "tolerance": self.tolerance.to_dict(),
            "first_divergence_step": self.first_divergence_step,
            "first_divergent_token_step": tok,
            "first_divergent_token": None if tok is None else {
                "clean": ct.steps[tok].token, "buggy": bt.steps[tok].token,
            },
            "first_divergent_layer": self.first_divergent_layer,
            "first_attention_layer": self.first_attention_layer,
            "max_abs_logit_diff": float(self.max_abs_logit_diff.max()),
            "max_kl": float(self.kl.max()),
            "clean_text": ct.generated_text,
            "buggy_text": None if self.free is None else self.free.generated_text,
            "diagnosis": self.text,
            "findings": [{"kind": f.kind, "text": f.text} for f in self.findings],
            "steps": steps,
        }


def run_clean(lm: LoadedModel, prompt: str, steps: int = DEFAULT_STEPS, sampling: Sampling | None = None,
              limits: Limits | None = None) -> Run:
    """The reference run (reusable across many diagnoses of the same prompt)."""
    return run(lm, prompt, steps, sampling=sampling, limits=limits)


def diagnose(
    lm: LoadedModel,
    bug: str | CacheBug | None,
    prompt: str,
    steps: int = DEFAULT_STEPS,
    *,
    layers: list[int] | None = None,
    start_step: int = 0,
    sampling: Sampling | None = None,
    clean: Run | None = None,
    free_run: bool = True,
    limits: Limits | None = None,
) -> Diagnosis:
    """Run clean and buggy side by side and say where and how they part.

    `bug` is a catalogue name ("none" = the correct cache); `layers`/`start_step` scope it.
    Pass `clean` (from `run_clean` with the same prompt/steps/sampling) to reuse a reference run.
    Raises ValueError for an unknown bug or a layer the model does not have.
    """
    instance = get_bug(bug)
    n_layers = lm.info.num_layers
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}")
    if start_step < 0:
        raise ValueError(f"start step must be >= 0, got {start_step}")
    if instance is not None and (layers is not None or start_step):
        instance = instance.scoped(layers, start_step)
    if clean is None:
        clean = run_clean(lm, prompt, steps, sampling, limits)
    forced = list(clean.trace.generated_ids)
    buggy = run(lm, prompt, bug=instance, sampling=sampling, forced_ids=forced, limits=limits)
    free = run(lm, prompt, len(forced), bug=instance, sampling=sampling, limits=limits).trace if free_run else None
    return _compare(lm, instance, clean, buggy, free, layers, start_step)


def _compare(lm: LoadedModel, bug: CacheBug | None, clean: Run, buggy: Run, free: Trace | None,
             layers: list[int] | None, start_step: int) -> Diagnosis:
    ct, bt = clean.trace, buggy.trace
    tol = Tolerance.for_dtype(ct.model.dtype)
    n_steps, n_layers = len(ct.steps), ct.model.num_layers
    dlogit = np.abs(clean.logits - buggy.logits).max(axis=-1)  # (steps,)
    kl = kl_divergence(clean.logits, buggy.logits)
    offsets = [leading_offset(kv_diff(ct, bt, 0, s, tol)) for s in range(n_steps)]
    kv = tuple(tuple(kv_diff(ct, bt, layer, s, tol, offsets[s]) for layer in range(n_layers)) for s in range(n_steps))
    attn = np.array([[attention_diff(ct, bt, layer, s) for layer in range(n_layers)] for s in range(n_steps)])

    logit_steps = np.flatnonzero(dlogit > tol.logit)
    kv_steps = [s for s in range(n_steps) if any(d.differs for d in kv[s])]
    candidates = ([int(logit_steps[0])] if len(logit_steps) else []) + kv_steps[:1]
    first_step = min(candidates) if candidates else None
    kv_layers = [layer for layer in range(n_layers) if any(kv[s][layer].differs for s in range(n_steps))]
    attn_layers = np.flatnonzero((attn > tol.attention).any(axis=0))
    token_steps = [i for i in range(n_steps) if bt.steps[i].token_id != ct.steps[i].token_id]

    cls = type(bug) if bug is not None else None
    diag = Diagnosis(
        bug="none" if cls is None else cls.name,
        title="Correct cache" if cls is None else cls.title,
        kind="none" if cls is None else cls.kind,
        clue="" if cls is None else cls.clue,
        scope_layers=None if layers is None else tuple(layers),
        start_step=start_step,
        clean=clean, buggy=buggy, free=free, tolerance=tol,
        max_abs_logit_diff=dlogit, kl=kl, kv=kv, attention=attn,
        first_divergence_step=first_step,
        first_divergent_token_step=token_steps[0] if token_steps else None,
        first_divergent_layer=kv_layers[0] if kv_layers else None,
        first_attention_layer=int(attn_layers[0]) if len(attn_layers) else None,
        detected=first_step is not None,
        findings=(), text="",
    )
    findings = tuple(_findings(diag))
    return dataclasses.replace(diag, findings=findings, text=_write(diag, findings))


# -- reading the evidence --------------------------------------------------------------------------
def _tok(t: str) -> str:
    return repr(t)


def _findings(d: Diagnosis) -> list[Finding]:
    """Observations from the evidence only (never from the bug's name), most telling first."""
    out: list[Finding] = []
    if not d.detected:
        return out
    ct, bt = d.clean.trace, d.buggy.trace
    n_prompt = len(ct.prompt_ids)
    layer = d.first_divergent_layer

    # positions fed to the model
    for s_c, s_b in zip(ct.steps, bt.steps):
        if s_c.positions != s_b.positions:
            out.append(Finding("positions", (
                f"At step {s_b.step} the new token was fed at position {list(s_b.positions)[-1]}; the clean run "
                f"used {list(s_c.positions)[-1]}. The positions (RoPE angles) do not advance with the cache."
            )))
            break

    # GQA head mapping
    for s_c, s_b in zip(ct.steps, bt.steps):
        diff_layers = [i for i, (lc, lb) in enumerate(zip(s_c.layers, s_b.layers))
                       if not np.array_equal(lc.kv_head_of, lb.kv_head_of)]
        if diff_layers:
            i = diff_layers[0]
            out.append(Finding("kv_head_of", (
                f"In layer {i} the query heads read KV heads {s_b.layers[i].kv_head_of.tolist()}; the clean "
                f"mapping is {s_c.layers[i].kv_head_of.tolist()}. The cache is fine, the heads read the wrong part of it."
            )))
            break

    # causality at prefill
    w = bt.steps[0].layers[0].weights  # (num_heads, P, P) for a prefill over the prompt
    if w.shape[-1] == w.shape[-2] and w.shape[-1] > 1:
        upper = np.triu(np.ones(w.shape[1:], dtype=bool), k=1)
        above = float(w[:, upper].sum() / w.sum())
        if above > d.tolerance.attention:
            out.append(Finding("prefill_mask", (
                f"In prefill, {above:.0%} of layer 0's attention falls above the diagonal: prompt tokens attend to "
                "tokens after them. The clean run has none there. The causal mask is missing."
            )))

    if layer is not None:
        lens_b = [row[layer].buggy_len for row in d.kv]
        lens_c = [row[layer].clean_len for row in d.kv]
        decode = range(max(1, d.start_step), d.steps)
        # cache lengths
        if all(lens_b[s] == lens_c[s] for s in range(d.steps)):
            out.append(Finding("lengths", "Cache lengths match the clean run at every step."))
        elif len(decode) and all(lens_b[s] == 1 for s in decode):
            out.append(Finding("lengths", (
                f"At every decode step the buggy query attended over 1 row (the clean one over {lens_c[1]}..{lens_c[-1]}): "
                "the cache is emptied before each step, the prompt and history are gone."
            )))
        elif len(decode) > 1 and len({lens_b[s] for s in decode}) == 1 and lens_c[-1] > lens_c[decode[0]]:
            stored = [s.cache_len for s in bt.steps]
            extra = ""
            if stored[-1] < lens_b[-1]:
                extra = (f" It keeps {stored[-1]} rows but attends over {lens_b[-1]}: the newest row is used for "
                         "its own step and then dropped.")
            out.append(Finding("lengths", (
                f"The buggy cache stopped growing: {lens_b[-1]} rows at step {d.steps - 1} while the clean cache "
                f"grew to {lens_c[-1]}.{extra}"
            )))
        elif all(lens_b[s] > lens_c[s] for s in range(d.steps)):
            more = lens_b[0] - lens_c[0]
            text = (f"The buggy cache holds {more} more rows than there are tokens, from prefill on: the prompt has "
                    f"{n_prompt} tokens but step 0 attended over {lens_b[0]} rows.")
            lead = d.kv[0][0].offset
            if lead:
                text += (f" In layer 0 the prompt's rows sit at slots {lead}.. and equal the clean rows; the {lead} rows "
                         "in front match no token of this prompt: they come from an earlier request.")
            out.append(Finding("extra_rows", text))

        # rows written into the wrong slots
        last = d.kv[-1][layer]
        moved = [(i, int(j)) for i, j in enumerate(last.holds) if j >= 0 and j != i - last.offset]
        if len(moved) == 1 and moved[0][1] == last.clean_len - 1:
            slot = moved[0][0]
            every = [s for s in decode if d.kv[s][layer].holds[slot] == d.kv[s][layer].clean_len - 1]
            where = (f"In layer {layer}, slot {slot} holds the newest token's row (clean row {last.clean_len - 1} at "
                     f"step {d.steps - 1}) where clean row {slot} belongs; it held the newest row at {len(every)} of "
                     f"{len(decode)} decode steps")
            if bt.steps[-1].cache_len < last.buggy_len:
                out.append(Finding("shifted_rows", where + ": the newest row is attended for one step, never kept."))
            else:
                out.append(Finding("shifted_rows", where + ": one slot is overwritten at every step."))
        elif moved:
            offsets = {j - i for i, j in moved}
            if len(offsets) == 1:
                off = offsets.pop()
                rel = f"row i holds the clean row i{off:+d}"
                if off == -1:
                    rel += " (the previous token's k′/v′: the write lags one step)"
                text = (f"In layer {layer} at step {d.steps - 1}, slots {moved[0][0]}..{moved[-1][0]} are filled but "
                        f"shifted: {rel}.")
                if off < 0 and moved[0][0] + off == 0 and lens_b[0] > lens_c[0]:
                    text += f" The first {-off} rows match no token of this prompt: they come from somewhere else."
                    out.append(Finding("extra_rows", text))
                else:
                    out.append(Finding("shifted_rows", text))
            else:
                examples = ", ".join(f"slot {i} holds clean row {j}" for i, j in moved[:3])
                out.append(Finding("shifted_rows", (
                    f"In layer {layer} at step {d.steps - 1} rows sit in the wrong slots: {examples}"
                    f"{' …' if len(moved) > 3 else ''}. Rows are written over others."
                )))
        missing = int((last.status == MISSING).sum())
        if missing:
            out.append(Finding("lengths", f"{missing} rows of the clean cache are missing from the buggy one at step "
                                          f"{d.steps - 1}."))

        # K and V exchanged
        swaps = [row[layer] for row in d.kv if row[layer].swapped_rows]
        if swaps:
            k = swaps[0]
            out.append(Finding("swapped", (
                f"In layer {layer} at step {k.step}, {k.swapped_rows} of {min(k.clean_len, k.buggy_len)} buggy key rows "
                "equal the clean value rows, and the values equal the clean keys: K and V are exchanged."
            )))

        # small, everywhere: rounding
        first = [row[layer] for row in d.kv]
        aligned = [k.status[k.offset: k.offset + min(k.clean_len, k.buggy_len - k.offset)] for k in first]
        all_wrong = all(len(a) and (a != SAME).all() for a in aligned)  # every row compared differs
        worst_rel = max(k.max_rel for k in first)
        if all_wrong and 0 < worst_rel < 0.01 and layer == 0:
            out.append(Finding("quantisation", (
                f"Every row of layer 0 differs, but by at most {worst_rel:.2%} of its head's largest entry "
                f"(an int8 rounding step is {1 / 254:.2%}): the signature of reduced precision, not of a logic error."
            )))

    # where in depth
    if layer is not None:
        if layer > 0:
            below = "layer 0 holds" if layer == 1 else f"layers 0..{layer - 1} hold"
            text = f"Cache rows first differ in layer {layer}; {below} exactly the clean rows."
            if d.first_attention_layer is not None and d.first_attention_layer < layer:
                text += (f" Yet attention already differs in layer {d.first_attention_layer}: the fault is in how "
                         "attention reads the cache (mask or head mapping), not in what it stores.")
            out.append(Finding("layers", text))
        else:
            out.append(Finding("layers", "Cache rows differ already in layer 0: what is stored (or where) is wrong, "
                                         "not only what later layers compute from it."))
    elif d.first_attention_layer is not None:
        out.append(Finding("layers", f"No cache row differs, but attention differs from layer {d.first_attention_layer}."))

    # the output
    s = d.first_divergence_step
    if s is not None:
        t = d.first_divergent_token_step
        text = (f"Logits part at step {s} (max |Δlogit| {d.max_abs_logit_diff[s]:.3g}, KL {d.kl[s]:.3g} nats); "
                f"largest over the run: |Δlogit| {d.max_abs_logit_diff.max():.3g}, KL {d.kl.max():.3g} nats.")
        if t is not None:
            text += (f" The first different token is at step {t}: clean {_tok(ct.steps[t].token)}, "
                     f"buggy {_tok(bt.steps[t].token)}.")
        else:
            text += f" No chosen token changed within {d.steps} steps."
        out.append(Finding("logits", text))
    return out


def _write(d: Diagnosis, findings: tuple[Finding, ...]) -> str:
    """The short written diagnosis: a verdict, then the findings in order."""
    tol = d.tolerance
    if not d.detected:
        scope = "" if d.kind == "none" else f" with `{d.bug}` injected"
        text = (f"No divergence{scope}: at every one of {d.steps} steps the logits agree within {tol.logit:g} and every "
                f"cache row equals the clean one (within {tol.kv_atol:g} + {tol.kv_rtol:g}·max|K|).")
        if d.kind != "none":
            text += (" The injected bug changed nothing here: check its scope (layers, start step) and whether it can "
                     "act on this model (a head mapping cannot go wrong with a single KV head).")
        return text
    head = f"Divergence from step {d.first_divergence_step}"
    if d.first_divergent_layer is not None:
        head += f"; cache rows differ from layer {d.first_divergent_layer}"
    head += "."
    if d.kind == "tradeoff":
        head = (f"A trade-off, not a bug: the cache is approximate by design. Measured error: max |Δlogit| "
                f"{d.max_abs_logit_diff.max():.3g}, KL up to {d.kl.max():.2g} nats per step. ") + head
    body = " ".join(f.text for f in findings)
    return f"{head} {body}".strip()
