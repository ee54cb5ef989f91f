"""What if a head's W_k and W_v were its W_q? Run it on the live model and look at the attention.

q, k and v come from the same input x through three matrices: q = x W_q, k = x W_k, v = x W_v
(RoPE then rotates q and k by their position). Tie them, W_k = W_v = W_q of query head h, and in
that layer the key of position j *is* head h's query of position j, so query i's score on its own
position is q_i . q_i / sqrt(d) = |q_i|^2 / sqrt(d): a query now mostly looks at itself (or at
positions whose queries point its way), and what it passes on is its own query again.

Why a recorder hook and not a cache variant (`kvviz.engine.variant.CacheVariant`): the variant
hooks see k'/v' (in `update`), head maps, masks and positions, never the queries, and here the
keys must be the queries and the values the queries *before* RoPE. So the what-if is a per-call
override of the attended K/V (`capture.StepRecorder.override`): it acts on one forward of one
caller only, and the shared model's weights are never touched (every visitor uses them).
It runs without a cache, as one forward over the whole text (the live run's prompt and generated
tokens, teacher-forced), where every query is at hand: with a cache, the past keys would have to be
past queries, which no cache holds. Only this layer's KV head changes, so everything below it is
the same as in the real run, and the query rows of the real and what-if runs are the same rows.

With GQA the replaced KV head is shared: the other query heads of its group read the new K/V
too, exactly as they would if the checkpoint's W_k and W_v rows were overwritten (the tests
compare against such an overwritten copy). Values before RoPE are recovered by rotating back
with the model's own rotary embedding (the rotate-half convention of Llama, Qwen2, Mistral);
models with partial rotary dimensions are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvviz.engine import capture
from kvviz.engine.models import LoadedModel
from kvviz.engine.trace import TokenProb

Unrotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def uses_rope(config: Any) -> bool:
    """RoPE (Llama, Qwen2, ...) vs learned or no positions (GPT-2): the config names its rope fields."""
    return any("rope" in key for key in config.to_dict())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _model_rope(lm: LoadedModel) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """The model's own `apply_rotary_pos_emb(q, k, cos, sin)`, defined beside its attention class (Llama, Qwen2, ...)."""
    for module in lm.model.modules():
        if getattr(module, "layer_idx", None) is not None:
            fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
            if callable(fn):
                return fn
    return None


def rope_inverse(lm: LoadedModel) -> Unrotate:
    """A function (q post-RoPE (batch, T, head_dim), position_ids (batch, T)) -> q before RoPE.

    RoPE turns each pair (i, i + d/2) by an angle: q_rot = q cos + rotate_half(q) sin. Turning back,
    q_rot cos - rotate_half(q_rot) sin = (cos^2 + sin^2) q, which also undoes a scaled rotation
    (some rope types multiply cos and sin by an attention factor). Every call checks the result
    against the model's own `apply_rotary_pos_emb`: a model that rotates another way (interleaved
    pairs, partial dimensions) is refused with a ValueError instead of getting wrong values.
    Identity without RoPE.
    """
    if not uses_rope(lm.model.config):
        return lambda q, positions: q
    rotary = next((m for name, m in lm.model.named_modules() if name.endswith("rotary_emb")), None)
    apply_rope = _model_rope(lm)
    if rotary is None or apply_rope is None:
        raise ValueError(f"{lm.name} uses RoPE but kvviz cannot find its rotary embedding and rotation function: "
                         "the what-if cannot undo RoPE for the values")

    def unrotate(q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(q, positions)  # (batch, T, rotary dims)
        if cos.shape[-1] != q.shape[-1]:
            raise ValueError(f"{lm.name} rotates only {cos.shape[-1]} of {q.shape[-1]} dimensions (partial RoPE): "
                             "the what-if supports full-width RoPE only")
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        before = (q * cos - _rotate_half(q) * sin) / (cos * cos + sin * sin)  # (batch, T, head_dim)
        again = apply_rope(before.unsqueeze(1), before.unsqueeze(1), cos, sin)[0].squeeze(1)  # the model's own rotation
        if not torch.allclose(again, q, rtol=1e-3, atol=1e-4 * (1.0 + float(q.abs().max()))):
            raise ValueError(f"{lm.name} rotates q and k in a way kvviz cannot undo (not rotate-half RoPE): "
                             "the what-if supports Llama-style RoPE only")
        return before

    return unrotate


@dataclass(frozen=True)
class TiedQKV:
    """The override: in `layer`, KV head `kv_head` gets k = q of query head `head` and v = that q before RoPE.

    Call it with the whole text in one forward (no cache): then query and key cover the same positions.
    """

    layer: int
    head: int
    kv_head: int
    unrotate: Unrotate

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx != self.layer:
            return key, value
        if query.shape[2] != key.shape[2]:
            raise ValueError("the tied-QKV what-if runs on one forward over the whole text, without a cache")
        q = query[:, self.head]  # (batch, T, head_dim) post-RoPE
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(q.shape[1], device=q.device).unsqueeze(0)  # (1, T)
        key, value = key.clone(), value.clone()  # never write into the caller's tensors
        key[:, self.kv_head] = q
        value[:, self.kv_head] = self.unrotate(q, positions)
        return key, value


@dataclass(frozen=True)
class TiedAttention:
    """One head's attention over a text, real and with W_k = W_v = W_q (T = tokens in the text)."""

    layer: int
    head: int
    kv_head: int
    tokens: tuple[str, ...]
    real: np.ndarray  # (T, T) attention weights of the real model; row i = query at position i
    tied: np.ndarray  # (T, T) the same head with its KV head's W_k and W_v replaced by its W_q
    tied_scores: np.ndarray  # (T, T) scaled scores of the what-if, -inf above the diagonal
    query_states: np.ndarray  # (T, head_dim) the head's post-RoPE queries (the same in both runs)
    scaling: float  # 1 / sqrt(head_dim) as the model scales
    real_next: TokenProb  # the most likely next token after the text, real model
    tied_next: TokenProb  # ... and with the what-if

    @property
    def own_score_expected(self) -> np.ndarray:
        """|q_i|^2 x scaling for every query: what each diagonal score must be, (T,)."""
        return (self.query_states.astype(np.float64) ** 2).sum(-1) * self.scaling

    @staticmethod
    def own_weight(weights: np.ndarray) -> np.ndarray:
        """Each query's weight on its own position, (T,)."""
        return np.diagonal(weights).copy()

    @staticmethod
    def own_is_top(weights: np.ndarray) -> np.ndarray:
        """Whether each query's largest weight is on its own position, (T,)."""
        return weights.argmax(-1) == np.arange(weights.shape[0])

    @staticmethod
    def previous_weight(weights: np.ndarray) -> float:
        """Mean weight on the previous position, over queries 1..T-1 (how 'previous-token' the head is)."""
        return float(np.diagonal(weights, offset=-1).mean()) if weights.shape[0] > 1 else 0.0

    def mean_other_score(self) -> np.ndarray:
        """Each query's mean score on the earlier positions it sees, (T-1,) for queries 1..T-1."""
        s = self.tied_scores.astype(np.float64)
        return np.array([s[i, :i].mean() for i in range(1, s.shape[0])])


def attention_scaling(lm: LoadedModel, layer: int) -> float:
    """The factor this layer's scores are scaled by: its attention module's `scaling` (1/sqrt(head_dim) if none says)."""
    for module in lm.model.modules():
        if getattr(module, "layer_idx", None) == layer and hasattr(module, "scaling"):
            return float(module.scaling)
    return lm.info.head_dim ** -0.5


def _forward(lm: LoadedModel, ids: Sequence[int], override: capture.AttendOverride | None) -> tuple[
        capture.StepRecorder, torch.Tensor]:
    """One recorded forward over `ids` without a cache; returns the recorder and the last logits (vocab,)."""
    recorder = capture.StepRecorder(step=0, override=override)
    ids_t = torch.tensor([list(ids)], device=lm.device)  # (1, T)
    with torch.inference_mode(), capture.recording(recorder):
        out = lm.model(input_ids=ids_t, use_cache=False)
    return recorder, out.logits[0, -1].float()


def _top(lm: LoadedModel, logits: torch.Tensor) -> TokenProb:
    probs = torch.softmax(logits, dim=-1)  # (vocab,)
    p, i = probs.max(dim=-1)
    return TokenProb(int(i), lm.tokenizer.decode([int(i)]), float(p))


def tied_attention(lm: LoadedModel, ids: Sequence[int], tokens: Sequence[str], layer: int, head: int) -> TiedAttention:
    """Run the text `ids` twice, as is and with head `head`'s KV head in `layer` tied to its W_q."""
    info = lm.info
    if not 0 <= layer < info.num_layers or not 0 <= head < info.num_heads:
        raise ValueError(f"layer {layer} / head {head} out of range: the model has {info.num_layers} layers "
                         f"and {info.num_heads} query heads")
    if len(ids) != len(tokens) or len(ids) < 2:
        raise ValueError(f"need at least 2 token ids with one label each, got {len(ids)} ids and {len(tokens)} labels")
    kv_head = head // info.group_size  # transformers' sharing: query head h reads KV head h // group
    real, real_logits = _forward(lm, ids, None)
    tied, tied_logits = _forward(lm, ids, TiedQKV(layer, head, kv_head, rope_inverse(lm)))
    rec_real, rec_tied = real.attention[layer], tied.attention[layer]
    q = rec_tied["query_states"][head]  # (T, head_dim)
    scaling = attention_scaling(lm, layer)
    return TiedAttention(
        layer=layer, head=head, kv_head=kv_head, tokens=tuple(tokens),
        real=rec_real["weights"][head], tied=rec_tied["weights"][head], tied_scores=rec_tied["scores"][head],
        query_states=q, scaling=scaling, real_next=_top(lm, real_logits), tied_next=_top(lm, tied_logits),
    )
