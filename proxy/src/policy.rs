//! Engine choice inside a pool: small interchangeable policies behind one function.
//!
//! Every policy chooses among *healthy* engines not yet tried for this request; only when no
//! healthy engine is left does it choose among ejected ones (never draining ones). KV-aware
//! choice (`kv`) is costed in `route::kv`; this only serves its requests without a prompt.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::PolicyKind;
use crate::fleet::{EngineState, Pool};

/// Load bound of the session policy: an engine takes a session only while its load is at most
/// this factor times the pool's mean load (plus one), so one hot session key cannot pile up.
pub const SESSION_LOAD_FACTOR: f64 = 1.25;

/// What a choice may depend on besides the pool.
#[derive(Debug)]
pub struct PickInput<'a> {
    /// Indices of engines already tried for this request.
    pub tried: &'a [usize],
    /// The session key (header value), for the session policy.
    pub session: Option<&'a [u8]>,
    /// Current `now_ms()`.
    pub now: u64,
}

fn hash64(bytes: &[u8], salt: &str) -> u64 {
    // FNV-1a then a SplitMix finalizer: stable across processes, cheap, well mixed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes.iter().chain(salt.as_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// Picks an engine of `pool` (its index), or None when every engine was tried or is draining.
pub fn pick(pool: &Pool, input: &PickInput<'_>, rng: &mut fastrand::Rng) -> Option<usize> {
    let engines = &pool.engines;
    let usable = |i: usize, e: &Arc<EngineState>| !input.tried.contains(&i) && !e.draining.load(Ordering::Relaxed);
    let mut candidates: Vec<usize> =
        engines.iter().enumerate().filter(|(i, e)| usable(*i, e) && e.healthy(input.now)).map(|(i, _)| i).collect();
    if candidates.is_empty() {
        candidates = engines.iter().enumerate().filter(|(i, e)| usable(*i, e)).map(|(i, _)| i).collect();
    }
    if candidates.is_empty() {
        return None;
    }
    let load = |i: usize| engines[i].load();
    let chosen = match pool.policy {
        PolicyKind::RoundRobin => {
            let n = pool.rr.fetch_add(1, Ordering::Relaxed);
            candidates[n % candidates.len()]
        }
        PolicyKind::Random => candidates[rng.usize(..candidates.len())],
        // `kv` chooses in `route::kv` when the request has a prompt; other requests to a `kv`
        // pool (e.g. `/tokenize`) go to the least loaded engine.
        PolicyKind::LeastLoaded | PolicyKind::Kv => {
            let min = candidates.iter().map(|&i| load(i)).min().unwrap_or(0);
            let ties: Vec<usize> = candidates.iter().copied().filter(|&i| load(i) == min).collect();
            ties[rng.usize(..ties.len())]
        }
        PolicyKind::PowerOfTwo => {
            let a = candidates[rng.usize(..candidates.len())];
            let b = candidates[rng.usize(..candidates.len())];
            if load(b) < load(a) {
                b
            } else {
                a
            }
        }
        PolicyKind::Session => match input.session {
            None => {
                let n = pool.rr.fetch_add(1, Ordering::Relaxed);
                candidates[n % candidates.len()]
            }
            Some(key) => {
                // Rendezvous hashing: each engine scores the key; the best-scoring engine under
                // the load bound wins. Removing an engine moves only the keys it held.
                let total: u64 = candidates.iter().map(|&i| load(i)).sum();
                let bound = (SESSION_LOAD_FACTOR * (total as f64 / candidates.len() as f64 + 1.0)).ceil() as u64;
                let mut ranked: Vec<(u64, usize)> =
                    candidates.iter().map(|&i| (hash64(key, &engines[i].url), i)).collect();
                ranked.sort_unstable_by_key(|&(score, _)| std::cmp::Reverse(score));
                ranked.iter().find(|&&(_, i)| load(i) < bound).map_or(ranked[0].1, |&(_, i)| i)
            }
        },
    };
    Some(chosen)
}

#[cfg(test)]
mod tests;
