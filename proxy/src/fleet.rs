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
use gantry_kvindex::sink::EngineSlot;
use gantry_tokenizer::Tokenizer;

use crate::config::{parse_engine_url, Config, ConfigError, PolicyKind, Role};
use crate::metrics::{EngineCounters, StatusCounts};
use crate::route::grid::{check_target, DefaultTargets, GlobalRouterConfig, Topology};
use crate::route::index::PoolIndex;
use crate::route::kv::Weights;

/// Milliseconds since the process started (a monotonic clock cheap to store in an atomic).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One engine, shared by every worker.
///
/// The fields a routing decision reads for every engine of the pool (the load view and the
/// health flags) come first and share one cache line (`repr(C, align(64))`, checked below): a
/// decision over 256 engines then touches 256 lines, not three or four times as many.
#[derive(Debug)]
#[repr(C, align(64))]
pub struct EngineState {
    /// Requests in flight through this proxy.
    pub in_flight: AtomicU64,
    /// Load view: prompt tokens sent to it that have not produced a first token yet.
    pub pending_prefill: AtomicU64,
    /// Load view: KV blocks its requests in flight hold (prompt blocks, estimated).
    pub active_blocks: AtomicU64,
    /// Engine-reported `vllm:num_requests_waiting`, scraped.
    pub waiting: AtomicU64,
    /// Engine-reported `vllm:kv_cache_usage_perc` in parts per million, scraped.
    pub kv_usage_ppm: AtomicU64,
    /// Passively ejected until this `now_ms()` (0: not ejected).
    pub ejected_until: AtomicU64,
    /// Active probes say it is down.
    pub probe_down: AtomicBool,
    /// Draining: no new requests.
    pub draining: AtomicBool,
    /// Its URL (`x-gantry-engine`).
    pub url: String,
    /// `host:port` for the Host header.
    pub authority: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Served model.
    pub model: String,
    /// Probe streaks.
    pub probe_ok_streak: AtomicU32,
    /// Probe streaks.
    pub probe_fail_streak: AtomicU32,
    /// Its context length, learned from its `/v1/models` by the health prober (0: not yet;
    /// [`NO_MAX_MODEL_LEN`]: its answer had none).
    pub max_model_len: AtomicU64,
    /// Request failures in a row (connect errors, 5xx).
    pub passive_failures: AtomicU32,
    /// Ejections so far (backoff doubles with each).
    pub ejections: AtomicU32,
    /// Per-engine counters.
    pub counters: EngineCounters,
}

// The per-decision fields fit in the first cache line.
const _: () = assert!(std::mem::offset_of!(EngineState, draining) < 64);

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
            pending_prefill: AtomicU64::new(0),
            active_blocks: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv_usage_ppm: AtomicU64::new(0),
            max_model_len: AtomicU64::new(0),
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
    /// `kv` policy: the pool's prefix index (None: routing on load alone).
    pub index: Option<Arc<PoolIndex>>,
    /// Each engine's slot in `index` (None for an engine the index does not know).
    pub slots: Vec<Option<EngineSlot>>,
    /// Whether `index` follows each engine's KV events (as `engines`; see
    /// [`PoolIndex::follows_events`]): its predictions then need to live only until its events
    /// confirm them.
    pub events: Vec<bool>,
    /// The inverse: engine index by slot.
    pub by_slot: Vec<Option<u32>>,
    /// `kv` policy: cost weights.
    pub kv: Weights,
    /// Routing settings the pool was built from (kept for admin edits and reloads).
    pub conf: crate::config::PoolConf,
    /// Routing and demand counters (kept across reloads by pool name).
    pub counters: Arc<crate::metrics::PoolCounters>,
}

impl Pool {
    /// A pool of `conf`'s settings over `engines` (their slots looked up in `index`).
    pub fn new(
        conf: &crate::config::PoolConf,
        engines: Vec<Arc<EngineState>>,
        index: Option<Arc<PoolIndex>>,
        counters: Arc<crate::metrics::PoolCounters>,
    ) -> Pool {
        let slots: Vec<Option<EngineSlot>> =
            engines.iter().map(|e| index.as_ref().and_then(|i| i.slot_of(&e.url))).collect();
        let events = engines.iter().map(|e| index.as_ref().is_some_and(|i| i.follows_events(&e.url))).collect();
        let mut by_slot = vec![None; index.as_ref().map_or(0, |i| i.engine_slots)];
        for (i, s) in slots.iter().enumerate() {
            if let Some(s) = s {
                by_slot[usize::from(*s)] = Some(i as u32);
            }
        }
        Pool {
            name: conf.name.clone(),
            role: conf.role,
            policy: conf.policy,
            session_header: conf.session_header.to_ascii_lowercase(),
            block_size: conf.block_size,
            engines,
            rr: AtomicUsize::new(0),
            index,
            slots,
            events,
            by_slot,
            kv: conf.kv.weights(),
            conf: conf.clone(),
            counters,
        }
    }

    /// The same pool with its prefix index set.
    pub fn with_index(&self, index: Option<Arc<PoolIndex>>) -> Pool {
        Pool::new(&self.conf, self.engines.clone(), index, self.counters.clone())
    }

    /// The pool's engines as config entries: each engine's own entry of the pool's config when
    /// it has one (with its event endpoints), else just its URL and model (an engine added
    /// through the admin API: no events, routed on the proxy's predictions).
    pub fn members(&self) -> Vec<crate::config::EngineConf> {
        self.engines
            .iter()
            .map(|e| {
                engine_conf(&self.conf, &e.url).cloned().unwrap_or_else(|| crate::config::EngineConf {
                    url: e.url.clone(),
                    model: e.model.clone(),
                    ..Default::default()
                })
            })
            .collect()
    }
}

/// The entry of `conf` for the engine at `url` (the engine's own URL, without a trailing `/`).
fn engine_conf<'c>(conf: &'c crate::config::PoolConf, url: &str) -> Option<&'c crate::config::EngineConf> {
    conf.engine.iter().find(|c| c.url.trim_end_matches('/') == url)
}

/// A configured model and what routing needs of it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Served name.
    pub name: String,
    /// Its tokenizer (None: approximate routing over text).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Where the tokenizer came from (`builtin` or a directory), to reuse it across reloads.
    pub tokenizer_source: Option<std::path::PathBuf>,
    /// Longest prompt in tokens as configured (`model[].max_model_len`).
    pub max_model_len: Option<usize>,
    /// Without one configured: the least context length its engines report (0: none known yet),
    /// learned by the health prober from their `/v1/models`.
    pub learned_max_model_len: Arc<AtomicU64>,
    /// The model its engines serve: its own name, or for a LoRA adapter its base's.
    pub served_by: String,
    /// For a LoRA adapter, its name: vLLM keys every block of its requests with it.
    pub lora: Option<String>,
    /// Requests that named this model, by the status the client got (kept across reloads).
    pub requests: Arc<StatusCounts>,
}

impl ModelInfo {
    /// The longest prompt it takes plus one (vLLM's `max_model_len`): as configured, else as its
    /// engines report it (None: unknown, no check).
    pub fn context_len(&self) -> Option<usize> {
        self.max_model_len.or(match self.learned_max_model_len.load(Ordering::Relaxed) {
            0 => None,
            n => usize::try_from(n).ok(),
        })
    }
}

/// An immutable view of all pools.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Pools in config order.
    pub pools: Vec<Pool>,
    /// Configured model names, in order.
    pub models: Vec<String>,
    /// Configured models with their tokenizers (base models first, then LoRA adapters).
    pub model_info: Vec<ModelInfo>,
    /// Pool choice by Dynamo's global-router grid (`server.global_router`); None: the first
    /// aggregated pool serving the model.
    pub router: Option<Arc<GlobalRouterConfig>>,
    /// Targets of requests that name none (`routing.default_*_target_ms`): for the grid, and for
    /// counting requests over their target.
    pub default_targets: DefaultTargets,
}

impl Fleet {
    /// Builds the fleet of `cfg`, reusing engines of `old` that keep their URL and model.
    pub fn build(cfg: &Config, old: Option<&Fleet>) -> Result<Fleet, ConfigError> {
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
                        EngineState::new(&e.url, &e.model)
                            .map_err(|m| invalid(format!("pool[{i}].engine[{j}].url"), m))?,
                    ),
                };
                engines.push(state);
            }
            let old_pool = old.and_then(|o| o.pools.iter().find(|op| op.name == p.name));
            let counters = old_pool.map_or_else(Default::default, |op| op.counters.clone());
            let index = old_pool
                .filter(|op| {
                    op.conf.index_path == p.index_path
                        && op.conf.index_capacity == p.index_capacity
                        && op.conf.block_size == p.block_size
                })
                .and_then(|op| op.index.clone())
                .filter(|_| p.policy == PolicyKind::Kv);
            pools.push(Pool::new(p, engines, index, counters));
        }
        let mut model_info: Vec<ModelInfo> = Vec::with_capacity(cfg.model.len());
        // Base models first: an adapter takes its base's tokenizer.
        let order = cfg.model.iter().enumerate().filter(|(_, m)| m.base.is_none());
        for (i, m) in order.chain(cfg.model.iter().enumerate().filter(|(_, m)| m.base.is_some())) {
            let requests =
                old.and_then(|o| o.model(&m.name)).map_or_else(Default::default, |x| Arc::clone(&x.requests));
            if let Some(base) = &m.base {
                let b = model_info.iter().find(|x| &x.name == base).ok_or_else(|| {
                    invalid(format!("model[{i}].base"), format!("`{base}` is not a configured base model"))
                })?;
                model_info.push(ModelInfo {
                    name: m.name.clone(),
                    tokenizer: b.tokenizer.clone(),
                    tokenizer_source: b.tokenizer_source.clone(),
                    max_model_len: m.max_model_len.or(b.max_model_len),
                    learned_max_model_len: Arc::clone(&b.learned_max_model_len),
                    served_by: base.clone(),
                    lora: Some(m.name.clone()),
                    requests,
                });
                continue;
            }
            let reused = old
                .and_then(|o| o.model_info.iter().find(|x| x.name == m.name && x.tokenizer_source == m.tokenizer))
                .and_then(|x| x.tokenizer.clone());
            let tokenizer = match (&m.tokenizer, reused) {
                (None, _) => None,
                (Some(_), Some(t)) => Some(t),
                (Some(src), None) => {
                    Some(Arc::new(load_tokenizer(src).map_err(|e| invalid(format!("model[{i}].tokenizer"), e))?))
                }
            };
            model_info.push(ModelInfo {
                name: m.name.clone(),
                tokenizer,
                tokenizer_source: m.tokenizer.clone(),
                max_model_len: m.max_model_len,
                learned_max_model_len: Arc::new(AtomicU64::new(learned(&pools, &m.name))),
                served_by: m.name.clone(),
                lora: None,
                requests,
            });
        }
        let r = &cfg.routing;
        for (key, v) in [
            ("routing.default_ttft_target_ms", r.default_ttft_target_ms),
            ("routing.default_itl_target_ms", r.default_itl_target_ms),
        ] {
            if let Some(v) = v {
                check_target(v).map_err(|problem| invalid(key.into(), problem))?;
            }
        }
        let default_targets = DefaultTargets { ttft_ms: r.default_ttft_target_ms, itl_ms: r.default_itl_target_ms };
        let router = match &cfg.server.global_router {
            None => None,
            Some(path) => {
                let key = |e: &dyn std::fmt::Display| {
                    invalid("server.global_router".into(), format!("{}: {e}", path.display()))
                };
                let mut g = GlobalRouterConfig::load(path).map_err(|e| key(&e))?;
                let r = &cfg.routing;
                g.set_default_targets(r.default_ttft_target_ms, r.default_itl_target_ms)
                    .map_err(|e| invalid("routing.default_*_target_ms".into(), e))?;
                if matches!(g.topology, Topology::Disagg { .. }) {
                    return Err(key(&"mode `disagg` needs prefill/decode pools, which arrive with P/D orchestration; use mode `agg`"));
                }
                let known: Vec<(&str, &str)> = pools.iter().map(|p| (p.name.as_str(), p.role.as_str())).collect();
                g.check_pools(&known).map_err(|e| key(&e))?;
                for w in &g.warnings {
                    tracing::warn!(path = %path.display(), "global router config: {w}");
                }
                Some(Arc::new(g))
            }
        };
        let models = cfg.model.iter().map(|m| m.name.clone()).collect();
        Ok(Fleet { pools, models, model_info, router, default_targets })
    }

    /// Sets each model's learned context length again from the engines in this fleet (the
    /// prober calls it after each round, so engines that left or changed stop counting).
    pub fn relearn_max_model_len(&self) {
        for m in self.model_info.iter().filter(|m| m.lora.is_none()) {
            m.learned_max_model_len.store(learned(&self.pools, &m.served_by), Ordering::Relaxed);
        }
    }

    /// What routing knows of `model`.
    pub fn model(&self, model: &str) -> Option<&ModelInfo> {
        self.model_info.iter().find(|m| m.name == model)
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

    /// A copy where `f` may change each pool's engine list (admin edits), with each pool's
    /// prefix index following the new list ([`Fleet::sync_indexes`]).
    pub fn edit(&self, mut f: impl FnMut(&str, &mut Vec<Arc<EngineState>>)) -> Fleet {
        let pools = self
            .pools
            .iter()
            .map(|p| {
                let mut engines = p.engines.clone();
                f(&p.name, &mut engines);
                Pool::new(&p.conf, engines, p.index.clone(), p.counters.clone())
            })
            .collect();
        let mut fleet = Fleet {
            pools,
            models: self.models.clone(),
            model_info: self.model_info.clone(),
            router: self.router.clone(),
            default_targets: self.default_targets,
        };
        fleet.sync_indexes();
        fleet
    }

    /// Makes each pool's prefix index follow the pool's engines (newcomers registered and their
    /// events followed, leavers released; see [`PoolIndex::sync`]) and looks their slots up
    /// again. Call it on a fleet about to be swapped in.
    pub fn sync_indexes(&mut self) {
        for pool in &mut self.pools {
            if let Some(index) = pool.index.clone() {
                index.sync(&pool.members());
                *pool = pool.with_index(Some(index));
            }
        }
    }
}

/// `builtin` is the built-in tokenizer (the mock's default); anything else a model directory.
pub fn load_tokenizer(src: &std::path::Path) -> Result<Tokenizer, gantry_tokenizer::TokenizerError> {
    if src.as_os_str() == crate::config::BUILTIN_TOKENIZER {
        Ok(Tokenizer::builtin())
    } else {
        Tokenizer::from_dir(src)
    }
}

/// [`EngineState::max_model_len`] of an engine whose `/v1/models` lists no length for its model.
pub const NO_MAX_MODEL_LEN: u64 = u64::MAX;

/// The least context length the engines of `pools` serving `model` have reported (0: none).
fn learned(pools: &[Pool], model: &str) -> u64 {
    let lens = pools.iter().flat_map(|p| &p.engines).filter(|e| e.model == model);
    let known = lens.map(|e| e.max_model_len.load(Ordering::Relaxed)).filter(|&n| n > 0 && n != NO_MAX_MODEL_LEN);
    known.min().unwrap_or(0)
}

/// A config error naming `key`.
fn invalid(key: String, problem: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.to_string() }
}

/// The shared, swappable fleet.
pub type SharedFleet = Arc<ArcSwap<Fleet>>;

/// Held by every change of a shared fleet (a reload, an admin edit) from loading the current
/// fleet to storing the new one: the changes also move the pools' prefix indexes
/// ([`Fleet::sync_indexes`]), so two of them interleaving could leave the stored fleet and an
/// index disagreeing about which engine holds which slot. Process-wide, since such changes are
/// rare.
pub fn change_lock() -> std::sync::MutexGuard<'static, ()> {
    static CHANGES: std::sync::Mutex<()> = std::sync::Mutex::new(());
    CHANGES.lock().unwrap_or_else(|p| p.into_inner())
}
