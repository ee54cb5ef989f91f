"""Quantised caches: K and V stored in fewer bits, on purpose (kind "quantization").

A row is quantised when it is written and dequantised when read; kvviz stores the dequantised
values (float32 on CPU), so attention sees exactly what a real quantised cache would hand it, and
the bytes a real cache would hold are counted by formula (`cache_bytes_per_element`, from
`kvviz.geometry.quantized_bytes_per_element`: the values' bits plus each group's fp16 scale, and
its fp16 minimum when asymmetric). Keys are quantised after RoPE, as llama.cpp and KIVI do.

Grouping (`group` elements share one scale):
- `keys="token"`: a group is `group` consecutive channels of one token's head vector (llama.cpp's
  q8_0/q4_0 blocks of 32; `group = head_dim` is one scale per token and head);
- `keys="channel"` (KIVI): a group is one channel over `group` consecutive tokens, because key
  outliers sit in fixed channels. A group can only be quantised once `group` tokens exist, so the
  newest rows (fewer than `group`) stay in full precision until their block fills, as in KIVI.
Values are always quantised per token (KIVI does the same).

Formats: `int` (round to 2^bits levels: symmetric absmax like llama.cpp, or asymmetric min/max
with a zero point like KIVI) and `fp8` (float8 e4m3 after scaling each group's absmax to 448,
the largest e4m3 value; torch casts on CPU, and e4m3 saturates at 448 rather than overflowing).
Scales are themselves rounded to fp16, as stored.

Shapes: key/value states are (batch, num_key_value_heads, seq_len, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvviz.engine.variant import KV, LayerCall
from kvviz.geometry import KVGeometry, quantized_bytes_per_element
from kvviz.variants.registry import Param, Variant, register

FP8_MAX = 448.0  # largest finite float8 e4m3 value (torch.float8_e4m3fn)
SCALE_BYTES = 2  # every format here stores its scales (and minimums) as fp16


def fake_quantize(x: torch.Tensor, bits: int, fmt: str, zero_point: bool) -> torch.Tensor:
    """Quantise and dequantise groups along the last dim: x (..., group) -> same shape and dtype."""
    xf = x.float()
    if fmt == "fp8":
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).half().float().clamp_min(1e-12)
        return ((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
    if zero_point:  # asymmetric: levels 0..2^bits-1 between the group's min and max
        lo = xf.amin(dim=-1, keepdim=True).half().float()
        scale = ((xf.amax(dim=-1, keepdim=True) - lo) / (2**bits - 1)).half().float().clamp_min(1e-12)
        q = torch.round((xf - lo) / scale).clamp(0, 2**bits - 1)
        return (q * scale + lo).to(x.dtype)
    top = 2 ** (bits - 1) - 1  # symmetric: -top..top (127 for int8, 7 for int4)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / top).half().float().clamp_min(1e-12)
    return (torch.round(xf / scale).clamp(-top, top) * scale).to(x.dtype)


def per_token(x: torch.Tensor, group: int, bits: int, fmt: str, zero_point: bool) -> torch.Tensor:
    """Groups of `group` channels within each token: x (batch, heads, n, head_dim)."""
    b, h, n, d = x.shape
    return fake_quantize(x.reshape(b, h, n, d // group, group), bits, fmt, zero_point).reshape(b, h, n, d)


def per_channel(x: torch.Tensor, group: int, bits: int, fmt: str, zero_point: bool) -> torch.Tensor:
    """Groups of `group` tokens within each channel: x (batch, heads, n, head_dim) with n a multiple of group."""
    b, h, n, d = x.shape
    blocks = x.reshape(b, h, n // group, group, d).transpose(-1, -2)  # (b, h, blocks, d, group)
    return fake_quantize(blocks, bits, fmt, zero_point).transpose(-1, -2).reshape(b, h, n, d)


def group_problem(group: int, head_dim: int) -> str | None:
    """Why `group` cannot split head_dim into per-token groups (None: it can)."""
    if head_dim % group == 0:
        return None
    divisors = [g for g in (8, 16, 32, 64, 128, 256) if head_dim % g == 0]
    return f"group size {group} does not divide head_dim {head_dim} (values are grouped per token): use one of {divisors}"


@register
@dataclass(frozen=True)
class Quantized(Variant):
    name: ClassVar[str] = "int8_cache"
    title: ClassVar[str] = "int8 cache"
    kind: ClassVar[str] = "quantization"
    description: ClassVar[str] = (
        "K and V stored as int8 in blocks of 32 values with one fp16 absmax scale each (llama.cpp's q8_0: "
        "8.5 bits per value), dequantised when read."
    )
    corrupts: ClassVar[str] = "every row, by at most half a quantisation step (its block's max|x| / 254)"
    symptom: ClassVar[str] = (
        "every row differs slightly from layer 0; small KL per step; text usually unchanged for a while"
    )
    source: ClassVar[str] = (
        "ggml-org/llama.cpp#7412: quantised KV cache (q8_0, q4_0 blocks of 32 with an fp16 scale) measured as "
        "added perplexity and KL divergence; huggingface/blog#2045 (KV cache quantization in transformers)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/ggml-org/llama.cpp/pull/7412",
        "https://github.com/huggingface/blog/pull/2045",
    )
    clue: ClassVar[str] = "quantisation"
    params: ClassVar[tuple[Param, ...]] = (
        Param("bits", "Bits", "bits per stored value", choices=(8, 4)),
        Param("format", "Format", "int: rounded integers; fp8: float8 e4m3 (8 bits only)", choices=("int", "fp8")),
        Param("keys", "Key groups", "token: a group spans channels of one token; channel: one channel over "
                                    "tokens (KIVI)", choices=("token", "channel")),
        Param("group", "Group size", "values sharing one scale"),
        Param("zero_point", "Zero point", "asymmetric (min/max, as KIVI) instead of symmetric absmax",
              choices=(False, True)),
    )
    bits: int = 8
    format: str = "int"
    keys: str = "token"
    group: int = 32
    zero_point: bool = False

    def __post_init__(self) -> None:
        if self.format == "fp8" and self.bits != 8:
            raise ValueError(f"fp8 stores 8 bits per value; --bits {self.bits} is for the int format")
        if self.format == "fp8" and self.zero_point:
            raise ValueError("fp8 is symmetric (sign bit): it takes no zero point")

    def problem(self, geometry: KVGeometry) -> str | None:
        return group_problem(self.group, geometry.head_dim)

    def check(self, head_dim: int) -> None:
        """Refuse a group size that does not divide head_dim (values are grouped per token), naming the fix."""
        problem = group_problem(self.group, head_dim)
        if problem:
            raise ValueError(problem)

    def cache_bytes_per_element(self, exact: float) -> float:
        return quantized_bytes_per_element(self.bits, self.group, SCALE_BYTES, self.zero_point)

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        return per_token(x, self.group, self.bits, self.format, self.zero_point)

    def update(self, stored: KV | None, new: KV, call: LayerCall) -> tuple[KV, KV]:
        self.check(new[0].shape[-1])
        values = self._values(new[1])
        if self.keys == "token":
            keys = self._values(new[0])
            kept = (keys, values) if stored is None else (
                torch.cat([stored[0], keys], dim=-2), torch.cat([stored[1], values], dim=-2))
            return kept, kept
        # per channel: append exact keys, then quantise every full block of `group` rows not yet done
        state = call.state
        n = 0 if stored is None else stored[0].shape[-2]
        done = state.setdefault("done", n)  # rows stored before the variant started stay as written
        keys = new[0] if stored is None else torch.cat([stored[0], new[0]], dim=-2)
        full = (keys.shape[-2] - done) // self.group * self.group
        if full:
            keys = keys.clone()
            block = per_channel(keys[..., done:done + full, :], self.group, self.bits, self.format, self.zero_point)
            keys[..., done:done + full, :] = block
            state["done"] = done + full
        kept = (keys, values if stored is None else torch.cat([stored[1], values], dim=-2))
        return kept, kept

    def report(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"quantized_key_rows": int(state["done"])} if "done" in state else {}


@register
@dataclass(frozen=True)
class Int4Cache(Quantized):
    name: ClassVar[str] = "int4_cache"
    title: ClassVar[str] = "int4 cache"
    description: ClassVar[str] = (
        "K and V stored as 4-bit integers in blocks of 32 with one fp16 absmax scale each (llama.cpp's q4_0: "
        "4.5 bits per value), dequantised when read."
    )
    corrupts: ClassVar[str] = "every row, by up to half a step of 15 levels (its block's max|x| / 14)"
    symptom: ClassVar[str] = "every row differs visibly from layer 0; KL per step an order of magnitude above int8's"
    source: ClassVar[str] = (
        "ggml-org/llama.cpp#7412 (q4_0 K/V cache types, perplexity and KL measured); ggml-org/llama.cpp#10378 "
        "(a quantised V cache needs flash attention)"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/ggml-org/llama.cpp/pull/7412",
        "https://github.com/ggml-org/llama.cpp/issues/10378",
    )
    bits: int = 4


@register
@dataclass(frozen=True)
class Fp8Cache(Quantized):
    name: ClassVar[str] = "fp8_cache"
    title: ClassVar[str] = "fp8 (e4m3) cache"
    description: ClassVar[str] = (
        "K and V stored as float8 e4m3 (4 exponent, 3 mantissa bits), each block of 32 scaled so its absmax "
        "maps to 448, e4m3's largest value; emulated on CPU with torch's float8 cast."
    )
    corrupts: ClassVar[str] = "every value by a relative error of about 2-3% (3 mantissa bits), large and small alike"
    symptom: ClassVar[str] = (
        "every row differs from layer 0 by a few percent of each value (not of the row's max, unlike int8)"
    )
    source: ClassVar[str] = (
        "vllm-project/vllm#3290 (a scaled fp8 e4m3 KV cache: values divided by a scale so they fit e4m3's range) "
        "and vllm-project/vllm#2279 (the earlier unscaled e5m2 cache, and why e4m3 needs scales); transformers 5's "
        "QuantizedCache 'fp8' backend keeps one e4m3 scale per tensor, kvviz one per block of 32"
    )
    source_urls: ClassVar[tuple[str, ...]] = (
        "https://github.com/vllm-project/vllm/pull/3290",
        "https://github.com/vllm-project/vllm/pull/2279",
    )
    format: str = "fp8"


@register
@dataclass(frozen=True)
class KIVI(Quantized):
    name: ClassVar[str] = "kivi"
    title: ClassVar[str] = "KIVI: keys per channel, values per token"
    description: ClassVar[str] = (
        "Asymmetric 4-bit quantisation (min/max with a zero point) in groups of 32: keys per channel over 32 "
        "tokens (key outliers live in fixed channels), values per token; the newest keys stay in full precision "
        "until a block of 32 fills."
    )
    corrupts: ClassVar[str] = "every value row, and every key row older than the newest partial block of 32"
    symptom: ClassVar[str] = (
        "the newest key rows are exact, older ones change in blocks of 32 rows; values differ at once"
    )
    source: ClassVar[str] = (
        "Liu et al., 'KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache', ICML 2024, "
        "arXiv:2402.02750 (code jy-yuan/KIVI; 2 bits in the paper, 4 here)"
    )
    source_urls: ClassVar[tuple[str, ...]] = ("https://arxiv.org/abs/2402.02750",)
    bits: int = 4
    keys: str = "channel"
    zero_point: bool = True
