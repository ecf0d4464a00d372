//! The `kv` policy's cost: one number per engine, in KV blocks, from how much of the prompt the
//! engine already holds and how loaded it is. The lowest cost wins.
//!
//! ```text
//! uncached  = max(prompt_blocks − overlap, 0)
//! prefill   = pending_prefill_tokens / block_size + uncached_weight·uncached
//! decode    = active_blocks + uncached       (its requests' blocks, plus the blocks this prompt
//!                                              adds: a shared prefix is counted once)
//! pressure  = waiting · prompt_blocks            (engine-reported queue: each waiting request is
//!                                                  taken to cost about as much prefill as this one)
//!           + kv_usage · prompt_blocks           (engine-reported cache use, 0..1: a full cache
//!                                                  evicts, so its overlap is worth less)
//! cost      = prefill_weight·prefill + decode_weight·decode
//!           + waiting_weight·waiting·prompt_blocks + usage_weight·kv_usage·prompt_blocks
//! ```
//!
//! With [`Weights::REFERENCE`] and nothing pending or reported this is the reference router's
//! form, and its worked example (10 blocks, overlaps 2/5/8, decode loads 10/5/9 → costs 18/10/11 → the
//! second engine) comes out the same (see the tests).
//!
//! The overlap is the device (GPU) overlap only: the index holds the blocks in GPU memory
//! (issue 4: other media are tracked by the subscriber, not stored), so the reference's partial
//! credit for host (0.75) and disk (0.25) blocks has no input here. A fleet offloading KV to CPU
//! or disk is routed as if those blocks were uncached: conservative, never a wrong hit.
//!
//! Two guards keep a popular prefix from piling onto one engine: engines whose in-flight count
//! exceeds `load_factor · mean + 1` over the candidates are passed over while any other is
//! under the bound (bounded load), and exact ties are broken at random. With `temperature > 0`
//! the choice is sampled, `p ∝ exp(−(cost − min) / ((max − min) · T))`.

use std::sync::atomic::Ordering::Relaxed;

use gantry_kvindex::index::Overlap;

use crate::fleet::EngineState;

/// One candidate engine's view: what the index and the load view say about it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Candidate {
    /// Leading prompt blocks the engine holds.
    pub overlap_blocks: u32,
    /// Prompt tokens of requests sent to it that have not produced a first token yet.
    pub pending_prefill_tokens: u64,
    /// KV blocks its requests in flight hold (estimated).
    pub active_blocks: u64,
    /// Requests in flight through this proxy.
    pub in_flight: u64,
    /// Requests waiting in the engine's queue (`vllm:num_requests_waiting`, scraped).
    pub waiting: f64,
    /// Its KV cache use, 0..1 (`vllm:kv_cache_usage_perc`, scraped).
    pub kv_usage: f64,
}

/// One [`Candidate`] per engine, in `engines`' order, into `out`: the load view read from each
/// engine's atomics, and the overlap of an index lookup (`overlaps`, by engine slot; `by_slot`
/// maps a slot to its engine's position, as [`crate::fleet::Pool::by_slot`] does). Engines the
/// lookup does not name hold none of the prompt. This is the per-request step between the lookup
/// and [`choose`]; the routing-decision bench times this same function.
pub fn fill_candidates<'a>(
    engines: impl IntoIterator<Item = &'a EngineState>,
    by_slot: &[Option<u32>],
    overlaps: &[Overlap],
    out: &mut Vec<Candidate>,
) {
    out.clear();
    out.extend(engines.into_iter().map(|e| Candidate {
        overlap_blocks: 0,
        pending_prefill_tokens: e.pending_prefill.load(Relaxed),
        active_blocks: e.active_blocks.load(Relaxed),
        in_flight: e.load(),
        waiting: e.waiting.load(Relaxed) as f64,
        kv_usage: e.kv_usage_ppm.load(Relaxed) as f64 / 1e6,
    }));
    for o in overlaps {
        if let Some(c) = by_slot.get(usize::from(o.engine)).copied().flatten().and_then(|i| out.get_mut(i as usize)) {
            c.overlap_blocks = o.blocks;
        }
    }
}

/// The cost function's weights (`pool[].kv` in the config).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Weight of uncached plus pending prefill blocks.
    pub prefill: f64,
    /// Weight of this prompt's uncached blocks against those already queued on the engine
    /// (1: a block is a block; above 1, a cache hit counts for more than the queue it waits in).
    pub uncached: f64,
    /// Weight of decode blocks.
    pub decode: f64,
    /// Weight of the engine's waiting queue (per waiting request, in units of this prompt).
    pub waiting: f64,
    /// Weight of the engine's KV cache use (in units of this prompt).
    pub usage: f64,
    /// Bounded load: engines above `load_factor · mean in-flight + 1` are passed over (0: off).
    pub load_factor: f64,
    /// Sampling temperature (0: always the lowest cost).
    pub temperature: f64,
}

impl Weights {
    /// The reference router's form: prefill and decode blocks at weight 1 (and the engine's
    /// waiting queue at 1). Kept for comparison; see [`Weights::default`].
    pub const REFERENCE: Weights = Weights {
        prefill: 1.0,
        uncached: 1.0,
        decode: 1.0,
        waiting: 1.0,
        usage: 0.0,
        load_factor: 2.0,
        temperature: 0.0,
    };
}

impl Default for Weights {
    /// Chosen by measurement (`scripts/bench-routing.sh`: the Mooncake conversation trace, first
    /// 1,500 requests through 8 mock engines of 8,192 blocks, token scale 0.25; engine prefix hit
    /// rate / TTFT p50). First at 8× the trace's rate, against round robin's 0.057 / 92.5 ms
    /// (uncached weight 1):
    ///
    /// | prefill | decode | waiting | load_factor | hit rate | TTFT p50 |
    /// |---|---|---|---|---|---|
    /// | 1 | 1 | 1 | 2 | 0.136–0.142 | 131–132 ms |
    /// | 1 | 0.25 | 0 | 2 | 0.161 | 107.8 ms |
    /// | 1 | 0.1 | 0.25 | 2 | 0.156 | 95.3 ms |
    /// | 1 | 0 | 0 | 1.25 | 0.147 | 84.9 ms |
    /// | **1** | **0** | **0** | **2** | **0.168** | **81.9 ms** |
    ///
    /// Decode blocks, in the same units as prefill, pull a burst of prompts onto engines that
    /// happen to decode little, and their prefills queue there; the in-flight bound already keeps
    /// decode load even. The scraped waiting count is up to a scrape interval old, so it herds.
    ///
    /// Then the uncached weight, at 8× and at 17× (where round robin saturates), two runs each
    /// (means; round robin 91.0 ms at 8×, 214–352 ms at 17×):
    ///
    /// | uncached | 8×: hit rate | 8×: TTFT p50 | 17×: hit rate | 17×: TTFT p50 |
    /// |---|---|---|---|---|
    /// | 1 | 0.164 | 83.0 ms | 0.146 | 136.8 ms |
    /// | 4 | 0.174 | 83.0 ms | 0.169 | 131.6 ms |
    /// | **16** | **0.166** | **82.5 ms** | **0.180** | **128.1 ms** |
    /// | 64 | 0.166 | 89.5 ms | 0.179 | 128.9 ms |
    ///
    /// With a block of queued prefill worth as much as a block this prompt would not find cached,
    /// a loaded holder loses its prefix's next turn to an idle engine: that engine prefills it all
    /// again, and the fleet does more work exactly when it has the least to spare. Weighting the
    /// uncached blocks 16× keeps a conversation on its holder until the in-flight bound moves it;
    /// at light load it changes little, and far above 16 a holder's queue grows before the bound
    /// acts (64: one 8× run at 96 ms).
    fn default() -> Self {
        Weights {
            prefill: 1.0,
            uncached: 16.0,
            decode: 0.0,
            waiting: 0.0,
            usage: 0.0,
            load_factor: 2.0,
            temperature: 0.0,
        }
    }
}

/// The terms of one engine's cost (for metrics and the `x-gantry-*` headers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Weighted prefill term.
    pub prefill: f64,
    /// Weighted decode term.
    pub decode: f64,
    /// Weighted engine-reported pressure.
    pub pressure: f64,
}

impl Cost {
    /// The whole cost.
    pub fn total(&self) -> f64 {
        self.prefill + self.decode + self.pressure
    }
}

/// The cost of sending a prompt of `prompt_blocks` blocks to `c`.
pub fn cost(c: &Candidate, prompt_blocks: u32, block_size: u32, w: &Weights) -> Cost {
    let prompt = f64::from(prompt_blocks);
    let uncached = f64::from(prompt_blocks.saturating_sub(c.overlap_blocks));
    let pending = c.pending_prefill_tokens as f64 / f64::from(block_size.max(1));
    Cost {
        prefill: w.prefill * (pending + w.uncached * uncached),
        decode: w.decode * (c.active_blocks as f64 + uncached),
        pressure: w.waiting * c.waiting.max(0.0) * prompt + w.usage * c.kv_usage.clamp(0.0, 1.0) * prompt,
    }
}

/// Index into `candidates` of the engine to use, or None when `candidates` is empty. `usable`
/// says which may be chosen at all (healthy, not tried yet); `costs` is scratch space.
pub fn choose(
    candidates: &[Candidate],
    usable: impl Fn(usize) -> bool,
    prompt_blocks: u32,
    block_size: u32,
    w: &Weights,
    rng: &mut fastrand::Rng,
    costs: &mut Vec<f64>,
) -> Option<usize> {
    // One pass asks `usable` (atomics, a list scan) once per engine: unusable engines get a NaN
    // cost, which every later pass skips.
    costs.clear();
    let (mut n, mut in_flight) = (0usize, 0u64);
    for (i, c) in candidates.iter().enumerate() {
        if usable(i) {
            n += 1;
            in_flight += c.in_flight;
            costs.push(cost(c, prompt_blocks, block_size, w).total());
        } else {
            costs.push(f64::NAN);
        }
    }
    if n == 0 {
        return None;
    }
    let bound = if w.load_factor > 0.0 { w.load_factor * (in_flight as f64 / n as f64) + 1.0 } else { f64::INFINITY };
    let under = |i: usize| candidates[i].in_flight as f64 <= bound;
    // One pass finds the lowest cost and its ties among the engines under the bound, and among
    // all usable ones (used when none is under the bound).
    let (mut lo_under, mut ties_under, mut lo_all, mut ties_all) = (f64::INFINITY, 0usize, f64::INFINITY, 0usize);
    let (mut max_under, mut max_all) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for (i, &c) in costs.iter().enumerate() {
        if c.is_nan() {
            continue;
        }
        if c < lo_all {
            (lo_all, ties_all) = (c, 1);
        } else if c == lo_all {
            ties_all += 1;
        }
        max_all = max_all.max(c);
        if under(i) {
            if c < lo_under {
                (lo_under, ties_under) = (c, 1);
            } else if c == lo_under {
                ties_under += 1;
            }
            max_under = max_under.max(c);
        }
    }
    let any_under = ties_under > 0;
    let (min, max, ties) = if any_under { (lo_under, max_under, ties_under) } else { (lo_all, max_all, ties_all) };
    let eligible = |i: usize| !costs[i].is_nan() && (!any_under || under(i));
    if w.temperature > 0.0 && max > min {
        let scale = (max - min) * w.temperature;
        let weight = |i: usize| if eligible(i) { (-(costs[i] - min) / scale).exp() } else { 0.0 };
        let total: f64 = (0..candidates.len()).map(weight).sum();
        let mut x = rng.f64() * total;
        for i in 0..candidates.len() {
            x -= weight(i);
            if x <= 0.0 && eligible(i) {
                return Some(i);
            }
        }
    }
    // The k-th of the ties, k uniform.
    let mut k = rng.usize(..ties);
    (0..candidates.len()).find(|&i| {
        let hit = costs[i] == min && eligible(i);
        if hit {
            if k == 0 {
                return true;
            }
            k -= 1;
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(overlap: u32, active: u64) -> Candidate {
        Candidate { overlap_blocks: overlap, active_blocks: active, ..Candidate::default() }
    }

    const W: Weights = Weights::REFERENCE;

    fn pick(cs: &[Candidate], blocks: u32, w: &Weights, seed: u64) -> Option<usize> {
        choose(cs, |_| true, blocks, 16, w, &mut fastrand::Rng::with_seed(seed), &mut Vec::new())
    }

    #[test]
    fn the_reference_worked_example_picks_the_same_engine() {
        // 10 prompt blocks; overlaps 2/5/8; decode loads (active + new) 10/5/9.
        let cs = [cand(2, 0), cand(5, 0), cand(8, 0)];
        let decode_loads = [10.0, 5.0, 9.0];
        let w = W;
        let totals: Vec<f64> = cs
            .iter()
            .zip(decode_loads)
            .map(|(c, d)| {
                let k = cost(c, 10, 16, &w);
                // The reference's decode load is given whole (active plus new blocks).
                k.prefill + d
            })
            .collect();
        assert_eq!(totals, vec![18.0, 10.0, 11.0]);
        // Through `choose`, with each decode load expressed as active blocks plus the prompt's
        // new (uncached) blocks: 10 = 2 + 8, 5 = 0 + 5, 9 = 7 + 2.
        let cs = [cand(2, 0), cand(5, 0), cand(8, 0)];
        let shifted: Vec<Candidate> =
            cs.iter().zip([2u64, 0, 7]).map(|(c, d)| Candidate { active_blocks: d, ..*c }).collect();
        for seed in 0..20 {
            assert_eq!(pick(&shifted, 10, &w, seed), Some(1));
        }
    }

    #[test]
    fn the_holder_wins_until_its_load_outweighs_the_saved_prefill() {
        let w = W;
        // 100-block prompt fully cached on engine 0; both idle → engine 0.
        assert_eq!(pick(&[cand(100, 0), cand(0, 0)], 100, &w, 1), Some(0));
        // A request in flight on the holder does not outweigh a whole cached prompt...
        assert_eq!(pick(&[cand(100, 101), cand(0, 0)], 100, &w, 1), Some(0));
        // ...but 250 active blocks do: the saved 100 blocks of prefill (×2) no longer pay.
        assert_eq!(pick(&[cand(100, 250), cand(0, 0)], 100, &w, 1), Some(1));
    }

    #[test]
    fn bounded_load_passes_over_a_saturated_holder() {
        let w = W;
        let mut hot = cand(100, 0);
        hot.in_flight = 40;
        let others = [cand(0, 0), cand(0, 0), cand(0, 0)];
        let mut cs = vec![hot];
        cs.extend(others);
        // mean in-flight 10 → bound 21: the holder (40) is passed over despite the lowest cost.
        let chosen = pick(&cs, 100, &w, 3).unwrap();
        assert_ne!(chosen, 0);
        // With the bound off, the cost alone picks the holder.
        let off = Weights { load_factor: 0.0, ..w };
        assert_eq!(pick(&cs, 100, &off, 3), Some(0));
    }

    #[test]
    fn exact_ties_are_broken_at_random_and_unusable_engines_never_win() {
        let w = W;
        let cs = [cand(0, 0); 4];
        let mut seen = [0; 4];
        for seed in 0..200 {
            let i = choose(&cs, |i| i != 2, 8, 16, &w, &mut fastrand::Rng::with_seed(seed), &mut Vec::new()).unwrap();
            seen[i] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[0] > 20 && seen[1] > 20 && seen[3] > 20, "{seen:?}");
        assert_eq!(choose(&cs, |_| false, 8, 16, &w, &mut fastrand::Rng::new(), &mut Vec::new()), None);
    }

    #[test]
    fn engine_reported_waiting_and_pending_prefill_add_cost() {
        let w = W;
        // A fully cached 10-block prompt costs 0 on its holder; elsewhere 10 prefill + 10 new.
        let mut busy = cand(10, 0);
        busy.waiting = 3.0;
        // 3 waiting requests × 10 blocks outweigh the 20 saved: go elsewhere.
        assert_eq!(pick(&[busy, cand(0, 0)], 10, &w, 5), Some(1));
        busy.waiting = 1.0;
        assert_eq!(pick(&[busy, cand(0, 0)], 10, &w, 5), Some(0));
        let mut pending = cand(10, 0);
        pending.pending_prefill_tokens = 16 * 21;
        assert_eq!(pick(&[pending, cand(0, 0)], 10, &w, 5), Some(1));
        pending.pending_prefill_tokens = 16 * 19;
        assert_eq!(pick(&[pending, cand(0, 0)], 10, &w, 5), Some(0));
    }

    #[test]
    fn temperature_samples_but_favours_the_cheapest() {
        let w = Weights { temperature: 0.2, ..W };
        let cs = [cand(10, 0), cand(0, 0), cand(5, 0)];
        let mut seen = [0; 3];
        for seed in 0..500 {
            seen[pick(&cs, 10, &w, seed).unwrap()] += 1;
        }
        assert!(seen[0] > seen[2] && seen[2] > seen[1], "{seen:?}");
        assert!(seen[1] > 0 || seen[2] > 0, "never sampled anything but the best: {seen:?}");
    }
}
