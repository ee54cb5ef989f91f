"""Choosing the next token: greedy, or sampling with transformers' own logits warpers.

The generator is per session (seeded), never torch's global RNG: two sessions sampling at the
same time must not change each other's draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Greedy when `greedy` (the default) or temperature == 0."""

    greedy: bool = True
    temperature: float = 1.0  # > 0; divides the logits
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set with this much probability; 1.0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["greedy"] = self.is_greedy
        return d

    def processors(self) -> LogitsProcessorList:
        """The same warpers `generate(do_sample=True, ...)` would build, in its order."""
        procs = LogitsProcessorList()
        if self.is_greedy:
            return procs
        if self.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k > 0:
            procs.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=self.top_p))
        return procs


def new_generator(sampling: Sampling) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(sampling.seed)
    return g


def choose(
    logits: torch.Tensor, input_ids: torch.Tensor, sampling: Sampling, generator: torch.Generator
) -> int:
    """Pick the next token from the last position's logits (vocab,) given the ids so far (1, seq)."""
    if sampling.is_greedy:
        return int(torch.argmax(logits).item())
    scores = sampling.processors()(input_ids, logits[None, :].float())  # (1, vocab)
    probs = torch.softmax(scores, dim=-1).cpu()
    return int(torch.multinomial(probs[0], 1, generator=generator).item())
