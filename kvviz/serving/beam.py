"""Beam search on one cache: the prompt prefilled once, its rows shared by every beam, and the
cache's rows reordered by beam index at every step.

    prefill            the prompt once (batch 1), then `batch_repeat_interleave(num_beams)`: every
                       beam slot starts from the same prompt rows (DynamicCache copies them)
    each step          score every (slot, next token) by cumulative log-probability, keep the best;
                       slot b of the next step continues slot beam_idx[b]'s text, so
                       `reorder_cache(beam_idx)` copies that slot's rows into slot b; then one
                       forward appends each slot's new token row

The selection follows transformers 5.23's `GenerationMixin._beam_search` for one sequence (its
helpers `_get_top_k_continuations`, `_get_running_beams_for_next_iteration`,
`_update_finished_beams`, `_check_early_stop_heuristic`): top 2 x num_beams continuations (more
with several end-of-text ids); a continuation that ends (end-of-text, or the length limit) becomes
a finished hypothesis if it ranks in the top num_beams, scored sum(log p) / length ** length_penalty;
the search stops when no running beam can beat the worst kept hypothesis. So the best hypothesis
equals `model.generate(num_beams=n, do_sample=False, max_new_tokens=...)`'s sequence. The one
difference is the prefill: generate prefills num_beams copies of the prompt; here it runs once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvviz.engine.cache import KVVizCache
from kvviz.engine.models import LoadedModel
from kvviz.engine.session import InputError, Limits, check_steps, encode_prompt
from kvviz.serving.common import forward, new_cache, token_texts
from kvviz.serving.defaults import MAX_BEAMS
from kvviz.serving.hooks import EXACT, ServingHooks
from kvviz.serving.records import BeamCandidate, BeamHypothesis, BeamRun, BeamStep

NEG = -1.0e9  # transformers' "never" score


def generation_eos(lm: LoadedModel) -> list[int]:
    """The end-of-text ids `generate` stops beams at: the generation config's (not the tokenizer's)."""
    eos = getattr(lm.model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def beam_search(lm: LoadedModel, prompt: str | Sequence[int], num_beams: int = 3, steps: int = 16, *,
                hooks: ServingHooks = EXACT, limits: Limits | None = None) -> BeamRun:
    """Beam search over `steps` new tokens with `num_beams` beams; the record of every reorder."""
    if not 1 <= num_beams <= MAX_BEAMS:
        raise InputError(f"beams must be between 1 and {MAX_BEAMS}, got {num_beams}")
    prompt_ids = list(prompt) if not isinstance(prompt, str) else encode_prompt(lm, prompt, limits)
    check_steps(lm, len(prompt_ids), steps, limits)
    cfg = lm.model.generation_config
    length_penalty = 1.0 if cfg.length_penalty is None else float(cfg.length_penalty)
    early_stopping = cfg.early_stopping
    eos = torch.tensor(generation_eos(lm), dtype=torch.long)
    n, p = num_beams, len(prompt_ids)
    max_length = p + steps
    keep = max(2, 1 + len(eos)) * n  # continuations considered per step
    in_top_n = torch.arange(keep) < n

    # running beams (n slots) and finished hypotheses (n best so far), as in transformers
    running = torch.full((n, max_length), -1, dtype=torch.long)
    running[:, :p] = torch.tensor(prompt_ids)
    running_scores = torch.full((n,), NEG)
    running_scores[0] = 0.0  # only slot 0 is live at the start: the slots hold the same prompt
    running_parents = torch.full((n, steps), -1, dtype=torch.long)
    done_seqs, done_parents = running.clone(), running_parents.clone()
    done_scores = torch.full((n,), NEG)
    done_flags = torch.zeros(n, dtype=torch.bool)
    improvable = True

    cache = new_cache(lm)
    logits = forward(lm, cache, prompt_ids)[:, -1]  # (1, vocab): the prompt, prefilled once
    cache.batch_repeat_interleave(n)  # every slot gets the prompt's rows
    logits = logits.expand(n, -1)  # (n, vocab)
    records: list[BeamStep] = []
    cur = p
    while True:
        vocab = logits.shape[-1]
        scores = (torch.log_softmax(logits, dim=-1) + running_scores[:, None]).reshape(-1)  # (n * vocab,)
        top_scores, top_idx = torch.topk(scores, keep)
        parent, token = top_idx // vocab, top_idx % vocab  # (keep,)
        cand_seqs = running[parent].clone()
        cand_seqs[:, cur] = token
        cand_parents = running_parents[parent].clone()
        cand_parents[:, cur - p] = parent
        ends = torch.isin(token, eos) | (cur + 1 >= max_length)  # (keep,) the stopping criteria

        # the best num_beams continuations that go on become the next running beams
        live_scores = top_scores + ends.float() * NEG
        nxt = torch.topk(live_scores, n).indices
        running, running_scores, running_parents = cand_seqs[nxt], live_scores[nxt], cand_parents[nxt]

        # continuations that end and rank in the top num_beams compete for the finished set
        fin_scores = top_scores / float(cur + 1 - p) ** length_penalty
        if bool(done_flags.all()) and early_stopping is True:
            fin_scores = fin_scores + NEG
        if not improvable:
            fin_scores = fin_scores + NEG
        fin_scores = fin_scores + (~(ends & in_top_n)).float() * NEG
        merged = torch.topk(torch.cat([done_scores, fin_scores]), n).indices
        done_seqs = torch.cat([done_seqs, cand_seqs])[merged]
        done_scores = torch.cat([done_scores, fin_scores])[merged]
        done_parents = torch.cat([done_parents, cand_parents])[merged]
        done_flags = torch.cat([done_flags, ends & in_top_n])[merged]

        beam_idx = running_parents[:, cur - p]  # (n,) slot b continues slot beam_idx[b]
        hooks.reorder(cache, beam_idx)
        records.append(_step_record(len(records) + 1, beam_idx, running[:, cur], running_scores, parent, token,
                                    top_scores, ends, in_top_n, nxt, cache))
        cur += 1
        improvable = improvable and _can_improve(running_scores, done_scores, done_flags, cur - p, length_penalty,
                                                 early_stopping, max_length - p)
        if not improvable or (bool(done_flags.all()) and early_stopping is True) or bool(ends.all()):
            break
        logits = forward(lm, cache, running[:, cur - 1:cur])[:, -1]  # (n, vocab): one new row per slot

    beams = []
    for seq, score, parents in zip(done_seqs, done_scores, done_parents):
        length = int((parents >= 0).sum())
        beams.append(BeamHypothesis(tuple(int(t) for t in seq[p:p + length]), float(score),
                                    tuple(int(x) for x in parents[:length])))
    cache_bytes = cache.nbytes()
    rows = n * cache.get_seq_length()
    return BeamRun(
        prompt_ids=tuple(prompt_ids), token_text=token_texts(lm, [*prompt_ids, *(t for r in records for t in r.tokens),
                                                                 *(t for b in beams for t in b.ids)]),
        num_beams=n, max_new_tokens=steps, length_penalty=length_penalty, steps=tuple(records), beams=tuple(beams),
        cache_bytes=cache_bytes, bytes_per_row=cache_bytes // rows if rows else 0,
    )


def _can_improve(running_scores: torch.Tensor, done_scores: torch.Tensor, done_flags: torch.Tensor, generated: int,
                 length_penalty: float, early_stopping: bool | str, max_new: int) -> bool:
    """transformers' heuristic: can the best running beam still beat the worst kept hypothesis?"""
    length = max_new if early_stopping == "never" and length_penalty > 0.0 else generated
    best_possible = float(running_scores[0]) / float(length) ** length_penalty
    worst = torch.where(done_flags, done_scores.min(), torch.tensor(NEG))
    return bool((best_possible > worst).any())


def _step_record(step: int, beam_idx: torch.Tensor, tokens: torch.Tensor, scores: torch.Tensor, parent: torch.Tensor,
                 token: torch.Tensor, top_scores: torch.Tensor, ends: torch.Tensor, in_top_n: torch.Tensor,
                 nxt: torch.Tensor, cache: KVVizCache) -> BeamStep:
    slot_of = {int(c): s for s, c in enumerate(nxt.tolist())}
    candidates = []
    for c in range(len(token)):
        if c in slot_of:
            fate, slot = "running", slot_of[c]
        elif bool(ends[c]) and bool(in_top_n[c]):
            fate, slot = "finished", -1
        else:
            fate, slot = "dropped", -1
        candidates.append(BeamCandidate(int(parent[c]), int(token[c]), float(top_scores[c]), fate, slot))
    kv = cache.layer_kv(0)
    shape = (0, 0) if kv is None else (int(kv[0].shape[0]), int(kv[0].shape[-2]))
    return BeamStep(step, tuple(int(b) for b in beam_idx), tuple(int(t) for t in tokens),
                    tuple(float(s) for s in scores), tuple(candidates), shape)
