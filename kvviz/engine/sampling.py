"""Choosing the next token: greedy, or sampling with transformers' own logits warpers.

The generator is per session (seeded), never torch's global RNG: two sessions sampling at the
same time must not change each other's draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from kvviz.validate import InputError, real_number, whole_number

# Below this a temperature overflows float32 (logits / 1e-45 = inf, then softmax gives NaN); it is
# greedy in all but name anyway. Above the maximum every token is equally likely to many digits.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Greedy when `greedy` (the default) or temperature == 0."""

    greedy: bool = True
    temperature: float = 1.0  # > 0; divides the logits
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set with this much probability; 1.0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        """Every field checked (InputError): nan, 1e-45, True or '0.9' would otherwise mean something else."""
        if not isinstance(self.greedy, bool):
            raise InputError(f"greedy must be True or False, got {type(self.greedy).__name__}")
        t = real_number(self.temperature, "temperature", 0.0, MAX_TEMPERATURE)
        if 0 < t < MIN_TEMPERATURE:
            raise InputError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t:g}")
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_k", whole_number(self.top_k, "top_k (0 = off)", 0, 1_000_000))
        object.__setattr__(self, "top_p", real_number(self.top_p, "top_p", 0.0, 1.0, lo_open=True))
        object.__setattr__(self, "seed", whole_number(self.seed, "seed", 0, 2**63 - 1))

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
    if not bool(torch.isfinite(probs).all()):  # guarded by Session's check of the logits; never multinomial's error
        raise InputError("the next-token probabilities are not finite numbers (NaN or infinity): nothing to sample")
    return int(torch.multinomial(probs[0], 1, generator=generator).item())
