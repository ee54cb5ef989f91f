"""What caching costs and saves, for serving.

    memory.py   KV bytes per token, sequence and batch for any config; presets, uploads, the hub
    cost.py     cache vs recompute, timed and counted live on the loaded model; prefill vs decode
    paged.py    a serving cache simulated three ways: contiguous, paged, paged with prefix sharing
"""
