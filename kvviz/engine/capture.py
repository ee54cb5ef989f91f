"""The registered attention function that records q', K, V and the attention weights.

transformers 5 lets a model's attention be swapped by name (`AttentionInterface`): every layer
calls `fn(module, query, key, value, attention_mask, scaling=..., **kwargs)` with
- query (batch, num_heads, q_len, head_dim), post-RoPE: this step's q',
- key/value (batch, num_key_value_heads, kv_len, head_dim): the whole cache after this step's
  update, new rows last, GQA heads not yet repeated.
kvviz registers one such function, "kvviz", together with the matching mask function: without a
registered mask the model builds no mask for an unknown name and prefill is silently not causal.

Recording is per call, never global: the session sets a `StepRecorder` in a `ContextVar` for the
duration of one forward (with `capture=False` it copies nothing but still routes the variant hooks:
a scoring run that keeps only logits). Two browser sessions stepping on one shared model run in different
threads (different contexts) and each sees only its own recorder. With no recorder set the
function is plain SDPA, so the same model object serves recompute and benchmarks unrecorded.
A recorder may also carry an `override` of the attended K/V (a what-if that needs the queries,
which the cache seam never sees); like the recorder, it acts on that one forward only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

if TYPE_CHECKING:
    from kvviz.engine.variant import CacheVariant

ATTN_IMPLEMENTATION = "kvviz"

# A per-call what-if on the attended K and V, for changes a cache variant cannot express because they
# need this layer's queries (e.g. kvviz.quiz.whatif: keys made with W_q). Called as
# override(layer_idx, query (b, nh, q_len, hd), key, value (b, nkv, kv_len, hd), kwargs) -> (key, value)
# of the same shapes; it must not modify its inputs (the key/value tensors are the cache's own).
AttendOverride = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]


def to_numpy(t: torch.Tensor, copy: bool = True) -> np.ndarray:
    """Detach to a float32 CPU array: a copy by default, since the cache may be mutated in place
    later; `copy=False` for tensors made inside this step's attention, which nothing else writes."""
    a = t.detach().to("cpu", torch.float32).numpy()
    return a.copy() if copy else a


# One transfer per step unless a step's records pass this (a long prompt's prefill on a big model:
# its scores and weights are layers x heads x prompt^2 floats); then one transfer per this many bytes.
MAX_TRANSFER_BYTES = 256 * 2**20


def host_copies(tensors: list[torch.Tensor], max_bytes: int = MAX_TRANSFER_BYTES) -> list[np.ndarray]:
    """float32 host arrays of `tensors` (any device, any float/int dtype), moved in as few transfers as possible.

    The tensors are flattened into one device buffer (one kernel), copied to the host in one go
    (into pinned memory, non-blocking, one wait, on CUDA) and handed back as numpy views of that
    buffer in their own shapes. On the CPU the "transfer" is the concatenation itself. A GPU then
    pays one device->host round trip per step instead of one per tensor (5-7 per layer).
    """
    out: list[np.ndarray] = []
    group: list[torch.Tensor] = []
    size = 0
    for t in [*tensors, None]:
        if t is not None and (not group or size + 4 * t.numel() <= max_bytes):
            group.append(t)
            size += 4 * t.numel()
            continue
        if group:
            out.extend(_one_transfer(group))
        group, size = ([t], 4 * t.numel()) if t is not None else ([], 0)
    return out


def _one_transfer(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    device = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])  # (total,) on the device
    if device.type == "cuda":
        host = torch.empty(flat.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()  # the one wait of the step
    elif device.type == "cpu":
        host = flat
    else:  # mps and others: a plain blocking copy
        host = flat.to("cpu")
    buffer = host.numpy()
    views, offset = [], 0
    for t in tensors:
        n = t.numel()
        views.append(buffer[offset : offset + n].reshape(tuple(t.shape)))
        offset += n
    return views


@dataclass
class StepRecorder:
    """Collects one forward's captures, layer by layer. Lives for one step of one session.

    During the forward it only keeps references to the device tensors (no copy, no sync);
    `to_host()` then moves all of them in one transfer and fills `new_kv` and `attention`.
    """

    step: int
    bug: CacheVariant | None = None
    keep_attended: bool = False  # also copy the K/V actually attended (needed when a variant rewrites history)
    capture: bool = True  # False: copy nothing (a scoring run that keeps only logits); the variant hooks still run
    cache: Any = None  # the session's KVVizCache: receives the weights for a variant that ranks rows (`observe`)
    keep_inputs: bool = True  # the normed input x of the newest position, per layer (the arithmetic view)
    override: AttendOverride | None = None  # a what-if on the attended K/V of this forward (None: the real ones)
    new_kv: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    attention: dict[int, dict[str, Any]] = field(default_factory=dict)
    _pending: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)

    def record_new_kv(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not self.capture:
            return
        # (batch, num_key_value_heads, q_len, head_dim) -> (num_key_value_heads, q_len, head_dim)
        self._pending += [(layer_idx, "key_states", key_states[0]), (layer_idx, "value_states", value_states[0])]

    def record_input(self, layer_idx: int, hidden_states: torch.Tensor) -> None:
        """The attention's input (batch, q_len, hidden_size), already normed: keep its newest row (hidden_size,)."""
        if self.capture and self.keep_inputs:
            self._pending.append((layer_idx, "attention_input", hidden_states[0, -1]))

    def record_attention(
        self,
        layer_idx: int,
        query: torch.Tensor,
        scores: torch.Tensor,
        weights: torch.Tensor,
        kv_head_of: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None = None,
    ) -> None:
        if not self.capture:
            return
        self.attention.setdefault(layer_idx, {})["scaling"] = scaling
        self._pending += [
            (layer_idx, "query_states", query[0]),  # (num_heads, q_len, head_dim)
            (layer_idx, "scores", scores[0]),  # (num_heads, q_len, kv_len)
            (layer_idx, "weights", weights[0]),  # (num_heads, q_len, kv_len)
            (layer_idx, "kv_head_of", kv_head_of),  # (num_heads,)
        ]
        if self.keep_attended:
            self._pending += [(layer_idx, "attended_keys", key[0]), (layer_idx, "attended_values", value[0])]

    def to_host(self) -> None:
        """Move everything recorded in this forward to the host in one transfer (see `host_copies`)."""
        pending, self._pending = self._pending, []
        arrays = host_copies([t for _, _, t in pending])
        new_k: dict[int, np.ndarray] = {}
        new_v: dict[int, np.ndarray] = {}
        for (layer_idx, name, _), a in zip(pending, arrays):
            if name == "key_states":
                new_k[layer_idx] = a
            elif name == "value_states":
                new_v[layer_idx] = a
            else:
                rec = self.attention.setdefault(layer_idx, {})
                if name == "kv_head_of":
                    a = a.astype(np.int64)
                elif name == "scores":
                    # the mask adds dtype-min, not -inf; store masked entries as -inf so they read as "not visible"
                    a[a < -1e30] = -np.inf
                rec[name] = a
        for layer_idx, k in new_k.items():
            self.new_kv[layer_idx] = (k, new_v[layer_idx])


_RECORDER: ContextVar[StepRecorder | None] = ContextVar("kvviz_recorder", default=None)


def current_recorder() -> StepRecorder | None:
    return _RECORDER.get()


@contextmanager
def recording(recorder: StepRecorder) -> Iterator[StepRecorder]:
    """Make `recorder` the target of captures for the forwards run inside the block.

    On a normal exit whatever is still pending moves to the host (`to_host`), so after the block
    `new_kv` and `attention` are complete; a caller timing the transfer calls `to_host` itself
    inside the block (the Session does), and this finds nothing left to move."""
    token = _RECORDER.set(recorder)
    try:
        yield recorder
        recorder.to_host()
    finally:
        _RECORDER.reset(token)


def default_kv_head_of(num_heads: int, num_key_value_heads: int, device: Any = None) -> torch.Tensor:
    """Query head h reads KV head h // group (transformers' `repeat_kv` layout): (num_heads,).

    Built once per shape and device (every layer of every step asks); treat it as read-only."""
    return _default_kv_head_of(num_heads, num_key_value_heads, device)


@lru_cache(maxsize=64)
def _default_kv_head_of(num_heads: int, num_key_value_heads: int, device: Any) -> torch.Tensor:
    group = num_heads // num_key_value_heads
    with torch.inference_mode(False):  # a normal tensor, usable whether or not the first caller was in inference mode
        return torch.arange(num_heads, device=device) // group


def fit_mask(mask: torch.Tensor | None, q_len: int, kv_len: int) -> torch.Tensor | None:
    """Make a (batch, 1, q, kv') additive mask fit kv_len keys.

    The mask is sized from the cache's announced length (`get_mask_sizes`); a bugged cache may
    return more or fewer rows than it announced. Extra keys are older rows (left-padded as
    visible); fewer keys keep the newest columns. A correct cache never needs this.
    """
    if mask is None:
        return None
    mask = mask[..., -q_len:, :]
    have = mask.shape[-1]
    if have == kv_len:
        return mask
    if have > kv_len:
        return mask[..., -kv_len:]
    pad = torch.zeros(*mask.shape[:-1], kv_len - have, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


def kvviz_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention that records what it sees. Returns (output (batch, q_len, num_heads, head_dim), weights)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    attention_mask = fit_mask(attention_mask, q_len, kv_len)
    recorder = _RECORDER.get()
    if recorder is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    num_heads, num_kv = query.shape[1], key.shape[1]
    layer_idx = int(getattr(module, "layer_idx", 0) or 0)
    if recorder.override is not None:
        shapes = (key.shape, value.shape)
        key, value = recorder.override(layer_idx, query, key, value, kwargs)
        if (key.shape, value.shape) != shapes:
            raise ValueError(f"an attention override must keep the K/V shapes {shapes}, got {(key.shape, value.shape)}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    bug = recorder.bug
    bug_on = bug is not None and bug.active(layer_idx, recorder.step)

    kv_head_of = default_kv_head_of(num_heads, num_kv, query.device)  # (num_heads,)
    if bug_on:
        kv_head_of = bug.kv_head_of(kv_head_of, num_kv, layer_idx, recorder.step)
        attention_mask = bug.mask(attention_mask, q_len, layer_idx, recorder.step)
    batch, group = query.shape[0], num_heads // num_kv
    # The standard sharing (query head h reads KV head h // group) folds the heads of a group into
    # the query rows of their KV head: the same products as repeating K/V per head (transformers'
    # repeat_kv) without copying the whole cache in every layer at every step, which cost several
    # times the attention itself. A bug that remaps heads takes the general gather path.
    folded = not bug_on or torch.equal(kv_head_of, default_kv_head_of(num_heads, num_kv, query.device))
    if folded:
        query_folded = query.reshape(batch, num_kv, group * q_len, query.shape[-1])  # (batch, num_kv, group*q_len, head_dim)
        scores = torch.matmul(query_folded, key.transpose(-1, -2)).view(batch, num_heads, q_len, kv_len) * scaling
    else:
        key_per_head = key[:, kv_head_of]  # (batch, num_heads, kv_len, head_dim)
        scores = torch.matmul(query, key_per_head.transpose(-1, -2)) * scaling  # (batch, num_heads, q_len, kv_len)
    if attention_mask is not None:
        scores = scores + attention_mask
    # softmax in float32 as eager attention does: keeps half-precision caches comparable
    if scores.dtype == torch.float32:  # (the casts cost a few microseconds per layer even when they do nothing)
        weights = torch.softmax(scores, dim=-1)  # (batch, num_heads, q_len, kv_len)
    else:
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if folded:
        weights_folded = weights.reshape(batch, num_kv, group * q_len, kv_len)
        output = torch.matmul(weights_folded, value).view(batch, num_heads, q_len, value.shape[-1])  # (b, nh, q_len, hd)
    else:
        output = torch.matmul(weights, value[:, kv_head_of])  # (batch, num_heads, q_len, head_dim)
    output = output.transpose(1, 2).contiguous()  # (batch, q_len, num_heads, head_dim)

    if recorder.cache is not None and bug is not None and bug.observes:
        recorder.cache.observe(layer_idx, weights)  # e.g. H2O accumulates the attention each row receives
    recorder.record_attention(layer_idx, query, scores, weights, kv_head_of, key, value, float(scaling))
    return output, weights


def _record_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on each attention module: its input x (already normed) to the recorder."""
    recorder = _RECORDER.get()
    if recorder is None or not recorder.keep_inputs:
        return
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if isinstance(hidden_states, torch.Tensor):
        recorder.record_input(int(getattr(module, "layer_idx", 0) or 0), hidden_states)


def attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The self-attention module of each layer: {layer_idx: module} (the modules that carry `layer_idx`)."""
    return {int(m.layer_idx): m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)}


def instrument(model: torch.nn.Module) -> None:
    """Record each attention module's input x when a recorder asks (idempotent; at load time only).

    A pre-hook, not a change to the forward: with no recorder set (recompute, benchmarks, other
    sessions) it returns at once, so the shared model computes exactly what it did before.
    """
    for module in attention_modules(model).values():
        if not any(hook is _record_input for hook in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(_record_input, with_kwargs=True)


def register() -> None:
    """Register the attention and mask functions under "kvviz" (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvviz_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)


register()
