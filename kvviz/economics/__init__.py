"""What caching costs and saves, for serving.

    memory.py   KV bytes per token, sequence and batch for any config; presets, uploads, the hub
    cost.py     cache vs recompute, timed and counted live on the loaded model; prefill vs decode
    paged.py    a serving engine's scheduler under a request stream: admission, preemption (recompute or
                swap), chunked prefill, time to first token; the serving incidents as scenarios
    blocks.py   its memory: contiguous reservations or paged blocks with prefix sharing, block by block
"""
