"""The real model and its exact cache: load, capture, cache, decode, record.

    models.py    load a causal LM (bundled, local dir, hub id); device and dtype; refusals
    capture.py   the registered attention function and the per-call recorder (ContextVar)
    cache.py     KVVizCache, the only code touching transformers' cache internals; its bytes
    sampling.py  greedy, or transformers' warpers with a per-session generator
    session.py   the decode loop: prefill, one step at a time, parity, limits
    trace.py     what a run recorded: frozen dataclasses of numpy arrays (no torch)
    timing.py    wall-clock timing that waits for the device
    variant.py   the interface of a cache that differs from the exact one (the catalogue: kvviz.variants)

Importing this package imports nothing heavy: `kvviz.engine.trace` is usable without torch.
"""

# The bundled model's demo prompt (the first line of Pride and Prejudice): pages and CLI start here.
DEFAULT_PROMPT = "It is a truth universally acknowledged, that"
