"""Run the exact and a variant cache on the same tokens, and say where and how they part.

Three runs of the same prompt and sampling:
- exact:    the correct cache, free-running (its tokens are the reference text);
- variant:  the variant cache *teacher-forced* on the exact run's tokens (`paired.PairedSession`), so
            every difference in logits, K/V rows and attention is the variant's own;
- free:     the variant left to choose its own tokens: the text a user would actually see.

The evidence is measured in `evidence.py` (numpy only) and written up by the detectors of
`explain.py`; this module runs the model and puts the two together as a `Diagnosis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvviz.engine.models import LoadedModel
from kvviz.engine.sampling import Sampling
from kvviz.engine.session import Limits, Session
from kvviz.engine.variant import CacheVariant
from kvviz.variants import evidence
from kvviz.variants.evidence import STATUS_NAMES, Evidence, Run
from kvviz.variants.explain import Finding, explain, write
from kvviz.variants.paired import PairedSession, variant_reports
from kvviz.variants.registry import Variant, get_variant

DEFAULT_STEPS = 12  # enough decode steps for every catalogued bug to show on the bundled model

__all__ = ["DEFAULT_STEPS", "Diagnosis", "Finding", "Run", "diagnose", "run", "run_clean"]


@dataclass(frozen=True)
class Diagnosis(Evidence):
    """The evidence plus what it says: the findings of every detector and the written diagnosis."""

    findings: tuple[Finding, ...] = ()
    text: str = ""

    def clue_text(self) -> str:
        """The finding that identifies the variant (what Mystery mode's reveal quotes)."""
        for f in self.findings:
            if f.kind == self.clue:
                return f.text
        return self.findings[0].text if self.findings else self.text

    def to_dict(self) -> dict[str, Any]:
        ct, bt = self.clean.trace, self.buggy.trace
        tok = self.first_divergent_token_step
        steps = []
        for i in range(self.steps):
            counts: dict[str, int] = {name: 0 for name in STATUS_NAMES}
            for d in self.kv[i]:
                for name, c in d.counts().items():
                    counts[name] += c
            steps.append({
                "step": i,
                "clean_token": ct.steps[i].token,
                "buggy_token": bt.steps[i].token,
                "max_abs_logit_diff": float(self.max_abs_logit_diff[i]),
                "kl": float(self.kl[i]),
                "top1_agree": bool(self.top1_agree[i]),
                "clean_cache_len": ct.steps[i].cache_len,
                "buggy_cache_len": bt.steps[i].cache_len,
                "buggy_attended_len": [d.buggy_len for d in self.kv[i]],
                "kv_rows": counts,
                "attention_max_diff": [float(x) for x in self.attention[i]],
            })
        return {
            "bug": self.bug,
            "title": self.title,
            "kind": self.kind,
            "model": ct.model.name,
            "prompt": ct.prompt,
            "layers": None if self.scope_layers is None else list(self.scope_layers),
            "start_step": self.start_step,
            "detected": self.detected,
            "tolerance": self.tolerance.to_dict(),
            "first_divergence_step": self.first_divergence_step,
            "first_divergent_token_step": tok,
            "first_divergent_token": None if tok is None else {
                "clean": ct.steps[tok].token, "buggy": bt.steps[tok].token,
            },
            "first_divergent_layer": self.first_divergent_layer,
            "first_attention_layer": self.first_attention_layer,
            "max_abs_logit_diff": float(self.max_abs_logit_diff.max()),
            "max_kl": float(self.kl.max()),
            "top1_agree": float(self.top1_agree.mean()),
            "clean_text": ct.generated_text,
            "buggy_text": None if self.free is None else self.free.generated_text,
            "diagnosis": self.text,
            "findings": [{"kind": f.kind, "text": f.text} for f in self.findings],
            "steps": steps,
        }


def run(lm: LoadedModel, prompt: str, steps: int = DEFAULT_STEPS, *, bug: str | CacheVariant | None = None,
        sampling: Sampling | None = None, forced_ids: Sequence[int] | None = None, limits: Limits | None = None,
        reports: list[tuple[dict[str, Any], ...]] | None = None) -> Run:
    """One recorded run (no parity recompute) that also keeps each step's full logits.

    With `forced_ids` the run is teacher-forced: it feeds those tokens (one per step) whatever it chose.
    `reports`, if given, receives the variant's account of each layer after every step."""
    n = steps if forced_ids is None else len(forced_ids)
    session = Session(lm, prompt, n, bug=get_variant(bug), sampling=sampling, parity=False, limits=limits,
                      stop_at_eos=False, forced_ids=forced_ids, keep_logits=True)
    while not session.done:
        session.step()
        if reports is not None:
            reports.append(variant_reports(session))
    trace = session.trace()
    return Run(trace=trace, logits=np.stack([s.logits for s in trace.steps]))


def run_clean(lm: LoadedModel, prompt: str, steps: int = DEFAULT_STEPS, sampling: Sampling | None = None,
              limits: Limits | None = None) -> Run:
    """The reference run (reusable across many diagnoses of the same prompt)."""
    return run(lm, prompt, steps, sampling=sampling, limits=limits)


def resolve(lm: LoadedModel, bug: str | CacheVariant | None, layers: list[int] | None = None, start_step: int = 0,
            **params: Any) -> CacheVariant | None:
    """The variant to run: looked up by name with `params`, checked against the model, scoped.

    Raises ValueError for an unknown name or parameter, a layer the model lacks, a scope the variant
    cannot honour (it says why) or a variant that cannot act on this model."""
    instance = get_variant(bug, **params) if isinstance(bug, str) or bug is None else bug
    n_layers = lm.info.num_layers
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}")
    if start_step < 0:
        raise ValueError(f"start step must be >= 0, got {start_step}")
    if isinstance(instance, Variant):
        problem = instance.problem(lm.info)
        if problem and type(instance).kind != "bug":  # a bug that cannot act is shown to do nothing
            raise ValueError(f"{instance.name} cannot run on {lm.info.name}: {problem}")
    if instance is not None and (layers is not None or start_step):
        instance = instance.scoped(layers, start_step)
    return instance


def diagnose(
    lm: LoadedModel,
    bug: str | CacheVariant | None,
    prompt: str,
    steps: int = DEFAULT_STEPS,
    *,
    layers: list[int] | None = None,
    start_step: int = 0,
    sampling: Sampling | None = None,
    clean: Run | None = None,
    free_run: bool = True,
    limits: Limits | None = None,
    **params: Any,
) -> Diagnosis:
    """Run the exact and the variant cache side by side and say where and how they part.

    `bug` is a registry name ("none" = the exact cache) with `params` (e.g. budget=16), or an instance;
    `layers`/`start_step` scope it. Pass `clean` (from `run_clean` with the same prompt/steps/sampling)
    to reuse a reference run. Raises ValueError for bad names, parameters, layers or scopes.
    """
    instance = resolve(lm, bug, layers, start_step, **params)
    reports: list[tuple[dict[str, Any], ...]] = []
    if clean is None:
        paired = PairedSession(lm, prompt, steps, instance, sampling=sampling, limits=limits, stop_at_eos=False)
        paired.run()
        clean, buggy = paired.runs()
        reports = [s.reports for s in paired.steps]
    else:
        forced = list(clean.trace.generated_ids)
        buggy = run(lm, prompt, bug=instance, sampling=sampling, forced_ids=forced, limits=limits, reports=reports)
    free = run(lm, prompt, len(clean.trace.steps), bug=instance, sampling=sampling, limits=limits).trace if free_run else None
    cls = type(instance) if isinstance(instance, Variant) else None
    e = evidence.compare(
        clean, buggy, free, bug="none" if instance is None else instance.name,
        title="Correct cache" if cls is None else cls.title, kind="none" if cls is None else cls.kind,
        clue="" if cls is None else cls.clue, scope_layers=None if layers is None else tuple(layers),
        start_step=start_step, reports=tuple(reports),
    )
    findings = explain(e)
    return Diagnosis(**{f: getattr(e, f) for f in e.__dataclass_fields__}, findings=findings, text=write(e, findings))
