"""The serving operations' defaults and bounds, importable without torch (CLI parsers, pages)."""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = 8  # tokens per prefix block; vLLM uses 16, the bundled model's prompts are short
BLOCK_SIZES = (4, 8, 16, 32)
DEFAULT_MAX_BLOCKS = 512  # per prefix store (per browser session): the least recently used go first
DEFAULT_DRAFT_TOKENS = 4  # k, the most tokens prompt lookup proposes per step
DEFAULT_MAX_NGRAM = 2  # transformers' default for prompt lookup
MAX_DRAFT_TOKENS = 16
MAX_BEAMS = 8

# The demo texts (page and README): two requests sharing a "system prompt", a two-turn chat, and a
# prompt that repeats itself (prompt lookup drafts from repeats). Austen, for the bundled model.
SYSTEM_PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife.")
REQUESTS = (SYSTEM_PROMPT + " Mr. Bennet said", SYSTEM_PROMPT + " Elizabeth replied")
NEXT_REQUEST = SYSTEM_PROMPT + " Mr. Darcy"  # what the page offers to send next
CHAT_TURNS = ("Elizabeth walked to Netherfield in the rain, and", " When she arrived, Mr. Darcy")
SPECULATE_PROMPT = ('Elizabeth said to her sister, "I am very glad to see you." '
                    'Her sister said to Elizabeth, "I am very')
