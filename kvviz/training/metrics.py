"""Held-out bits per character: the tokenizer-independent quality number of the bundled model.

bits/char = (total negative log-likelihood, in nats, of every validation token)
            / ln 2 / (number of characters of the validation text).
Dividing by characters rather than tokens makes models with different tokenizers comparable
(as in the byte/char-level literature, e.g. Graves 2013, "Generating Sequences With RNNs").

Each novel's validation text (its held-out paragraphs joined by newlines) is encoded as
``[<|bos|>] + tokens``, so every token of the text, the first included, is predicted and every
character is paid for. Texts longer than the context are scored with a sliding window (as in
the Hugging Face "Perplexity of fixed-length models" guide): windows of ``context`` tokens
advancing by ``stride``, each scoring only the tokens the previous window did not, so every
token after the first window is predicted from at least ``context - stride`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def token_nll(
    model: PreTrainedModel,
    ids: Sequence[int],
    context: int = 256,
    stride: int = 128,
    device: str | torch.device = "cpu",
    max_tokens: int | None = None,
) -> tuple[float, int]:
    """Sum of NLL (nats) of ``ids[1:]`` given their prefixes, with a sliding window.

    Args:
        ids: token ids of one text, ``ids[0]`` being the BOS (it is conditioned on, not scored).
        context: window length in tokens (the model's training sequence length is a good choice).
        stride: how far each window advances; ``context - stride`` is the minimum left context.
        max_tokens: score only the first ``max_tokens`` targets (a quick estimate in training).
    Returns:
        ``(sum of NLL in nats, number of scored tokens)``.
    """
    was_training = model.training
    model.eval()
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    n_targets = len(ids_t) - 1 if max_tokens is None else min(max_tokens, len(ids_t) - 1)
    total, scored = 0.0, 0
    # `scored` targets done so far are ids[1 : scored + 1]; each window ends at a new target
    while scored < n_targets:
        end = min(scored + 1 + stride if scored else context, n_targets + 1)  # exclusive, in ids
        start = max(0, end - context)
        window = ids_t[start:end].unsqueeze(0).to(device)  # (1, T)
        logits = model(input_ids=window).logits.float()  # (1, T, vocab)
        logp = F.log_softmax(logits[0, :-1], dim=-1)  # (T-1, vocab): predictions of window[1:]
        targets = window[0, 1:]  # (T-1,)
        nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (T-1,)
        new = end - 1 - scored  # targets in this window not scored by an earlier one
        total += nll[-new:].sum().item()
        scored += new
    model.train(was_training)
    return total, scored


def bits_per_char(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    context: int = 256,
    stride: int = 128,
    device: str | torch.device = "cpu",
) -> dict:
    """Bits per character of ``texts`` (each scored independently, starting from BOS).

    Returns a dict with ``bits_per_char``, ``nats_per_token``, ``tokens``, ``chars`` (all texts
    together) and ``bits_per_char_by_text`` (one number per text, same order).
    """
    total_nll, total_tokens, total_chars, by_text = 0.0, 0, 0, []
    for text in texts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]]
        nll, n = token_nll(model, ids, context=context, stride=stride, device=device)
        total_nll += nll
        total_tokens += n
        total_chars += len(text)
        by_text.append(nll / math.log(2) / len(text))
    return {
        "bits_per_char": total_nll / math.log(2) / total_chars,
        "nats_per_token": total_nll / total_tokens,
        "tokens": total_tokens,
        "chars": total_chars,
        "context": context,
        "stride": stride,
        "bits_per_char_by_text": by_text,
    }


def distinct_ngrams(ids: Sequence[int], n: int = 4) -> dict:
    """How much a generated token sequence repeats itself: its distinct ``n``-grams of token ids.

    ``ratio`` = distinct / total ``n``-grams (1.0: no ``n``-gram twice; a greedy loop drives it
    down), the "distinct-n" of Li et al. 2016 ("A Diversity-Promoting Objective Function for
    Neural Conversation Models") computed on token ids.
    """
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    distinct = len(set(grams))
    return {"n": n, "tokens": len(ids), "distinct": distinct, "total": len(grams), "ratio": distinct / max(1, len(grams))}
