"""The data model of a kvviz run: frozen records of CPU numpy arrays.

A run is prefill (step 0: the whole prompt in one forward) followed by one decode step per
generated token. Each `Step` keeps only what that step *added*: the new query/key/value rows and
the new rows of the attention matrix. The K and V a query saw at step t are a prefix of the final
cache (for a correct cache), so `Trace.keys(layer, step)` rebuilds them by concatenation instead
of storing a copy per step: memory grows with the context, not with context x steps.

Vocabulary follows transformers' `cache_utils.py`: tensors are (num_heads | num_key_value_heads,
seq_len, head_dim), batch size 1 dropped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvviz.geometry import KVGeometry
from kvviz.validate import InputError, dumps, finite_or_none, whole_number
from kvviz.validate import settings as deployment

# bytes one float32 takes in the JSON export: "0.012345678363037109, " (19-22 measured), "0.0, " for a zero
JSON_BYTES_PER_FLOAT = 21
JSON_BYTES_PER_ZERO = 5


@dataclass(frozen=True)
class LayerStep:
    """What one attention layer did in one step (q_len = prompt length at prefill, else 1)."""

    layer_idx: int
    query_states: np.ndarray  # (num_heads, q_len, head_dim) post-RoPE q'
    key_states: np.ndarray  # (num_key_value_heads, q_len, head_dim) new k' rows, appended this step
    value_states: np.ndarray  # (num_key_value_heads, q_len, head_dim) new v' rows
    scores: np.ndarray  # (num_heads, q_len, kv_len) scaled q'.K^T + mask, before softmax
    weights: np.ndarray  # (num_heads, q_len, kv_len) softmax(scores); each row sums to 1
    kv_head_of: np.ndarray  # (num_heads,) which KV head each query head read (GQA/MQA sharing)
    # What the query actually attended over, kept only when the cache may rewrite history
    # (an injected bug); for a correct cache it is a prefix of the final cache and not stored.
    attended_keys: np.ndarray | None = None  # (num_key_value_heads, kv_len, head_dim)
    attended_values: np.ndarray | None = None  # (num_key_value_heads, kv_len, head_dim)
    # The attention's input at the newest position (already normed): what x·W_q, x·W_k, x·W_v multiply
    # (`kvviz.engine.arithmetic` recomputes the step from it). None when not recorded.
    attention_input: np.ndarray | None = None  # (hidden_size,)
    scaling: float | None = None  # the factor on q'·K^T (1/sqrt(head_dim) for most models)

    @property
    def kv_len(self) -> int:
        return int(self.weights.shape[-1])

    def nbytes(self) -> int:
        arrays = [self.query_states, self.key_states, self.value_states, self.scores, self.weights,
                  self.kv_head_of, self.attended_keys, self.attended_values, self.attention_input]
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass(frozen=True)
class TokenProb:
    token_id: int
    token: str
    prob: float


@dataclass(frozen=True)
class Step:
    """One forward pass: step 0 is prefill over the prompt, step t > 0 feeds generated token t."""

    step: int
    input_ids: tuple[int, ...]  # tokens fed in this step (the prompt at prefill)
    positions: tuple[int, ...]  # position ids used for them (RoPE / learned positions)
    layers: tuple[LayerStep, ...]
    token_id: int  # the token chosen from this step's logits (the next token)
    token: str
    prob: float  # model probability of the chosen token (temperature 1, before warping)
    top_k: tuple[TokenProb, ...]  # most likely next tokens, model probabilities
    cache_len: int  # cached positions after this step's update (layer 0)
    time_ms: float  # the cached forward, capture included
    max_abs_logit_diff: float | None = None  # vs a full no-cache recompute; None when not run
    recompute_ms: float | None = None
    entropy: float = 0.0  # of the next-token distribution, nats
    logits: np.ndarray | None = None  # (vocab,) last-position logits, kept only when asked (Session keep_logits)

    @property
    def is_prefill(self) -> bool:
        return self.step == 0

    @property
    def key_positions(self) -> int:
        """Cached positions the newest query attended to, read from the captured weights."""
        last_row = self.layers[0].weights[:, -1, :]  # (num_heads, kv_len)
        return int((last_row > 0).any(axis=0).sum())

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers) + (0 if self.logits is None else self.logits.nbytes)


@dataclass(frozen=True, kw_only=True)
class ModelInfo(KVGeometry):
    """The static facts about the model a trace came from: its cache geometry, and where it ran."""

    name: str
    device: str
    dtype: str  # of the weights and the cache ("float32", "bfloat16", ...)


@dataclass(frozen=True)
class Trace:
    """A whole run: the prompt, every step, and the tokens chosen."""

    model: ModelInfo
    prompt: str
    prompt_ids: tuple[int, ...]
    prompt_tokens: tuple[str, ...]
    steps: tuple[Step, ...]
    sampling: dict[str, Any] = field(default_factory=dict)
    bug: str | None = None
    generated_text: str = ""

    @property
    def generated_ids(self) -> tuple[int, ...]:
        return tuple(s.token_id for s in self.steps)

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every token in order: prompt, then generated."""
        return self.prompt_tokens + tuple(s.token for s in self.steps)

    def _step(self, step: int) -> int:
        """`step` checked against the recorded steps (0 = prefill): no silent clamping, no negative indexing."""
        if not self.steps:
            raise InputError("the trace has no recorded steps yet: run prefill first")
        return whole_number(step, "step", 0, len(self.steps) - 1)

    def _layer(self, layer: int) -> int:
        return whole_number(layer, "layer", 0, self.model.num_layers - 1)

    def cached_tokens(self, step: int) -> tuple[str, ...]:
        """Labels of the cache rows after `step` (assumes a correct, append-only cache)."""
        return self.tokens[: self.steps[self._step(step)].cache_len]

    def keys(self, layer: int, step: int) -> np.ndarray:
        """K in the cache after `step`: (num_key_value_heads, kv_len, head_dim).

        What was attended if it was recorded (a buggy cache), else the concatenation of the new
        rows of steps 0..step (a correct cache only ever appends).
        """
        layer, step = self._layer(layer), self._step(step)
        rec = self.steps[step].layers[layer]
        if rec.attended_keys is not None:
            return rec.attended_keys
        return np.concatenate([s.layers[layer].key_states for s in self.steps[: step + 1]], axis=1)

    def values(self, layer: int, step: int) -> np.ndarray:
        """V in the cache after `step`: (num_key_value_heads, kv_len, head_dim)."""
        layer, step = self._layer(layer), self._step(step)
        rec = self.steps[step].layers[layer]
        if rec.attended_values is not None:
            return rec.attended_values
        return np.concatenate([s.layers[layer].value_states for s in self.steps[: step + 1]], axis=1)

    def attention_matrix(self, layer: int, head: int, step: int) -> np.ndarray:
        """The attention heatmap up to `step`, built row by row: (rows, cols), zero-padded.

        Row i is query position i; prefill gives the causal triangle over the prompt and each
        decode step adds one row one column longer.
        """
        layer, step = self._layer(layer), self._step(step)
        head = whole_number(head, "head", 0, self.model.num_heads - 1)
        rows = [s.layers[layer].weights[head] for s in self.steps[: step + 1]]  # each (q_len, kv_len)
        n_rows = sum(r.shape[0] for r in rows)
        n_cols = max(r.shape[1] for r in rows)
        out = np.zeros((n_rows, n_cols), dtype=np.float32)
        i = 0
        for r in rows:
            out[i : i + r.shape[0], : r.shape[1]] = r
            i += r.shape[0]
        return out

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.steps)

    def to_dict(self, *, arrays: bool = False) -> dict[str, Any]:
        """A JSON-ready summary; with `arrays=True` also, per step and layer, the new q′/k′/v′ rows, the
        attention weights and the query-head -> KV-head map as nested lists (not the pre-softmax scores,
        nor the attended K/V a bug may record: the weights and the appended rows rebuild everything shown)."""
        out: dict[str, Any] = {
            "model": self.model.name,
            "device": self.model.device,
            "dtype": self.model.dtype,
            "config": {
                "model_type": self.model.model_type,
                "num_layers": self.model.num_layers,
                "num_heads": self.model.num_heads,
                "num_key_value_heads": self.model.num_key_value_heads,
                "head_dim": self.model.head_dim,
                "attention": self.model.attention_kind,
                "max_positions": self.model.max_positions,
            },
            "prompt": self.prompt,
            "prompt_ids": list(self.prompt_ids),
            "prompt_tokens": list(self.prompt_tokens),
            "generated_ids": list(self.generated_ids),
            "generated_text": self.generated_text,
            "sampling": dict(self.sampling),
            "bug": self.bug,
            "steps": [],
        }
        for s in self.steps:
            entry: dict[str, Any] = {
                "step": s.step,
                "phase": "prefill" if s.is_prefill else "decode",
                "input_ids": list(s.input_ids),
                "positions": list(s.positions),
                "token_id": s.token_id,
                "token": s.token,
                "prob": s.prob,
                "entropy": s.entropy,
                "top_k": [{"token_id": t.token_id, "token": t.token, "prob": t.prob} for t in s.top_k],
                "cache_len": s.cache_len,
                "key_positions": s.key_positions,
                "max_abs_logit_diff": s.max_abs_logit_diff,
                "time_ms": s.time_ms,
                "recompute_ms": s.recompute_ms,
            }
            if arrays:
                entry["layers"] = [_layer_arrays(layer) for layer in s.layers]
            out["steps"].append(entry)
        return out

    def to_json(self, *, arrays: bool = False) -> str:
        """Strict JSON (non-finite numbers are null). For downloads use `export`, which is bounded."""
        return dumps(self.to_dict(arrays=arrays))

    def export_size(self, *, arrays: bool = False) -> int:
        """About how many bytes `export` writes (a little more, rarely less): the summary, and with arrays
        ~21 bytes per recorded float (5 per zero: the future half of prefill's attention)."""
        summary = 2_000 + sum(600 + 60 * len(s.top_k) + 16 * (len(s.input_ids) + len(s.positions)) for s in self.steps)
        if not arrays:
            return summary
        arrays_of = [a for s in self.steps for layer in s.layers
                     for a in (layer.query_states, layer.key_states, layer.value_states, layer.weights)]
        floats = sum(a.size for a in arrays_of)
        nonzero = sum(int(np.count_nonzero(a)) for a in arrays_of)
        return summary + JSON_BYTES_PER_FLOAT * nonzero + JSON_BYTES_PER_ZERO * (floats - nonzero)

    def export(self, *, arrays: bool = False, max_bytes: int | None = None) -> bytes:
        """The trace as strict JSON bytes for a download or a file, never more than `max_bytes`
        (default: the deployment's KVVIZ_MAX_EXPORT_MB).

        Refused up front when `export_size` is over the cap, and written one head's rows at a time so
        the server holds the output plus a few rows as Python floats, not every array at once (a
        480-token "all arrays" export took +626 MiB that way). InputError when over the cap.
        """
        cap = deployment().max_export_mb * 2**20 if max_bytes is None else max_bytes
        if self.export_size(arrays=arrays) > cap:
            raise InputError(self._too_big(arrays, cap))
        head = self.to_dict(arrays=False)
        steps = head.pop("steps")
        out = _Capped(cap, self._too_big(arrays, cap))
        out.write(dumps(head)[:-1] + ', "steps": [')
        for i, (entry, s) in enumerate(zip(steps, self.steps)):
            out.write(", " if i else "")
            if not arrays:
                out.write(dumps(entry))
                continue
            out.write(dumps(entry)[:-1] + ', "layers": [')
            for j, layer in enumerate(s.layers):
                out.write(", " if j else "")
                _write_layer_arrays(out, layer)
            out.write("]}")
        out.write("]}")
        return out.getvalue()

    def _too_big(self, arrays: bool, cap: int) -> str:
        what = "the trace with all arrays" if arrays else "the trace"
        return (f"{what} would be about {self.export_size(arrays=arrays) / 2**20:.0f} MiB, above this server's export "
                f"cap of {cap / 2**20:.0f} MiB: export the summary, or record fewer steps or a shorter prompt")


LAYER_ARRAYS = ("query_states", "key_states", "value_states", "weights")  # what "all arrays" exports per layer


def _layer_arrays(layer: LayerStep) -> dict[str, Any]:
    """One layer's recorded arrays as nested lists, non-finite numbers as null (strict JSON)."""
    out: dict[str, Any] = {"layer_idx": layer.layer_idx, "kv_head_of": layer.kv_head_of.tolist()}
    for name in LAYER_ARRAYS:
        a = getattr(layer, name)
        out[name] = a.tolist() if np.isfinite(a).all() else finite_or_none(a.tolist())
    return out


def _write_layer_arrays(out: _Capped, layer: LayerStep) -> None:
    """`_layer_arrays(layer)` written piece by piece: one head's rows as Python floats at a time."""
    out.write(f'{{"layer_idx": {layer.layer_idx}, "kv_head_of": {dumps(layer.kv_head_of.tolist())}')
    for name in LAYER_ARRAYS:
        a = getattr(layer, name)  # (heads, rows, cols)
        out.write(f', "{name}": [')
        for h in range(a.shape[0]):
            out.write((", " if h else "") + dumps(a[h].tolist()))
        out.write("]")
    out.write("}")


class _Capped:
    """A UTF-8 buffer that refuses (InputError) to grow past `cap` bytes."""

    def __init__(self, cap: int, message: str) -> None:
        self.cap, self.message, self.size = cap, message, 0
        self._buf = io.BytesIO()

    def write(self, text: str) -> None:
        data = text.encode()
        self.size += len(data)
        if self.size > self.cap:
            raise InputError(self.message)
        self._buf.write(data)

    def getvalue(self) -> bytes:
        return self._buf.getvalue()
