#!/usr/bin/env python3
"""Bounds on the prefix-cache hit rate any router can reach on a Mooncake trace prefix.

usage: ideal_hit_rate.py TRACE N BLOCK_TOKENS CAPACITY_TOKENS

Walks the first N requests in order. Mooncake hash ids are prefix hashes of BLOCK_TOKENS-token
blocks (512 in the trace; fewer after `gantry bench replay --token-scale`), so a request's hit
is its leading run of ids already cached, token-weighted as the engines count it:
min(hit_blocks * BLOCK_TOKENS, input_tokens) / input_tokens, summed over requests.

- infinite: every id ever seen stays cached. No router on any capacity does better (strict bound).
- pooled_lru: one LRU cache holding CAPACITY_TOKENS (the whole fleet's KV) with perfect affinity:
  what an ideal router achieves when the fleet's caches act as one (an estimate: LRU is not the
  optimal replacement policy, and real engines also hold each running request's blocks).

light_load_prefill_ms: the TTFT floor of an idle engine, the mock's default prefill polynomial
(benches/src/mock/timing.rs) of each request's uncached tokens, p50 and mean, with no cache, the
pooled-LRU hits and the infinite-cache hits. Their ratios bound what any router can gain on TTFT
before queueing sets in.
"""
import json
import statistics
import sys
from collections import OrderedDict

# The mock's default prefill polynomial, ms of N uncached tokens (benches/src/mock/timing.rs).
PREFILL_MS = (4.209989e-7, 0.01518344, 16.50142)


def prefill_ms(tokens):
    a, b, c = PREFILL_MS
    return a * tokens * tokens + b * tokens + c


def floor(ms):
    return {"p50": statistics.median(ms), "mean": statistics.fmean(ms)}


def main():
    trace, n, block_tokens, capacity_tokens = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    scale = block_tokens / 512.0
    reqs = []
    with open(trace) as f:
        for line in f:
            if len(reqs) == n:
                break
            reqs.append(json.loads(line))
    cap_blocks = max(1, int(capacity_tokens // block_tokens))
    seen = set()
    lru = OrderedDict()
    inf_hit = lru_hit = total = 0.0
    ttft = {"no_cache": [], "pooled_lru": [], "infinite": []}
    for r in reqs:
        ids = r["hash_ids"]
        isl = r["input_length"] * scale
        total += isl
        k = 0
        while k < len(ids) and ids[k] in seen:
            k += 1
        inf_hit += min(k * block_tokens, isl)
        ttft["infinite"].append(prefill_ms(isl - min(k * block_tokens, isl)))
        ttft["no_cache"].append(prefill_ms(isl))
        seen.update(ids)
        k = 0
        while k < len(ids) and ids[k] in lru:
            k += 1
        lru_hit += min(k * block_tokens, isl)
        ttft["pooled_lru"].append(prefill_ms(isl - min(k * block_tokens, isl)))
        for h in ids:
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > cap_blocks:
            lru.popitem(last=False)
    json.dump(
        {
            "requests": len(reqs),
            "block_tokens": block_tokens,
            "capacity_tokens": capacity_tokens,
            "infinite": inf_hit / total,
            "pooled_lru": lru_hit / total,
            "light_load_prefill_ms": {k: floor(v) for k, v in ttft.items()},
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
