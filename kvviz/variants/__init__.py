"""Caches that differ from the exact one, and the evidence that tells them apart.

    bugs.py       the catalogue of injected cache bugs (one registry)
    diagnose.py   run the exact and the variant cache on the same tokens; where and how they part
"""
