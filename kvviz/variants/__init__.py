"""Caches that differ from the exact one, and the evidence that tells them apart.

    registry.py      the one registry of variants, each with a kind: bug, eviction, quantization
    bugs.py          caches broken by accident (each modelled on a real project's bug)
    eviction.py      policies that keep only some rows: sliding window, StreamingLLM, H2O, TOVA
    quantization.py  caches stored in fewer bits: int8, int4, fp8 e4m3, KIVI's per-channel keys
    evidence.py      exact vs variant, numpy only: diffs, KL, divergence, status codes (figures import it)
    explain.py       the written diagnosis: one small detector per clue
    diagnose.py      run the exact and the variant cache on the same tokens and explain where they part
    paired.py        the exact and a variant cache stepped together, one token at a time (the Cache control)
    quality.py       teacher-forced quality against memory: perplexity, KL, top-1, cache bytes

This package's __init__ imports nothing, so `kvviz.variants.evidence` loads without torch.
"""
