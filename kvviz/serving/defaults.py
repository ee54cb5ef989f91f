"""The serving operations' defaults and bounds, importable without torch (CLI parsers, pages)."""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = 8  # tokens per prefix block; vLLM uses 16, the bundled model's prompts are short
BLOCK_SIZES = (4, 8, 16, 32)
DEFAULT_MAX_BLOCKS = 512  # per prefix store (per browser session): the least recently used go first
DEFAULT_DRAFT_TOKENS = 4  # k, the most tokens prompt lookup proposes per step
DEFAULT_MAX_NGRAM = 2  # transformers' default for prompt lookup
MAX_DRAFT_TOKENS = 16
MAX_BEAMS = 8
