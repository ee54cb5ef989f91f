"""The whole arithmetic of one head for the newest token of a step, from the model's own weights.

The learning material's chain, with the run's own numbers (transformers' vocabulary):

    x            the attention's input at the newest position, already normed (recorded by capture)
    q, k, v      x·W_qᵀ (+ b_q), x·W_kᵀ (+ b_k), x·W_vᵀ (+ b_v): this head's rows of q_proj, k_proj, v_proj
    q′, k′       q and k rotated by RoPE: pair (i, i + d/2) turned by position·θ_i (no RoPE: q′ = q)
    scores       q′·Kᵀ·scaling over every cached key (K ends with this step's k′), masked entries -inf
    weights      softmax(scores)
    output       weights·V: this head's output (head_dim,)
    o_proj part  W_o[:, head]·output: what this head adds to the attention output (hidden_size,);
                 the attention output is the sum of every head's part plus o_proj's bias.

x is what the step really fed this layer (recorded, so a cache variant's run shows its own numbers);
K and V are the trace's (what the query attended); the positions are the step's own (RoPE angles).
`check` holds the largest difference of each recomputed piece from what the forward recorded.

Read-only on the shared model: weights are read, never written; no hooks are added or removed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvviz.engine.capture import attention_modules
from kvviz.engine.models import LoadedModel
from kvviz.engine.trace import Trace


class ArithmeticUnavailable(ValueError):
    """This model's attention cannot be taken apart here; the message says why."""


@dataclass(frozen=True)
class HeadArithmetic:
    """One query head of one layer at one step, for its newest query (the last prompt token at prefill)."""

    step: int
    layer: int
    head: int
    kv_head: int
    position: int  # the newest token's position id (what RoPE turned by)
    x: np.ndarray  # (hidden_size,) the normed input
    q: np.ndarray  # (head_dim,) x·W_q before RoPE
    k: np.ndarray  # (head_dim,) x·W_k before RoPE (k′ of the KV head this query head reads)
    v: np.ndarray  # (head_dim,) x·W_v = v′
    q_rot: np.ndarray  # (head_dim,) q′ = RoPE(q); equal to q without RoPE
    k_rot: np.ndarray  # (head_dim,) k′ = RoPE(k)
    rope: bool
    pairs: tuple[tuple[int, int], ...]  # the index pairs RoPE turns together
    angles: np.ndarray  # (len(pairs),) radians each pair is turned by: position·θ_i
    keys: np.ndarray  # (kv_len, head_dim) K attended (its last row is k′)
    values: np.ndarray  # (kv_len, head_dim) V attended
    scaling: float  # 1/sqrt(head_dim) for most models
    dots: np.ndarray  # (kv_len,) q′·K row by row, before scaling
    scores: np.ndarray  # (kv_len,) dots·scaling, -inf where masked
    weights: np.ndarray  # (kv_len,) softmax(scores)
    output: np.ndarray  # (head_dim,) weights·V
    o_part: np.ndarray  # (hidden_size,) W_o[:, this head]·output
    check: dict[str, float] = field(default_factory=dict)  # largest |recomputed - recorded| per piece

    @property
    def visible(self) -> np.ndarray:
        """(kv_len,) which keys the mask lets the query see."""
        return np.isfinite(self.scores)


# -- reading one head's weights -------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _head_weights(attn: Any, head: int, kv_head: int, head_dim: int) -> dict[str, np.ndarray | None]:
    """This head's W_q, W_k, W_v (head_dim, hidden), biases (head_dim,), and its columns of W_o (hidden, head_dim)."""
    q_rows, kv_rows = slice(head * head_dim, (head + 1) * head_dim), slice(kv_head * head_dim, (kv_head + 1) * head_dim)
    if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):  # Llama, Mistral, Qwen2, ...
        def rows(linear: Any, sl: slice) -> tuple[np.ndarray, np.ndarray | None]:
            bias = None if linear.bias is None else _np(linear.bias[sl])
            return _np(linear.weight[sl]), bias

        (wq, bq), (wk, bk), (wv, bv) = rows(attn.q_proj, q_rows), rows(attn.k_proj, kv_rows), rows(attn.v_proj, kv_rows)
        return dict(wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=_np(attn.o_proj.weight[:, q_rows]))
    if hasattr(attn, "c_attn") and hasattr(attn, "c_proj") and not getattr(attn, "is_cross_attention", False):
        # GPT-2's Conv1D: y = x·W + b with W (in, out); c_attn's outputs are [q | k | v], each hidden wide
        w, b = attn.c_attn.weight, attn.c_attn.bias  # (hidden, 3*hidden), (3*hidden,)
        hidden = w.shape[0]

        def cols(part: int, sl: slice) -> tuple[np.ndarray, np.ndarray]:
            s = slice(part * hidden + sl.start, part * hidden + sl.stop)
            return _np(w[:, s]).T, _np(b[s])

        (wq, bq), (wk, bk), (wv, bv) = cols(0, q_rows), cols(1, kv_rows), cols(2, kv_rows)
        return dict(wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=_np(attn.c_proj.weight[q_rows]).T)
    raise ArithmeticUnavailable(
        f"{type(attn).__name__} keeps its projections in a layout kvviz does not take apart; it reads "
        "q_proj/k_proj/v_proj/o_proj (Llama, Mistral, Qwen2, ...) and GPT-2's c_attn/c_proj"
    )


def _affine(w: np.ndarray, b: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    y = w @ x
    return y if b is None else y + b


# -- RoPE -----------------------------------------------------------------------------------------
def _rotary(model: Any) -> Any | None:
    """The model's rotary embedding module (Llama-style `model.model.rotary_emb`), or None (learned positions)."""
    base = getattr(model, "model", None)
    return getattr(base, "rotary_emb", None)


def _rope(model: Any, attn: Any, q: np.ndarray, k: np.ndarray, position: int, hidden: int
          ) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...], np.ndarray]:
    """(q′, k′, pairs, angles): q and k turned by the model's own RoPE at `position`."""
    rotary = _rotary(model)
    if rotary is None:
        return q, k, (), np.zeros(0, dtype=np.float32)
    param = next(model.parameters())
    with torch.inference_mode():
        probe = torch.zeros(1, 1, hidden, dtype=param.dtype, device=param.device)
        cos, sin = rotary(probe, torch.tensor([[position]], device=param.device))  # (1, 1, rot_dim) each
        apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if apply is None:
            raise ArithmeticUnavailable(f"{type(attn).__name__}'s module has no apply_rotary_pos_emb to turn q and k with")
        as_t = [torch.as_tensor(a, dtype=cos.dtype, device=cos.device).view(1, 1, 1, -1) for a in (q, k)]  # (1, 1, 1, hd)
        q_rot, k_rot = apply(as_t[0], as_t[1], cos, sin)
    c, s = _np(cos[0, 0]), _np(sin[0, 0])  # (rot_dim,)
    half = len(c) // 2
    if np.allclose(c[:half], c[half:]) and np.allclose(s[:half], s[half:]):  # rotate_half: i pairs with i + d/2
        pairs = tuple((i, i + half) for i in range(half))
        angles = np.arctan2(s[:half], c[:half])
    else:  # interleaved: 2i pairs with 2i + 1
        pairs = tuple((2 * i, 2 * i + 1) for i in range(half))
        angles = np.arctan2(s[0::2], c[0::2])
    return _np(q_rot).reshape(-1), _np(k_rot).reshape(-1), pairs, angles.astype(np.float32)


def _softmax(scores: np.ndarray) -> np.ndarray:
    finite = np.isfinite(scores)
    out = np.zeros_like(scores, dtype=np.float64)
    if finite.any():
        z = scores[finite] - scores[finite].max()
        e = np.exp(z)
        out[finite] = e / e.sum()
    return out.astype(np.float32)


def head_arithmetic(lm: LoadedModel, trace: Trace, step: int, layer: int, head: int) -> HeadArithmetic:
    """Recompute head `head` of layer `layer` for the newest query of `step` from the model's weights.

    Raises ArithmeticUnavailable when the step recorded no attention input or the model's
    attention is laid out in a way this module does not read.
    """
    s = trace.steps[step]
    rec = s.layers[layer]
    if rec.attention_input is None:
        raise ArithmeticUnavailable("this run did not record the attention inputs (a trace from an older kvviz)")
    attn = attention_modules(lm.model).get(layer)
    if attn is None:
        raise ArithmeticUnavailable(f"no attention module found for layer {layer}")
    info = trace.model
    hd = info.head_dim
    kv = int(rec.kv_head_of[head])
    w = _head_weights(attn, head, kv, hd)
    x = rec.attention_input.astype(np.float32)  # (hidden,)
    q, k, v = _affine(w["wq"], w["bq"], x), _affine(w["wk"], w["bk"], x), _affine(w["wv"], w["bv"], x)
    position = int(s.positions[-1])
    q_rot, k_rot, pairs, angles = _rope(lm.model, attn, q, k, position, x.shape[0])
    keys, values = trace.keys(layer, step)[kv], trace.values(layer, step)[kv]  # (kv_len, head_dim)
    scaling = float(rec.scaling if rec.scaling is not None else hd**-0.5)
    dots = keys @ q_rot  # (kv_len,)
    recorded_scores = rec.scores[head, -1]  # (kv_len,) the mask shows as -inf
    scores = np.where(np.isfinite(recorded_scores), dots * scaling, -np.inf).astype(np.float32)
    weights = _softmax(scores)
    output = weights @ values  # (head_dim,)
    o_part = w["wo"] @ output  # (hidden,)
    finite = np.isfinite(recorded_scores)
    check = {
        "q′": float(np.abs(q_rot - rec.query_states[head, -1]).max()),
        "k′": float(np.abs(k_rot - rec.key_states[kv, -1]).max()),
        "v′": float(np.abs(v - rec.value_states[kv, -1]).max()),
        "scores": float(np.abs(scores[finite] - recorded_scores[finite]).max()) if finite.any() else 0.0,
        "weights": float(np.abs(weights - rec.weights[head, -1]).max()),
    }
    return HeadArithmetic(
        step=step, layer=layer, head=head, kv_head=kv, position=position, x=x, q=q, k=k, v=v, q_rot=q_rot,
        k_rot=k_rot, rope=bool(pairs), pairs=pairs, angles=angles, keys=keys, values=values, scaling=scaling,
        dots=dots.astype(np.float32), scores=scores, weights=weights, output=output.astype(np.float32),
        o_part=o_part.astype(np.float32), check=check,
    )


def o_proj_bias(lm: LoadedModel, layer: int) -> np.ndarray | None:
    """o_proj's bias (hidden_size,), added once to the sum of the heads' parts; None when it has none."""
    attn = attention_modules(lm.model)[layer]
    proj = getattr(attn, "o_proj", None) or getattr(attn, "c_proj", None)
    bias = getattr(proj, "bias", None)
    return None if bias is None else _np(bias)
