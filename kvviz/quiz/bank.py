"""The question bank: each question as data (templates, which options are right, which live view
proves it) plus the function that computes its live facts from a `LiveRun`.

`questions(live)` renders every question that applies to the loaded model with that run's own
numbers. Templates are `str.format` strings over the question's facts and these common ones:
model, n (prompt tokens), steps (recorded steps), L, H, kv (KV heads), d (head_dim), G (query heads
per KV head), kind (MHA/GQA/MQA), dtype, b (bytes per element), bpt (bytes per token).
Tokens from the model are escaped for markdown (`md_token`) before they reach a template.

Writing a question: the right options are listed by index in `right` (a true/false question's
options are True, False: right=(0,) or (1,)); an order question lists its steps in the right
order. Numeric distractors come from the facts (`distinct` drops any that equal the right
answer on some model). A question that cannot be asked of a model (GQA on an MHA model) says so
in `applies`. Bug names are the Bug lab's catalogue names (a test checks them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvviz.economics.cost import A100_BF16_FLOPS, A100_HBM_BYTES_PER_S, A100_RIDGE
from kvviz.geometry import dtype_bytes, human_bytes
from kvviz.quiz.live import DECODE_STEP, FAR_STEP, PREFILL_TOKENS, LiveRun
from kvviz.quiz.questions import TRUE_FALSE, Kind, Link, Question

Facts = dict[str, Any]


# -- formatting helpers -----------------------------------------------------------------------
_MD_SPECIAL = set("\\`*_{}[]()#+-.!|<>~$:")


def md_escape(text: str) -> str:
    """Text from outside (a token, a model name) made literal in markdown: punctuation escaped, newlines shown."""
    text = text.replace("\n", "⏎").replace("\t", "⇥")
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def md_token(token: str) -> str:
    """A model's token, quoted and safe in markdown: “ is”, newlines shown as ⏎."""
    return "“" + md_escape(token) + "”"


def pct(x: float) -> str:
    """0.123 -> '12%', 0.0043 -> '0.4%', smaller with two significant digits."""
    v = 100 * float(x)
    if v == 0:
        return "0%"
    if abs(v) >= 10:
        return f"{v:.0f}%"
    if abs(v) >= 0.1:
        return f"{v:.1f}%"
    return f"{v:.2g}%"


def si(x: float, unit: str) -> str:
    """12_300_000, 'FLOPs' -> '12.3 MFLOPs'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.1f} {prefix}{unit}"
    return f"{x:,.0f} {unit}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def distinct(right: Any, candidates: Iterable[Any], k: int = 3) -> list[Any]:
    """The first `k` candidates that differ from `right` and from each other."""
    out: list[Any] = []
    for c in candidates:
        if c != right and c not in out:
            out.append(c)
        if len(out) == k:
            break
    return out


# -- the spec ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSpec:
    page: str  # "step", "bug_lab", "paged", "cost", "memory", "quiz"
    label: str  # template
    params: dict[str, str] = field(default_factory=dict)  # values are templates


def _always(live: LiveRun) -> str | None:
    return None


@dataclass(frozen=True)
class Spec:
    id: str
    topic: str
    kind: Kind
    text: str
    options: tuple[str, ...]  # templates; an order question's steps in the right order; ignored for truefalse
    right: tuple[int, ...]  # indices of the right options (order: unused)
    explanation: str
    facts: Callable[[LiveRun], Facts]
    links: tuple[LinkSpec, ...] = ()
    applies: Callable[[LiveRun], str | None] = _always  # None, or why the question does not fit this model
    figure: str | None = None

    def render(self, live: LiveRun) -> Question:
        f = {**common_facts(live), **self.facts(live)}
        options = TRUE_FALSE if self.kind == "truefalse" else tuple(o.format(**f) for o in self.options)
        answer = tuple(range(len(options))) if self.kind == "order" else self.right
        links = []
        for spec in self.links:
            params = {k: v.format(**f) for k, v in spec.params.items()}
            if spec.page == "step":  # the live run's own settings, so the step page shows the same run
                params = {"prompt": live.trace.prompt, "steps": str(len(live.trace.steps)), **params}
            links.append(Link(spec.page, spec.label.format(**f), params))
        return Question(self.id, self.topic, self.kind, self.text.format(**f), options, answer,
                        self.explanation.format(**f), tuple(links), self.figure)


def common_facts(live: LiveRun) -> Facts:
    info = live.info
    return dict(model=md_escape(live.name), n=live.n_prompt, steps=len(live.trace.steps), L=info.num_layers, H=info.num_heads,
                kv=info.num_key_value_heads, d=info.head_dim, G=info.group_size, kind=info.attention_kind,
                dtype=info.dtype, b=f"{dtype_bytes(info.dtype):g}", bpt=live.bytes_per_token)


def _step_link(label: str = "Step through: step {t}, layer {layer}, head {head}") -> LinkSpec:
    return LinkSpec("step", label, {"step": "{t}", "layer": "{layer}", "head": "{head}"})


TOPIC_KEYS = "Which keys a query reads"
TOPIC_STEP = "One decode step"
TOPIC_COST = "Cache vs recompute"
TOPIC_BOUND = "Prefill vs decode"
TOPIC_QKV = "q, k and v"
TOPIC_GQA = "GQA / MQA"
TOPIC_ROPE = "Positions"
TOPIC_SERVING = "Serving"
TOPIC_BUGS = "Spotting a flawed cache"


# -- which keys a query reads -----------------------------------------------------------------
def _keys_facts(live: LiveRun) -> Facts:
    t = DECODE_STEP
    layer, head = live.head_with_most(lambda layer, head: live.shares(t, layer, head)[0])
    wp, wg, ws = live.shares(t, layer, head)
    row = live.newest_row(t, layer, head)
    n = live.n_prompt
    return dict(t=t, tth=ordinal(t), tok=md_token(live.fed_token(t)), pos=n + t - 1, right=n + t, before=n + t - 1,
                after=live.trace.steps[t].cache_len, kv_len=row.shape[0], nonzero=int((row > 0).sum()),
                layer=layer, head=head, wp=pct(wp), wg=pct(wg), ws=pct(ws), earlier=t - 1)


def _trap_facts(live: LiveRun) -> Facts:
    f = _keys_facts(live)
    t, info = f["t"], live.info
    heads = [live.shares(t, layer, h)[0] for layer in range(info.num_layers) for h in range(info.num_heads)]
    per_step = [live.shares(s, f["layer"], f["head"])[0] for s in range(1, live.last_step + 1)]
    return dict(f, mean_prompt=pct(float(np.mean(heads))), lo=pct(min(per_step)), hi=pct(max(per_step)),
                decode_steps=live.last_step)


def _causal_facts(live: LiveRun) -> Facts:
    n = live.n_prompt
    i = n // 2
    prefill = live.trace.steps[0].layers
    above = max(float(np.triu(layer.weights[h], k=1).max()) for layer in prefill for h in range(layer.weights.shape[0]))
    layer, head = live.head_with_most(lambda layer, head: float(prefill[layer].weights[head, i, i]))
    row = prefill[layer].weights[head, i]
    return dict(i=i, tok=md_token(live.trace.prompt_tokens[i]), later=n - 1 - i, above=f"{above:g}", layer=layer,
                head=head, nz=int((row > 0).sum()), ws=pct(row[i]), t=0)


# -- one decode step --------------------------------------------------------------------------
def _order_facts(live: LiveRun) -> Facts:
    t = 5
    step = live.trace.steps[t]
    layer, head = live.focus
    row = live.newest_row(t, layer, head)
    return dict(t=t, tok=md_token(live.fed_token(t)), before=live.trace.steps[t - 1].cache_len, after=step.cache_len,
                total=f"{float(row.sum()):.3f}", next=md_token(step.token), p=f"{step.prob:.2f}", layer=layer, head=head,
                rope=", then rotate q′ and k′ by its position (RoPE)" if live.rope else "")


def _generation_facts(live: LiveRun) -> Facts:
    first = live.trace.steps[0]
    return dict(first=md_token(first.token), p=f"{first.prob:.2f}", final=live.trace.steps[-1].cache_len,
                decode_steps=live.last_step, t=live.last_step, layer=live.focus[0], head=live.focus[1])


def _self_facts(live: LiveRun) -> Facts:
    t = 3
    layer, head = live.focus
    smallest = min(float(s.layers[i].weights[:, -1, -1].min()) for s in live.trace.steps[1:] for i in range(live.info.num_layers))
    return dict(t=t, layer=layer, head=head, ws=pct(live.shares(t, layer, head)[2]), smallest=f"{smallest:.1e}",
                before=live.trace.steps[t - 1].cache_len, after=live.trace.steps[t].cache_len)


# -- cache vs recompute -----------------------------------------------------------------------
def _cost_facts(live: LiveRun) -> Facts:
    ctx = live.n_prompt + FAR_STEP
    c = live.step_flops(ctx)
    ratio = c["recompute"] / c["cached"]
    diffs = [s.max_abs_logit_diff for s in live.trace.steps if s.max_abs_logit_diff is not None]
    f = live.flops
    return dict(far=FAR_STEP, ctx=ctx, earlier=ctx - 1, cached=si(c["cached"], "FLOPs"), recompute=si(c["recompute"], "FLOPs"),
                matmul=si(c["matmul"], "FLOPs"), attention=si(c["attention"], "FLOPs"), lm_head=si(c["lm_head"], "FLOPs"),
                P=f"{f.matmul_params:,}", ratio=f"{ratio:,.0f}", ctx_sq=f"{ctx * ctx:,}",
                re_matmul=si(c["matmul"] * ctx, "FLOPs"),
                re_attention=si(4 * f.num_layers * f.attn_width * ctx * (ctx + 1) // 2, "FLOPs"),
                cache_at=human_bytes(live.info.total_bytes(ctx, 1, live.info.dtype)),
                max_diff=f"{max(diffs):.1e}" if diffs else "n/a")


def _bytes_facts(live: LiveRun) -> Facts:
    info = live.info
    b = dtype_bytes(info.dtype)
    right = live.bytes_per_token
    per = info.num_layers * info.head_dim * b
    wrong = distinct(right, [int(per * info.num_key_value_heads), int(2 * per * info.num_heads), right // info.num_layers,
                             int(per * (2 * info.num_key_value_heads + info.num_heads)), 2 * right, right // 4, 4 * right])
    tokens = live.trace.steps[-1].cache_len
    formula = live.cache_formula_bytes
    same = "exactly the formula" if live.cache_bytes == formula else f"the formula says {formula:,}"
    return dict(right=f"{right:,}", w1=f"{wrong[0]:,}", w2=f"{wrong[1]:,}", w3=f"{wrong[2]:,}", tokens=tokens,
                weighed=f"{live.cache_bytes:,}", weighed_per=f"{live.cache_bytes / tokens:,.0f}", same=same,
                t=live.last_step, layer=0, head=0)


# -- prefill vs decode ------------------------------------------------------------------------
def _bound_facts(live: LiveRun) -> Facts:
    ctx = live.n_prompt + FAR_STEP
    prompt = min(PREFILL_TOKENS, live.info.context_length - 1)
    x = live.intensities(ctx, prompt)
    return dict(_timing_facts(live), far=FAR_STEP, ctx=ctx, cached=si(live.flops.cached_step(ctx), "FLOPs"),
                moved=human_bytes(live.weights_bytes + x["cache_bytes"]), wb=human_bytes(live.weights_bytes),
                cb=human_bytes(x["cache_bytes"]), dec=f"{x['decode']:.2f}", prompt=prompt, pf=f"{x['prefill']:,.0f}",
                peak=si(A100_BF16_FLOPS, "FLOP/s"), bw=si(A100_HBM_BYTES_PER_S, "B/s"), ridge=f"{A100_RIDGE:.0f}")


def _timing_facts(live: LiveRun) -> Facts:
    steps = live.trace.steps
    t0 = steps[0].time_ms
    decode = [s.time_ms for s in steps[1:]]
    return dict(t0=f"{t0:.1f}", t0n=f"{t0 / live.n_prompt:.2f}", td=f"{float(np.median(decode)):.1f}",
                decode_steps=len(decode), t=0, layer=0, head=0,
                shape=f"({live.info.num_heads}, {live.n_prompt}, {live.info.head_dim})")


# -- q, k and v -------------------------------------------------------------------------------
def _qkv_facts(live: LiveRun) -> Facts:
    layer, head = live.focus
    g = head // live.info.group_size
    rec = live.trace.steps[0].layers[layer]
    q, k = rec.query_states[head, -1].astype(np.float64), rec.key_states[g, -1].astype(np.float64)
    cos = float(q @ k / (np.linalg.norm(q) * np.linalg.norm(k)))
    return dict(layer=layer, head=head, g=g, hidden=live.info.hidden_size, tok=md_token(live.trace.prompt_tokens[-1]),
                pos=live.n_prompt - 1, cos=f"{cos:.2f}", qn=f"{np.linalg.norm(q):.2f}", kn=f"{np.linalg.norm(k):.2f}", t=0)


def _whatif_applies(live: LiveRun) -> str | None:
    return None if live.tied is not None else f"the what-if cannot run on it: {md_escape(live.tied_error or '')}"


def _whatif_facts(live: LiveRun) -> Facts:
    w = live.tied
    assert w is not None  # _whatif_applies
    T = len(w.tokens)
    err = float(np.abs(np.diagonal(w.tied_scores) - w.own_score_expected).max())
    above = int((np.diagonal(w.tied_scores)[1:] > w.mean_other_score()).sum())
    return dict(layer=w.layer, head=w.head, g=w.kv_head, T=T, T1=T - 1, err=f"{err:.0e}",
                tied_top=int(w.own_is_top(w.tied).sum()), real_top=int(w.own_is_top(w.real).sum()),
                tied_own=pct(w.own_weight(w.tied).mean()), real_own=pct(w.own_weight(w.real).mean()), above=above,
                real_prev=pct(w.previous_weight(w.real)), tied_prev=pct(w.previous_weight(w.tied)),
                real_next=md_token(w.real_next.token), real_p=f"{w.real_next.prob:.2f}",
                tied_next=md_token(w.tied_next.token), tied_p=f"{w.tied_next.prob:.2f}",
                shared=("" if live.info.group_size == 1 else f"; KV head {w.kv_head} is shared by {live.info.group_size} "
                        "query heads, so all of them read the new K and V"),
                t=live.last_step)


# -- GQA / MQA --------------------------------------------------------------------------------
def _gqa_applies(live: LiveRun) -> str | None:
    if live.info.num_key_value_heads == live.info.num_heads:
        return f"{md_escape(live.name)} gives every query head its own KV head (MHA): no heads share one"
    return None


def _kv_map(live: LiveRun, layer: int) -> np.ndarray:
    return live.trace.steps[0].layers[layer].kv_head_of


def _which_kv_facts(live: LiveRun) -> Facts:
    info = live.info
    layer, head = 0, info.num_heads - 1
    kv_map = _kv_map(live, layer)
    g = int(kv_map[head])
    kv = info.num_key_value_heads
    wrong = distinct(f"KV head {g}", [*(f"KV head {j}" for j in (head % kv, (g + 1) % kv, head)),
                                      "Its own K and V: every query head caches its own", "All KV heads, averaged"])
    group = [h for h in range(info.num_heads) if int(kv_map[h]) == g]
    return dict(layer=layer, head=head, g=g, w1=wrong[0], w2=wrong[1], w3=wrong[2],
                map=", ".join(f"{h}→{int(kv_map[h])}" for h in range(info.num_heads)),
                group=", ".join(map(str, group)), bpt_mha=info.with_kv_heads(info.num_heads).bytes_per_token(info.dtype),
                t=0)


def _same_weights_facts(live: LiveRun) -> Facts:
    t = DECODE_STEP
    a, b = 0, 1  # heads 0 and 1 share KV head 0 whenever a group has two heads or more

    def tv(layer: int) -> float:
        w = live.trace.steps[t].layers[layer].weights[:, -1, :]
        return 0.5 * float(np.abs(w[a] - w[b]).sum())

    layer = max(range(live.info.num_layers), key=tv)
    w = live.trace.steps[t].layers[layer].weights[:, -1, :]
    j = int(np.abs(w[a] - w[b]).argmax())
    return dict(t=t, a=a, b=b, layer=layer, head=a, tv=f"{tv(layer):.2f}", maxdiff=f"{float(np.abs(w[a] - w[b]).max()):.3f}",
                pos=j, tok=md_token(live.trace.tokens[j]), wa=pct(w[a, j]), wb=pct(w[b, j]),
                g=int(live.trace.steps[t].layers[layer].kv_head_of[a]))


def _mqa_applies(live: LiveRun) -> str | None:
    return f"{md_escape(live.name)} already uses MQA (one KV head)" if live.info.num_key_value_heads == 1 else None


def _mqa_facts(live: LiveRun) -> Facts:
    info = live.info
    right = info.with_kv_heads(1).bytes_per_token(info.dtype)
    mha = info.with_kv_heads(info.num_heads).bytes_per_token(info.dtype)
    wrong = distinct(right, [live.bytes_per_token, mha, live.bytes_per_token // info.num_heads, 2 * live.bytes_per_token,
                             2 * right, right // 2])
    return dict(right=f"{right:,}", w1=f"{wrong[0]:,}", w2=f"{wrong[1]:,}", w3=f"{wrong[2]:,}", mha=f"{mha:,}",
                less=f"{live.bytes_per_token / right:g}")


# -- positions --------------------------------------------------------------------------------
def _position_facts(live: LiveRun) -> Facts:
    t = 7
    n = live.n_prompt
    right = live.trace.steps[t].positions[-1]
    wrong = distinct(right, [t, 0, n + t, t - 1])
    layer, head = live.focus
    return dict(t=t, tth=ordinal(t), tok=md_token(live.fed_token(t)), right=right, w1=wrong[0], w2=wrong[1], w3=wrong[2],
                before=live.trace.steps[t - 1].cache_len, last_pos=live.trace.steps[t - 1].cache_len - 1, layer=layer, head=head,
                clause=(" — the angle RoPE rotates its q′ and k′ by" if live.rope
                        else " — which learned position embedding is added to it"),
                how=("RoPE rotates q′ and k′ by angles proportional to it, so a query and a key score by their offset"
                     if live.rope else "the model adds the learned embedding of that position to the token's input"))


def _rerotate_facts(live: LiveRun) -> Facts:
    diffs = [s.max_abs_logit_diff for s in live.trace.steps if s.max_abs_logit_diff is not None]
    how = ("RoPE rotates each key once, by its own position, when it is written, and the query by its own: their dot "
           "product then depends only on the offset between them, however far apart they are."
           if live.rope else
           "The position is added once, at the input (a learned embedding); nothing about a cached key depends on where "
           "the newest query is.")
    return dict(how=how, max_diff=f"{max(diffs):.1e}" if diffs else "n/a", rewrite=f"{live.rewrite_max:g}",
                t=live.last_step, layer=0, head=0, clause=" (or rotated again)" if live.rope else "")


# -- serving ----------------------------------------------------------------------------------
def _shared_prompt_facts(live: LiveRun) -> Facts:
    s = live.serving
    prompt = s.system_tokens + s.user_tokens
    return dict(sys=s.system_tokens, user=s.user_tokens, out=s.output_tokens, max_new=s.max_new_tokens, B=s.block_size,
                budget=f"{s.budget_tokens:,}", budget_bytes=human_bytes(s.budget_tokens * s.bytes_per_token),
                reserve=prompt + s.max_new_tokens, blocks_per=math.ceil((prompt + s.output_tokens) / s.block_size),
                total=prompt + s.output_tokens, shared_blocks=s.system_tokens // s.block_size,
                contiguous=s.fits["contiguous"], paged=s.fits["paged"], prefix=s.fits["prefix"])


def _oom_facts(live: LiveRun) -> Facts:
    s = live.serving
    w, out = s.oom_workload, s.oom_summary
    return dict(n_req=w.n_requests, out_lo=w.output_tokens[0], out_hi=w.output_tokens[1], budget=f"{s.oom_budget_tokens:,}",
                budget_bytes=human_bytes(s.oom_budget_tokens * s.bytes_per_token), seed=w.seed,
                pre_paged=out["paged"]["preemptions"], pre_contig=out["contiguous"]["preemptions"],
                finished=out["paged"]["finished"], sim_steps=out["paged"]["steps"],
                peak_paged=out["paged"]["peak running requests"], peak_contig=out["contiguous"]["peak running requests"],
                B=s.block_size)


# -- spotting a flawed cache ------------------------------------------------------------------
def _lengths_facts(live: LiveRun) -> Facts:
    lens = [s.cache_len for s in live.trace.steps]
    return dict(lens=", ".join(map(str, lens[:4])), final=lens[-1], decode_steps=live.last_step)


def _tile_applies(live: LiveRun) -> str | None:
    kv, h = live.info.num_key_value_heads, live.info.num_heads
    if kv == 1:
        return f"{md_escape(live.name)} has one KV head (MQA): every query head reads it, so the mapping cannot be wrong"
    if kv == h:
        return f"{md_escape(live.name)} gives every query head its own KV head (MHA): there is no group to get wrong"
    return None


def _tile_facts(live: LiveRun) -> Facts:
    info = live.info
    kv_map = _kv_map(live, 0)
    tiled = [h % info.num_key_value_heads for h in range(info.num_heads)]
    wrong = [h for h in range(info.num_heads) if tiled[h] != int(kv_map[h])]
    return dict(map=", ".join(f"{h}→{int(kv_map[h])}" for h in range(info.num_heads)),
                tiled=", ".join(f"{h}→{tiled[h]}" for h in range(info.num_heads)), wrong=", ".join(map(str, wrong)))


# -- the bank ---------------------------------------------------------------------------------
BANK: tuple[Spec, ...] = (
    Spec(
        "tenth-token-keys", TOPIC_KEYS, "single",
        "The prompt is {n} tokens long. At decode step {t} the model feeds its {tth} generated token, {tok}. "
        "Over how many cached keys (per layer and KV head) does that token's query q′ attend?",
        ("{right}: the {n} prompt tokens, the {earlier} generated before it, and itself",
         "{earlier}: only the tokens generated before it",
         "{t}: the generated tokens, itself included",
         "{n}: only the prompt; generated tokens are not cached"),
        (0,),
        "In the live run, decode step {t} fed {tok} at position {pos}. The cache held {before} rows before the step and "
        "{after} after appending its k′ and v′, and its query's attention row has **{kv_len} weights**, {nonzero} of them "
        "above zero: head {head} of layer {layer} put {wp} on the {n} prompt tokens, {wg} on the {earlier} tokens "
        "generated before it and {ws} on itself.",
        _keys_facts, (_step_link(),),
    ),
    Spec(
        "tenth-token-trap", TOPIC_KEYS, "truefalse",
        "At decode step {t} the model feeds its {tth} generated token, {tok}. True or false: its query attends only "
        "to the {earlier} tokens generated before it.",
        (), (1,),
        "**False.** The prompt's K and V stay in the cache for the whole generation and every new query reads them "
        "with the rest. At step {t} of the live run, {mean_prompt} of the attention weight (averaged over all {L} × {H} "
        "heads) went to the {n} prompt tokens; head {head} of layer {layer} gave the prompt between {lo} and {hi} of its "
        "weight at every one of the {decode_steps} decode steps. What a query cannot see is only what is not generated yet.",
        _trap_facts, (_step_link(),),
    ),
    Spec(
        "prefill-causal", TOPIC_KEYS, "multi",
        "Prefill sends the whole {n}-token prompt through the model in one forward pass. Which keys does the query of "
        "prompt token {i} ({tok}) attend to?",
        ("Its own key", "The keys of the prompt tokens before it", "The keys of the prompt tokens after it",
         "The keys of the tokens the model will generate"),
        (0, 1),
        "The causal mask: in the live prefill, query {i} of head {head}, layer {layer} has {nz} weights above zero, on "
        "positions 0–{i} ({ws} on itself), and exactly 0 on the {later} later prompt positions. In every layer and head "
        "the largest weight above the diagonal was {above}. Generated tokens do not exist yet at prefill.",
        _causal_facts, (_step_link("Step through: the prefill triangle, layer {layer}, head {head}"),),
    ),
    Spec(
        "decode-order", TOPIC_STEP, "order",
        "Decode step {t} feeds the token {tok}. Put what happens in order: the first four in every layer, the last "
        "once per step.",
        ("Project the token's input into q′, k′ and v′ with W_q, W_k, W_v{rope}",
         "Append k′ and v′ to the cache: K ← [K; k′], V ← [V; v′]",
         "Attend: weights = softmax(q′Kᵀ/√d) over every cached key",
         "Mix: the output is the weights times V, a weighted sum of the cached values",
         "Choose the next token from the last layer's logits"),
        (),
        "At step {t} of the live run every one of the {L} layers made a q′ per query head ({H} × {d} numbers) and a k′ "
        "and v′ per KV head ({kv} × {d} each); the cache went from {before} to {after} rows, so q′ could attend to itself; "
        "head {head} of layer {layer} spread weights summing to {total} over those {after} rows; the mixed values went "
        "on to the next layer; and at the end the model chose {next} (p = {p}), the token step {t} + 1 feeds.",
        _order_facts, (_step_link(),),
    ),
    Spec(
        "generation-order", TOPIC_STEP, "order",
        "Put the stages of one generation in order.",
        ("Tokenize the prompt", "Prefill: one forward over the whole prompt fills K and V for every prompt position",
         "Choose the first new token from the prefill's last logits",
         "Decode, one token at a time: feed the chosen token, append its k′ and v′, attend over the whole cache",
         "Stop: at the end-of-text token or the token limit"),
        (),
        "The live run: the prompt became {n} tokens; prefill (step 0) left {n} rows in the cache and chose {first} "
        "(p = {p}); {decode_steps} decode steps followed, one token each, the cache growing to {final} rows; it stopped at "
        "the limit of {steps} steps.",
        _generation_facts, (_step_link("Step through: the whole run, step {t}"),),
    ),
    Spec(
        "self-key", TOPIC_STEP, "truefalse",
        "True or false: a decode step's query cannot attend to its own token, because k′ is appended to the cache only "
        "after the attention.",
        (), (1,),
        "**False.** k′ and v′ are appended first, then q′ attends over the whole cache, itself included. At decode step "
        "{t} of the live run head {head} of layer {layer} gave its own position {ws} of its weight, and the row was one "
        "longer than the cache before the step ({before} → {after}). Over every decode step, layer and head of the run, "
        "the smallest weight a query gave itself was {smallest}: never 0.",
        _self_facts, (_step_link(),),
    ),
    Spec(
        "flops-step-100", TOPIC_COST, "single",
        "At decode step {far} the context is {ctx} tokens. How many times more arithmetic (FLOPs) does recomputing "
        "everything without a cache take than one cached step, on this model?",
        ("About {ratio}×", "1×: the cache saves memory traffic, not arithmetic", "About 2×",
         "About {ctx_sq}×, the context squared"),
        (0,),
        "Counted on the loaded model's own matrices (kvviz.economics.cost), at {ctx} tokens:\n\n"
        "- a cached step does **{cached}**: {matmul} for the matrix products of one token (2 × {P} weights), {attention} "
        "to attend over {ctx} keys in {L} layers, {lm_head} for the output layer;\n"
        "- recomputing runs the matrix products for all {ctx} tokens ({re_matmul}) and the whole causal attention "
        "triangle ({re_attention}): **{recompute}**, {ratio}× more. The ratio grows about linearly with the context.\n\n"
        "Same answer either way: in the live run the cached logits matched a full recompute to {max_diff}.",
        _cost_facts, (LinkSpec("cost", "Cache vs recompute: time both on this model"),),
    ),
    Spec(
        "bytes-per-token", TOPIC_COST, "single",
        "What does the cache cost? How many bytes does this model's KV cache add per token, all layers together "
        "({dtype})?",
        ("{right} bytes", "{w1} bytes", "{w2} bytes", "{w3} bytes"),
        (0,),
        "2 (K and V) × {L} layers × {kv} KV heads × {d} (head_dim) × {b} bytes ({dtype}) = **{right} bytes per token**. "
        "The live run's own cache, weighed: {weighed} bytes for its {tokens} tokens, {weighed_per} per token — {same}.",
        _bytes_facts, (_step_link("Step through: the cache bytes at step {t}"), LinkSpec("memory", "Memory per token")),
    ),
    Spec(
        "cache-skips", TOPIC_COST, "multi",
        "At decode step {far} ({ctx} tokens of context), what does a cached step skip that a full recompute does?",
        ("The matrix products (W_q, W_k, W_v, output, MLP) for the {earlier} earlier tokens",
         "The attention rows of the {earlier} earlier queries",
         "Reading the K and V of the {earlier} earlier tokens",
         "The output layer (logits) for the new token"),
        (0, 1),
        "Recomputing at {ctx} tokens does the matrix products of all {ctx} tokens ({re_matmul}) and the causal triangle "
        "of attention ({re_attention}); the cached step does one token's products ({matmul}) and one attention row "
        "({attention}). Both still read all {ctx} K/V rows of every layer ({cache_at} at this context) and both compute "
        "one row of logits ({lm_head}): the cache trades that memory for the recomputation.",
        _cost_facts, (LinkSpec("cost", "Cache vs recompute"),),
    ),
    Spec(
        "decode-memory-bound", TOPIC_BOUND, "single",
        "Why is a decode step memory-bound: its speed set by memory bandwidth rather than arithmetic?",
        ("It feeds one token, so each weight read from memory is used for about 2 FLOPs, and the whole cache must be "
         "read as well",
         "The softmax over a long context takes most of the arithmetic",
         "The cache is copied to a new buffer at every step",
         "Each step recomputes the K and V of every earlier token"),
        (0,),
        "On this model at decode step {far} ({ctx} tokens): {cached} for {moved} moved (weights {wb} + cache {cb}), "
        "**{dec} FLOPs per byte**. A {prompt}-token prefill does **{pf} FLOPs per byte** of weights, read once for all "
        "its tokens. An A100 does {peak} against {bw} of memory bandwidth: below about {ridge} FLOPs per byte it waits "
        "on memory. Measured in the live run here: prefill took {t0} ms for {n} tokens, a decode step a median {td} ms "
        "for one.",
        _bound_facts, (LinkSpec("cost", "Cache vs recompute: prefill vs decode throughput"),),
    ),
    Spec(
        "prefill-one-pass", TOPIC_BOUND, "truefalse",
        "True or false: prefill sends all {n} prompt tokens through the model in one forward pass, so each weight "
        "matrix is read from memory once for all of them, while decoding reads every weight again for each new token.",
        (), (0,),
        "**True.** Step 0 of the live run had q′ of shape {shape} in every layer (heads × prompt tokens × head_dim): all "
        "{n} prompt queries at once, and it left {n} rows in the cache. It took {t0} ms ({t0n} ms per token); the "
        "{decode_steps} decode steps took a median {td} ms each, for one token. That is why prefill is compute-bound "
        "and decoding memory-bound.",
        _timing_facts, (_step_link("Step through: prefill"),),
    ),
    Spec(
        "qkv-same-input", TOPIC_QKV, "single",
        "In one attention layer, where do a token's q, k and v come from?",
        ("The same input (the token's hidden state, normalised) multiplied by three different learned matrices W_q, "
         "W_k and W_v",
         "q from the token itself, k and v from the token before it",
         "k and v are copies of q, rotated by different angles",
         "Three separate embedding tables, looked up by the token's id"),
        (0,),
        "In layer {layer} of this model W_q maps the {hidden} numbers of the input to {H} × {d} (a q per query head); "
        "W_k and W_v map the same input to {kv} × {d} each. Same input, different matrices, different vectors: for "
        "{tok} at position {pos}, head {head}'s q′ and KV head {g}'s k′ have cosine similarity {cos} (lengths {qn} and "
        "{kn}). What if the matrices were the same? The next two questions run it.",
        _qkv_facts, (_step_link("Step through: q′, k′, v′ at prefill, layer {layer}, head {head}"),),
    ),
    Spec(
        "whatif-own-score", TOPIC_QKV, "single",
        "What if, in layer {layer}, the KV head that query head {head} reads used head {head}'s W_q as its W_k and W_v? "
        "Then the key at every position is head {head}'s query at that position. What is query i's score on its own "
        "position?",
        ("|q_i|²/√d, its own squared length, scaled", "0: a vector is orthogonal to itself", "1/√d, for every query",
         "The same as with the real W_k: only the values change"),
        (0,),
        "Run on the live model over the run's {T} tokens, as a per-call what-if that leaves the shared weights untouched"
        "{shared}:\n\n"
        "- the diagonal scores equal |q_i|²/√d (largest difference {err});\n"
        "- query i's largest weight is on its own position in **{tied_top} of {T}** rows (with the real W_k: {real_top}), "
        "{tied_own} of its weight on average (really {real_own});\n"
        "- its own score beats its mean score on the earlier positions in {above} of {T1} rows;\n"
        "- this is the run's most previous-token head: {real_prev} of its weight went to the previous token, {tied_prev} "
        "with tied matrices;\n"
        "- the next token after the text: {real_next} (p = {real_p}) really, {tied_next} (p = {tied_p}) with the what-if.",
        _whatif_facts, (_step_link("Step through: the real head {head}, layer {layer}"),), applies=_whatif_applies,
        figure="whatif",
    ),
    Spec(
        "whatif-why-three", TOPIC_QKV, "multi",
        "Why does attention use three different matrices rather than one (W_q = W_k = W_v)?",
        ("What a token looks for (its query) can differ from what it offers to be found by (its key)",
         "What a token passes on when attended (its value) can differ from what it is matched on (its key)",
         "Three matrices make the KV cache smaller",
         "With one matrix the causal mask could not be applied"),
        (0, 1),
        "Tie them and a head loses both. In the what-if on head {head} of layer {layer} (run live over {T} tokens), each "
        "query found mostly itself: {tied_own} of its weight on average against {real_own} with the real matrices, so "
        "the head's own pattern, {real_prev} of its weight on the previous token, fell to {tied_prev}; and what it passed "
        "on was its own query again. Separate matrices cost memory rather than save it: the cache stores K and V, "
        "{bpt:,} bytes per token.",
        _whatif_facts, (_step_link("Step through: the real head {head}, layer {layer}"),), applies=_whatif_applies,
        figure="whatif",
    ),
    Spec(
        "gqa-which-kv", TOPIC_GQA, "single",
        "This model has {H} query heads and {kv} KV heads ({kind}). In layer {layer}, whose K and V does query head "
        "{head} read?",
        ("KV head {g}", "{w1}", "{w2}", "{w3}"),
        (0,),
        "The live trace records the map in every layer: query head → KV head = {map}, that is h // {G} (transformers' "
        "repeat_kv). Heads {group} share KV head {g}. So the cache stores {kv} K/V pairs per layer instead of {H}: "
        "{bpt:,} bytes per token instead of {bpt_mha:,}.",
        _which_kv_facts, (_step_link("Step through: layer {layer}, head {head} (the head buttons say q→kv)"),),
        applies=_gqa_applies,
    ),
    Spec(
        "gqa-same-weights", TOPIC_GQA, "truefalse",
        "Query heads {a} and {b} of layer {layer} read the same KV head. True or false: they therefore compute the same "
        "attention weights.",
        (), (1,),
        "**False.** They read the same K and V, but each has its own q′ (its own rows of W_q), so its own weights. At "
        "decode step {t} of the live run their newest rows in layer {layer} differ by a total variation of {tv}; on "
        "position {pos} ({tok}) head {a} put {wa} and head {b} {wb}. Sharing saves the cache, not the attention.",
        _same_weights_facts, (_step_link("Step through: layer {layer}, heads {a} and {b} (overview: all heads)"),),
        applies=_gqa_applies,
    ),
    Spec(
        "mqa-bytes", TOPIC_GQA, "single",
        "With MQA (one KV head shared by all {H} query heads, everything else the same), how many bytes per token "
        "would this model's cache hold ({dtype})?",
        ("{right} bytes", "{w1} bytes", "{w2} bytes", "{w3} bytes"),
        (0,),
        "2 × {L} layers × **1** KV head × {d} × {b} bytes = {right} bytes per token: {less}× less than this model's {bpt:,} "
        "({kind}, {kv} KV heads) and {H}× less than MHA ({mha} bytes). The price: every query head reads the same K "
        "and V.",
        _mqa_facts, (LinkSpec("memory", "Memory per token: MHA, GQA and MQA side by side"),), applies=_mqa_applies,
    ),
    Spec(
        "rope-position", TOPIC_ROPE, "single",
        "After the {n}-token prompt, decode step {t} feeds the {tth} generated token, {tok}. Which position id does it "
        "get{clause}?",
        ("{right}", "{w1}", "{w2}", "{w3}"),
        (0,),
        "Position ids count every token before it, prompt included, from 0: the live run recorded position **{right}** "
        "for step {t} (the cache held {before} tokens, at positions 0–{last_pos}); {how}. A cache that forgets to "
        "advance the positions gives every new token position 0: `positions_not_advanced` in the Bug lab.",
        _position_facts, (_step_link(), LinkSpec("bug_lab", "Bug lab: positions_not_advanced",
                                                 {"bug": "positions_not_advanced"})),
    ),
    Spec(
        "rope-no-rerotate", TOPIC_ROPE, "truefalse",
        "True or false: as generation goes on, the keys already in the cache must be recomputed{clause} at every step, "
        "because their distance to the newest query keeps changing.",
        (), (1,),
        "**False.** {how} In the live run the cache was never rewritten: after the last step its rows differed from the "
        "rows as they were written by at most {rewrite}, and every step's cached logits matched a full recompute to "
        "{max_diff}.",
        _rerotate_facts, (_step_link("Step through: K grows, old rows never change (step {t})"),),
    ),
    Spec(
        "serving-shared-prompt", TOPIC_SERVING, "multi",
        "A chat service: every request starts with the same {sys}-token system prompt, adds a {user}-token message and "
        "generates about {out} tokens (max_new_tokens {max_new}). The KV memory holds {budget} tokens of this model's "
        "cache ({budget_bytes}). Which of these let more requests run at once?",
        ("Allocate the cache in blocks of {B} tokens as each request grows, instead of reserving its maximum length up "
         "front (paging)",
         "Store the system prompt's K and V once and let every request point to them (prefix sharing)",
         "Raise max_new_tokens",
         "Give each request its own copy of the system prompt's cache"),
        (0, 1),
        "Counted for this model ({bpt:,} bytes per token, {budget_bytes} of cache): reserving prompt + max_new_tokens = "
        "{reserve} tokens per request fits **{contiguous}** at once; paging (ceil({total} / {B}) = {blocks_per} blocks "
        "each) fits **{paged}**; sharing the system prompt's {shared_blocks} full blocks fits **{prefix}**.",
        _shared_prompt_facts, (LinkSpec("paged", "Paged & shared prefix: a shared system prompt",
                                        {"scenario": "system_prompts"}),),
    ),
    Spec(
        "serving-oom", TOPIC_SERVING, "single",
        "A paged server: {n_req} requests with {out_lo}–{out_hi}-token answers, a cache of {budget} tokens "
        "({budget_bytes} with this model). Generations run long, and a running request needs a new block when none is "
        "free. What does a vLLM-style server do?",
        ("Preempt the newest running request: free its blocks and queue it to be recomputed later",
         "Drop the oldest K/V rows of every running request to make room",
         "Crash with an out-of-memory error, losing every request",
         "Store the new block in int8 so that it fits"),
        (0,),
        "Simulated with this model's bytes per token (kvviz.economics.paged, seed {seed}, blocks of {B}): the paged "
        "cache preempted **{pre_paged}** times and finished {finished} requests in {sim_steps} steps; reserving the "
        "maximum length up front never runs out mid-way ({pre_contig} preemptions) but ran at most {peak_contig} "
        "requests at once against {peak_paged} paged. A preempted request pays again: its prompt and tokens so far are "
        "recomputed when it is readmitted.",
        _oom_facts, (LinkSpec("paged", "Paged & shared prefix: long generations", {"scenario": "long_generations"}),),
    ),
    Spec(
        "bug-frozen-length", TOPIC_BUGS, "single",
        "A broken cache: the text keeps coming, but the cache length stays at {n}, the prompt's length, at every decode "
        "step, and each generated token seems forgotten right after its own step. Which bug is it?",
        ("`never_append`: each step attends over [K; k′] but never writes k′ and v′ back",
         "`off_by_one`: each step writes the previous step's k′ and v′",
         "`stale_cache`: the previous request's rows stay in front",
         "`kv_swapped`: k′ goes into the value cache and v′ into the key cache"),
        (0,),
        "A correct cache grows by one row per step: in the live run {lens}, … up to {final} after {decode_steps} decode "
        "steps. Frozen at {n} while each step still sees its own k′ means the new rows are attended but never stored: "
        "`never_append`. The other three keep the length right (`off_by_one`, `kv_swapped`) or make it longer "
        "(`stale_cache`).",
        _lengths_facts, (LinkSpec("bug_lab", "Bug lab: never_append", {"bug": "never_append"}),),
    ),
    Spec(
        "bug-more-rows", TOPIC_BUGS, "single",
        "A broken cache: right after the prefill of the {n}-token prompt the cache holds more than {n} rows, and the "
        "answer mentions things nobody wrote in this conversation. Which bug is it?",
        ("`stale_cache`: the previous request's rows stay in front",
         "`never_append`: each step attends over [K; k′] but never writes k′ and v′ back",
         "`positions_not_advanced`: every new token gets position 0",
         "`fresh_cache_each_step`: a new empty cache before every step"),
        (0,),
        "After prefill a correct cache holds exactly one row per prompt token: {n} in the live run ({lens}, … {final} "
        "after the {decode_steps} decode steps). Extra rows in front are another request's K and V left behind: "
        "`stale_cache`, and attention reads them as if they were part of this prompt.",
        _lengths_facts, (LinkSpec("bug_lab", "Bug lab: stale_cache", {"bug": "stale_cache"}),),
    ),
    Spec(
        "bug-gqa-tile", TOPIC_BUGS, "single",
        "A broken cache: in layer 0 every K and V row equals the correct cache's and the cache lengths are right, yet "
        "the logits differ from prefill on. With a single KV head it could not happen. Which bug is it?",
        ("`gqa_wrong_head`: query head h reads KV head h % {kv} instead of h // {G}",
         "`off_by_one`: each step writes the previous step's k′ and v′",
         "`kv_swapped`: k′ goes into the value cache and v′ into the key cache",
         "`int8_cache`: K and V are stored as int8"),
        (0,),
        "The rows are right; the wrong query heads read them. In the live run every layer's map is {map} (h // {G}); "
        "tiling gives {tiled}, so heads {wrong} would read another group's K and V. With one KV head both maps send "
        "every head to KV head 0.",
        _tile_facts, (LinkSpec("bug_lab", "Bug lab: gqa_wrong_head", {"bug": "gqa_wrong_head"}),), applies=_tile_applies,
    ),
)

# every Bug lab name a question mentions (tests check them against the catalogue)
BUG_NAMES = ("never_append", "off_by_one", "stale_cache", "kv_swapped", "positions_not_advanced", "fresh_cache_each_step",
             "gqa_wrong_head", "int8_cache")


def spec(qid: str) -> Spec:
    for s in BANK:
        if s.id == qid:
            return s
    raise KeyError(f"no question {qid!r}; the bank has: {', '.join(s.id for s in BANK)}")


def questions(live: LiveRun) -> list[Question]:
    """Every question that applies to the live run's model, rendered with its numbers (bank order)."""
    return [s.render(live) for s in BANK if s.applies(live) is None]


def not_applicable(live: LiveRun) -> dict[str, str]:
    """Question id -> why it does not fit this model."""
    return {s.id: why for s in BANK if (why := s.applies(live)) is not None}
