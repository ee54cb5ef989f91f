"""What the KV cache buys: one decode step with the cache vs a full recompute, measured and counted.

    cached step at context n:     feed 1 token; attend over n cached keys
        FLOPs = 2 * P_matmul + 4 * L * (H * d) * n + 2 * d_model * V
    recompute step at context n:  feed all n tokens, no cache; keep only the last logits
        FLOPs = 2 * P_matmul * n + 4 * L * (H * d) * n (n + 1) / 2 + 2 * d_model * V
P_matmul: weights of every matrix product in the decoder layers; L layers; H query heads of size d;
4 = 2 FLOPs per multiply-add x 2 products (q.K^T and weights.V); the causal sum counts only the keys
each query may see (a fused kernel may compute the masked half too). The ratio grows like n.

Prefill vs decode (why one is compute-bound and the other memory-bound): a forward over q tokens
does ~2 * P * q FLOPs but reads the weights once. Prefill (q = prompt length) therefore does
hundreds of FLOPs per byte read; a decode step (q = 1) does ~1 FLOP per weight byte in fp16 and
must also read the whole cache, so its speed is set by memory bandwidth, not arithmetic.

Timing uses the shared model read-only: outside a Session no recorder is active, so the forward
is plain SDPA; caches are fresh `DynamicCache` objects thrown away afterwards. Warm up first: the
first forwards after loading are slow. References: Kaplan et al. 2020 (FLOPs ~ 2 N per token),
Pope et al. 2022 "Efficiently Scaling Transformer Inference" (arithmetic intensity of decode).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvviz.engine.timing import timed
from kvviz.geometry import KVGeometry, kv_geometry

if TYPE_CHECKING:
    from kvviz.engine.models import LoadedModel


# -- FLOPs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopModel:
    """The numbers a forward's FLOP count depends on, read from a real model."""

    matmul_params: int  # weights of the matrix products inside the decoder layers
    lm_head_params: int  # d_model x vocab (the output projection, tied or not)
    num_layers: int
    attn_width: int  # num_heads x head_dim: the q.K^T and weights.V width per layer

    def forward(self, q_len: int, keys_attended: int, logit_rows: int = 1) -> int:
        """FLOPs of one forward: `q_len` new tokens, `keys_attended` (query, key) pairs in total."""
        return (
            2 * self.matmul_params * q_len
            + 4 * self.num_layers * self.attn_width * keys_attended
            + 2 * self.lm_head_params * logit_rows
        )

    def cached_step(self, context: int) -> int:
        """One new token attending over `context` cached keys (itself included)."""
        return self.forward(1, context)

    def recompute_step(self, context: int) -> int:
        """All `context` tokens again, causal: query i sees i keys; only the last logits."""
        return self.forward(context, context * (context + 1) // 2)

    def prefill(self, tokens: int) -> int:
        return self.forward(tokens, tokens * (tokens + 1) // 2)


def _is_matmul(module: Any) -> bool:
    # GPT-2 uses transformers' Conv1D (a linear layer with a transposed weight)
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def flop_model(model: Any) -> FlopModel:
    """Count the matmul weights of a transformers causal LM (embeddings and lm_head apart)."""
    geo = kv_geometry(model.config)
    head = model.get_output_embeddings()
    matmul = 0
    for module in model.modules():
        if module is head or not _is_matmul(module):
            continue
        matmul += module.weight.numel()
    lm_head = head.weight.numel() if head is not None else geo.hidden_size * geo.vocab_size
    return FlopModel(matmul, int(lm_head), geo.num_layers, geo.num_heads * geo.head_dim)


# -- timing -----------------------------------------------------------------------------------
@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run with `n` intra-op threads (None: leave as is), restoring the previous count after.

    On a machine shared with other work, one thread gives far steadier timings: with two threads
    and a busy neighbour a tiny model's sweep took 15x longer here. The setting is process-wide,
    so other sessions' forwards during a measurement run with it too.
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one thing: median and interquartile range."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)  # linear interpolation, numpy's default
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class StepCost:
    """One context length: measured ms (with spread) and counted FLOPs for both ways."""

    context: int
    cached_ms: Spread
    recompute_ms: Spread
    cached_flops: int
    recompute_flops: int

    @property
    def flop_ratio(self) -> float:
        return self.recompute_flops / self.cached_flops

    @property
    def time_ratio(self) -> float:
        return self.recompute_ms.median / self.cached_ms.median


@dataclass(frozen=True)
class CostSweep:
    model: str
    device: str
    dtype: str
    threads: int
    repeats: int
    steps: tuple[StepCost, ...]

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "context": s.context,
                "cached ms (median)": round(s.cached_ms.median, 3),
                "cached IQR": round(s.cached_ms.iqr, 3),
                "recompute ms (median)": round(s.recompute_ms.median, 3),
                "recompute IQR": round(s.recompute_ms.iqr, 3),
                "time ratio": round(s.time_ratio, 2),
                "cached MFLOPs": round(s.cached_flops / 1e6, 2),
                "recompute MFLOPs": round(s.recompute_flops / 1e6, 2),
                "FLOP ratio": round(s.flop_ratio, 1),
            }
            for s in self.steps
        ]


def default_contexts(max_positions: int, n: int = 7, smallest: int = 8) -> list[int]:
    """Doubling context lengths up to the model's full context (kept: the `n` largest)."""
    top = max(smallest + 1, int(max_positions or 512))
    points, c = [], smallest
    while c < top:
        points.append(c)
        c *= 2
    return [*points, top][-n:]


def _random_ids(lm: LoadedModel, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.info.vocab_size, (1, n), generator=gen).to(lm.device)  # (1, n)


def _new_cache(lm: LoadedModel) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


def check_contexts(lm: LoadedModel, contexts: Sequence[int]) -> list[int]:
    cap = lm.info.context_length
    out = sorted({int(c) for c in contexts})
    if not out or out[0] < 2 or out[-1] > cap:
        raise ValueError(f"context lengths must be between 2 and the model's context ({cap}), got {list(contexts)}")
    return out


def measure_steps(
    lm: LoadedModel, contexts: Sequence[int], repeats: int = 5, warmup: int = 2, seed: int = 0,
    progress: Callable[[float], None] | None = None, threads: int | None = None,
) -> CostSweep:
    """Time one cached decode step and one full recompute at each context length.

    Cached step at n: the cache holds n - 1 tokens, one more is fed (then cropped back, so every
    repeat sees the same n). Recompute at n: all n tokens, no cache. The two are interleaved per
    repeat so background noise hits both alike.
    """
    contexts = check_contexts(lm, contexts)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    model, device = lm.model, lm.device
    flops = flop_model(model)
    steps = []
    with torch.inference_mode(), torch_threads(threads) as used_threads:
        for i, n in enumerate(contexts):
            ids = _random_ids(lm, n, seed + n)  # (1, n)
            cache = _new_cache(lm)
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)  # n - 1 cached tokens

            def cached(ids: torch.Tensor = ids, cache: Any = cache) -> None:
                model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)

            def recompute(ids: torch.Tensor = ids) -> None:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

            c_ms, r_ms = [], []
            for r in range(warmup + repeats):
                c = timed(cached, device)[0]
                cache.crop(-1)  # back to n - 1 tokens for the next repeat
                t = timed(recompute, device)[0]
                if r >= warmup:
                    c_ms.append(c)
                    r_ms.append(t)
            steps.append(StepCost(n, Spread(tuple(c_ms)), Spread(tuple(r_ms)), flops.cached_step(n), flops.recompute_step(n)))
            if progress:
                progress((i + 1) / len(contexts))
    return CostSweep(lm.name, str(device), lm.info.dtype, used_threads, repeats, tuple(steps))


# -- prefill vs decode ------------------------------------------------------------------------
# Spec-sheet peaks (dense bf16 tensor FLOP/s, HBM bytes/s) of one common accelerator, to place the
# measured intensities: below FLOP/s / bytes/s FLOPs per byte a kernel waits on memory.
A100_BF16_FLOPS = 312e12
A100_HBM_BYTES_PER_S = 2.0e12
A100_RIDGE = A100_BF16_FLOPS / A100_HBM_BYTES_PER_S  # ~156 FLOPs per byte

@dataclass(frozen=True)
class Throughput:
    """Prefill of `prompt_tokens` then `decode_tokens` one at a time, repeated."""

    prompt_tokens: int
    decode_tokens: int
    prefill_ms: Spread  # the whole prefill forward
    decode_ms: Spread  # mean ms per decode step, one sample per repeat
    prefill_flops: int
    decode_flops: int  # of one decode step at the middle of the decoded span
    weights_bytes: int
    cache_bytes_mid: int  # cache read by that middle decode step

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / (self.prefill_ms.median / 1e3)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1e3 / self.decode_ms.median

    @property
    def prefill_intensity(self) -> float:
        """FLOPs per byte of weights read (read once for the whole prompt)."""
        return self.prefill_flops / self.weights_bytes

    @property
    def decode_intensity(self) -> float:
        """FLOPs per byte moved by one decode step (weights + the cache it reads)."""
        return self.decode_flops / (self.weights_bytes + self.cache_bytes_mid)

    @property
    def prefill_gflops_per_s(self) -> float:
        return self.prefill_flops / (self.prefill_ms.median / 1e3) / 1e9

    @property
    def decode_gflops_per_s(self) -> float:
        return self.decode_flops / (self.decode_ms.median / 1e3) / 1e9


def model_weight_bytes(model: Any) -> int:
    """Bytes of the loaded weights (tied matrices once: `parameters()` yields each tensor once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_throughput(
    lm: LoadedModel, prompt_tokens: int = 256, decode_tokens: int = 32, repeats: int = 3, warmup: int = 1, seed: int = 0,
    threads: int | None = None,
) -> Throughput:
    """Measured prefill tokens/s vs decode tokens/s on the loaded model."""
    cap = lm.info.context_length
    if prompt_tokens < 1 or decode_tokens < 1 or prompt_tokens + decode_tokens > cap:
        raise ValueError(
            f"prompt ({prompt_tokens}) + decode ({decode_tokens}) tokens must be positive and fit the model's "
            f"context of {cap}"
        )
    model, device = lm.model, lm.device
    ids = _random_ids(lm, prompt_tokens + decode_tokens, seed)  # (1, prompt + decode)
    pre, dec = [], []
    with torch.inference_mode(), torch_threads(threads):
        for r in range(warmup + repeats):
            cache = _new_cache(lm)

            def prefill(cache: Any = cache) -> None:
                model(input_ids=ids[:, :prompt_tokens], past_key_values=cache, use_cache=True)

            def decode(t: int, cache: Any = cache) -> None:
                model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)

            p = timed(prefill, device)[0]
            total = 0.0
            for t in range(prompt_tokens, prompt_tokens + decode_tokens):
                total += timed(lambda t=t: decode(t), device)[0]
            if r >= warmup:
                pre.append(p)
                dec.append(total / decode_tokens)
    flops = flop_model(model)
    mid = prompt_tokens + decode_tokens // 2
    geo = kv_geometry(model.config)
    return Throughput(
        prompt_tokens, decode_tokens, Spread(tuple(pre)), Spread(tuple(dec)), flops.prefill(prompt_tokens),
        flops.cached_step(mid), model_weight_bytes(model), geo.total_bytes(mid, 1, lm.info.dtype),
    )


def bytes_per_decode_token(geo: KVGeometry, weights_bytes: int, contexts: Sequence[int], dtype: str) -> list[dict[str, int]]:
    """Bytes one decode step must move at each context: every weight once + the whole cache once.

    (Plus one token's K/V written; activations are negligible at batch 1.) At batch B the weights
    are shared by B tokens but each sequence still reads its own cache.
    """
    per_token = geo.bytes_per_token(dtype)
    return [
        {"context": int(n), "weights_bytes": int(weights_bytes), "cache_bytes": int(n * per_token)}
        for n in contexts
    ]
