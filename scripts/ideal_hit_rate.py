#!/usr/bin/env python3
"""Bounds on the prefix-cache hit rate any router can reach on a Mooncake trace prefix.

usage: ideal_hit_rate.py TRACE N BLOCK_TOKENS CAPACITY_TOKENS [NAME=REQUESTS_JSONL ...]

Walks the first N requests in order. Mooncake hash ids are prefix hashes of BLOCK_TOKENS-token
blocks (512 in the trace; fewer after `gantry bench replay --token-scale`), so a request's hit
is its leading run of ids already cached, token-weighted as the engines count it:
min(hit_blocks * BLOCK_TOKENS, input_tokens) / input_tokens, summed over requests.

- infinite: every id ever seen stays cached. No router on any capacity does better (strict bound).
- pooled_lru: one LRU cache holding CAPACITY_TOKENS (the whole fleet's KV) with perfect affinity:
  what an ideal router achieves when the fleet's caches act as one (an estimate: LRU is not the
  optimal replacement policy, and real engines also hold each running request's blocks).
- pooled_lru_under_load (one per NAME=REQUESTS_JSONL, the `requests.jsonl` of a `gantry bench
  replay` of the same requests): the pooled LRU again, but the blocks of every request that is
  decoding at that moment of that run (from its first token to its end) stay in memory and cannot
  be evicted, so what the cache can keep shrinks with the load, as it does on the engines. Still
  generous: a request is taken to hold nothing while it waits or prefills, its output tokens'
  blocks are not counted, and held blocks beyond the capacity are kept. Over the run's requests
  that completed with a first token (null when none did).

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


def pooled_lru_under_load(reqs, runs, block_tokens, cap_blocks, scale):
    """The pooled LRU with decoding requests' blocks pinned, over the run's timings `runs`
    (workload index -> (start, first token, end) in ms; requests that failed are left out)."""
    lru = OrderedDict()
    pins = {}
    hit = total = 0.0
    # Requests in the order the run sent them; pin intervals [first token, end).
    order = sorted(runs, key=lambda i: runs[i][0])
    # (time, 0: pin | 1: unpin, request): at equal times a pin comes before its unpin.
    events = sorted((t, kind, i) for i in order for t, kind in ((runs[i][1], 0), (runs[i][2], 1)))
    e = 0
    for i in order:
        start = runs[i][0]
        while e < len(events) and events[e][0] <= start:
            _, kind, j = events[e]
            e += 1
            for h in reqs[j]["hash_ids"]:
                if kind == 0:
                    pins[h] = pins.get(h, 0) + 1
                    lru[h] = None  # a decoding request's blocks are in memory
                    lru.move_to_end(h)
                else:
                    pins[h] -= 1
                    if pins[h] == 0:
                        del pins[h]
        ids = reqs[i]["hash_ids"]
        isl = reqs[i]["input_length"] * scale
        total += isl
        k = 0
        while k < len(ids) and ids[k] in lru:
            k += 1
        hit += min(k * block_tokens, isl)
        for h in ids:
            lru[h] = None
            lru.move_to_end(h)
        # Evict the least recently used blocks that no decoding request holds.
        if len(lru) > cap_blocks:
            for h in [h for h in lru if h not in pins][: len(lru) - cap_blocks]:
                del lru[h]
    return hit / total if total else None


def read_runs(path):
    runs = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("error") is None and r.get("ttft_ms") is not None:
                runs[r["index"]] = (r["start_ms"], r["start_ms"] + r["ttft_ms"], r["end_ms"])
    return runs


def main():
    trace, n, block_tokens, capacity_tokens = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    runs = dict(a.split("=", 1) for a in sys.argv[5:])
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
            "pooled_lru_under_load": {
                name: pooled_lru_under_load(reqs, read_runs(path), block_tokens, cap_blocks, scale)
                for name, path in runs.items()
            },
            "light_load_prefill_ms": {k: floor(v) for k, v in ttft.items()},
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
