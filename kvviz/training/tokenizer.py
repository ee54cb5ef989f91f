"""Train the bundled model's byte-level BPE tokenizer with Hugging Face ``tokenizers``.

Byte-level BPE as in GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", section 2.2): text is first mapped to bytes, so every string is encodable with no
unknown token, and the ``ByteLevel`` decoder maps the bytes back, so ``decode(encode(s)) == s``
including spaces and newlines. Trained on the *training* split only.

Special tokens:

* ``<|endoftext|>`` (id 0): end of sequence; also used as the pad token.
* ``<|bos|>`` (id 1): beginning of sequence. The tokenizer adds it in front of every text
  (``add_bos_token=True``, written into ``tokenizer.json`` as a post-processor), as Llama's
  does, and every training sequence starts with it (see ``train.py``): position 0 is always
  BOS, the usual home of an attention sink. Pass ``add_special_tokens=False`` for raw tokens.

Saved with ``PreTrainedTokenizerFast.save_pretrained`` so that
``AutoTokenizer.from_pretrained(dir)`` loads it (``tokenizer.json`` + ``tokenizer_config.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"


def train_tokenizer(paragraphs: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``vocab_size`` entries (special tokens included)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the first word of a prompt is encoded as typed, which is what
    # a reader of the kvviz token strip expects (no invisible leading space).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],
        # all 256 byte symbols, so that characters absent from Austen still encode
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # paragraphs are lines; train on "paragraph\n" so that the newline merges are learned too
    tok.train_from_iterator((p + "\n" for p in paragraphs), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
