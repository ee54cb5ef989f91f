"""Serving operations on the real cache: what an inference server does to a KV cache between
and across requests, done with transformers' own Cache operations on kvviz's `KVVizCache`.

    records.py      what each run recorded: frozen dataclasses of ids, numbers and numpy arrays (no torch)
    hooks.py        the three places a serving stack can get the cache wrong (exact by default)
    common.py       one forward, greedy decoding, timing: the pieces the three operations share
    reuse.py        a per-session prefix store (block-hashed, as vLLM's prefix caching) and chat turns
    speculative.py  prompt-lookup drafting, one verifying forward, rejected rows cropped
    beam.py         beam search sharing the prompt's cache, rows reordered by beam index each step

Every cache operation is transformers' (`crop`, `reorder_cache`, `batch_repeat_interleave`,
`update`); only `kvviz.engine.cache` touches cache internals. Everything per visitor (the prefix
store, a conversation's cache) is an object the caller owns: nothing is kept in module globals.
Importing this package, or `records`, does not import torch.
"""
