//! The fleet: pools and engines, as an immutable snapshot swapped atomically on change.
//!
//! Request paths read the current [`Fleet`] with one lock-free `ArcSwap::load`; per-engine
//! state that changes per request (in-flight count, health, counters) is atomics inside
//! [`EngineState`], shared by every worker. Reloads and admin changes build a new `Fleet`,
//! reusing the `EngineState` of engines that stay (so their load and health carry over).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::{parse_engine_url, Config, PolicyKind, Role};
use crate::metrics::EngineCounters;

/// Milliseconds since the process started (a monotonic clock cheap to store in an atomic).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One engine, shared by every worker.
#[derive(Debug)]
pub struct EngineState {
    /// Its URL (`x-gantry-engine`).
    pub url: String,
    /// `host:port` for the Host header.
    pub authority: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Served model.
    pub model: String,
    /// Requests in flight through this proxy.
    pub in_flight: AtomicU64,
    /// Active probes say it is down.
    pub probe_down: AtomicBool,
    /// Probe streaks.
    pub probe_ok_streak: AtomicU32,
    /// Probe streaks.
    pub probe_fail_streak: AtomicU32,
    /// Request failures in a row (connect errors, 5xx).
    pub passive_failures: AtomicU32,
    /// Passively ejected until this `now_ms()` (0: not ejected).
    pub ejected_until: AtomicU64,
    /// Ejections so far (backoff doubles with each).
    pub ejections: AtomicU32,
    /// Draining: no new requests.
    pub draining: AtomicBool,
    /// Per-engine counters.
    pub counters: EngineCounters,
}

impl EngineState {
    /// A fresh engine (healthy until probes or failures say otherwise).
    pub fn new(url: &str, model: &str) -> Result<EngineState, String> {
        let u = parse_engine_url(url)?;
        Ok(EngineState {
            url: u.url,
            authority: u.authority,
            addr: u.addr,
            model: model.to_owned(),
            in_flight: AtomicU64::new(0),
            probe_down: AtomicBool::new(false),
            probe_ok_streak: AtomicU32::new(0),
            probe_fail_streak: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            counters: EngineCounters::default(),
        })
    }

    /// Neither probed down nor passively ejected nor draining.
    pub fn healthy(&self, now: u64) -> bool {
        !self.probe_down.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now
            && !self.draining.load(Ordering::Relaxed)
    }

    /// In-flight requests.
    pub fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A pool of engines.
#[derive(Debug)]
pub struct Pool {
    /// Name (`x-gantry-pool`).
    pub name: String,
    /// Role.
    pub role: Role,
    /// Engine choice policy.
    pub policy: PolicyKind,
    /// Header the session policy hashes.
    pub session_header: String,
    /// KV block size.
    pub block_size: u32,
    /// Engines.
    pub engines: Vec<Arc<EngineState>>,
    /// Round-robin position.
    pub rr: AtomicUsize,
}

/// An immutable view of all pools.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Pools in config order.
    pub pools: Vec<Pool>,
    /// Configured model names, in order.
    pub models: Vec<String>,
}

impl Fleet {
    /// Builds the fleet of `cfg`, reusing engines of `old` that keep their URL and model.
    pub fn build(cfg: &Config, old: Option<&Fleet>) -> Result<Fleet, String> {
        let mut reuse: HashMap<(&str, &str), &Arc<EngineState>> = HashMap::new();
        if let Some(old) = old {
            for e in old.pools.iter().flat_map(|p| &p.engines) {
                reuse.insert((e.url.as_str(), e.model.as_str()), e);
            }
        }
        let mut pools = Vec::with_capacity(cfg.pool.len());
        for (i, p) in cfg.pool.iter().enumerate() {
            let mut engines = Vec::with_capacity(p.engine.len());
            for (j, e) in p.engine.iter().enumerate() {
                let url = e.url.trim_end_matches('/');
                let state = match reuse.get(&(url, e.model.as_str())) {
                    Some(s) => Arc::clone(s),
                    None => Arc::new(
                        EngineState::new(&e.url, &e.model).map_err(|m| format!("pool[{i}].engine[{j}].url: {m}"))?,
                    ),
                };
                engines.push(state);
            }
            pools.push(Pool {
                name: p.name.clone(),
                role: p.role,
                policy: p.policy,
                session_header: p.session_header.to_ascii_lowercase(),
                block_size: p.block_size,
                engines,
                rr: AtomicUsize::new(0),
            });
        }
        Ok(Fleet { pools, models: cfg.model.iter().map(|m| m.name.clone()).collect() })
    }

    /// Whether `model` is configured.
    pub fn has_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    /// Every engine with its pool, once each.
    pub fn engines(&self) -> impl Iterator<Item = (&Pool, &Arc<EngineState>)> {
        self.pools.iter().flat_map(|p| p.engines.iter().map(move |e| (p, e)))
    }

    /// The first aggregated pool with an engine serving `model`.
    pub fn pool_for(&self, model: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.role == Role::Agg && p.engines.iter().any(|e| e.model == model))
    }

    /// A copy with the same pools and engines (for admin edits).
    pub fn edit(
        &self,
        f: impl FnOnce(&mut Vec<(String, Role, PolicyKind, String, u32, Vec<Arc<EngineState>>)>),
    ) -> Fleet {
        let mut pools: Vec<_> = self
            .pools
            .iter()
            .map(|p| (p.name.clone(), p.role, p.policy, p.session_header.clone(), p.block_size, p.engines.clone()))
            .collect();
        f(&mut pools);
        Fleet {
            pools: pools
                .into_iter()
                .map(|(name, role, policy, session_header, block_size, engines)| Pool {
                    name,
                    role,
                    policy,
                    session_header,
                    block_size,
                    engines,
                    rr: AtomicUsize::new(0),
                })
                .collect(),
            models: self.models.clone(),
        }
    }
}

/// The shared, swappable fleet.
pub type SharedFleet = Arc<ArcSwap<Fleet>>;
