//! `gantry serve` configuration: one TOML file, raw then validated, every key documented.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `server.listen` | `127.0.0.1:8000` | client listener (one `SO_REUSEPORT` socket per worker) |
//! | `server.workers` | cores | worker threads, one monoio runtime each |
//! | `server.driver` | `auto` | `auto` (io_uring, else epoll), `io_uring`, `legacy` |
//! | `server.max_body_bytes` | 32 MiB | largest request body (413) |
//! | `server.max_head_bytes` | 64 KiB | largest request head (431) |
//! | `server.max_headers` | 100 | most request header lines (431) |
//! | `server.header_timeout_ms` | 10000 | time to receive a whole head (408) |
//! | `server.body_timeout_ms` | 60000 | time to receive a whole body (408) |
//! | `server.idle_timeout_ms` | 75000 | idle keep-alive connection lifetime |
//! | `upstream.connect_timeout_ms` | 2000 | engine connect timeout |
//! | `upstream.first_byte_timeout_ms` | 600000 | time until an engine's response head (504) |
//! | `upstream.idle_timeout_ms` | 600000 | longest gap between two body reads of a response (504) |
//! | `upstream.max_idle_per_engine` | 64 | pooled idle connections per engine per worker |
//! | `retry.attempts` | 3 | engines tried for one request before any byte reached the client |
//! | `health.interval_ms` | 2000 | active `/health` probe period (0: no probes) |
//! | `health.timeout_ms` | 1000 | probe timeout |
//! | `health.unhealthy_threshold` | 2 | consecutive failed probes that eject an engine |
//! | `health.healthy_threshold` | 1 | consecutive good probes that restore it |
//! | `health.passive_failures` | 3 | consecutive request failures (connect error, 5xx) that eject an engine |
//! | `health.eject_ms` | 5000 | first passive ejection; doubles per repeat, up to 60 s |
//! | `model[].name` | — | a served model name |
//! | `model[].tokenizer` | none | `builtin` or an HF model directory: exact KV-aware routing (none: approximate, over text) |
//! | `model[].max_model_len` | learned | vLLM's `max_model_len`: a prompt of this many tokens or more gets a 400 where routing tokenizes prompts (a model with a `tokenizer`, in a `kv` pool or under a grid); none: the least its engines list on `/v1/models`, read by the health prober (`health.interval_ms` > 0); an adapter's defaults to its base's |
//! | `model[].base` | none | this model is a LoRA adapter of that `[[model]]`: served by its engines (started with `--lora-modules NAME=PATH`), tokenized by its tokenizer, its KV blocks keyed by the adapter's name as vLLM keys them |
//! | `server.global_router` | none | Dynamo global-router JSON config: pool choice by grid (`--global-router-config`) |
//! | `routing.engine_metrics_interval_ms` | 1000 | scrape of engines' `/metrics` for the `kv` cost (0: off) |
//! | `routing.default_ttft_target_ms` / `default_itl_target_ms` | none | grid target for requests without one (Dynamo's `--default-ttft-target` / `--default-itl-target`; none: the grid's midpoint) |
//! | `pool[].name` | — | pool name (`x-gantry-pool`) |
//! | `pool[].role` | `agg` | `agg`, `prefill` or `decode` |
//! | `pool[].policy` | `round_robin` | `round_robin`, `random`, `least_loaded`, `power_of_two`, `session`, `kv` |
//! | `pool[].index_path` | `/dev/shm/gantry-kvindex-<port>-<pool>` | `kv`: the pool's shared-memory prefix index |
//! | `pool[].index_capacity` | 1048576 | `kv`: blocks the index holds (exact and predicted tiers each). Each engine's events may fill an equal share (capacity / the pool's engines, updated as engines join and leave; beyond it its own oldest blocks go), so one engine never evicts another's: size it to engines × the largest engine's GPU blocks. Changing it (or `block_size`, or `index_path`) on a reload replaces the pool's index with an empty one, which fills from the engines' events from then on |
//! | `pool[].kv.prefill_weight` … | see `route/kv.rs` | `kv` cost weights: `prefill_weight`, `uncached_weight`, `decode_weight`, `waiting_weight`, `usage_weight`, `load_factor`, `temperature` |
//! | `pool[].session_header` | `x-session-id` | header keyed by the `session` policy |
//! | `pool[].block_size` | 16 | KV block size of the pool's engines |
//! | `pool[].engine[].url` | — | `http://host:port` of a `vllm serve` |
//! | `pool[].engine[].model` | — | model it serves (must be a `model[].name`) |
//! | `pool[].engine[].kv_events` / `kv_replay` | none | its ZMQ KV-event endpoints |
//! | `pool[].engine[].dp_ranks` | 1 | its data-parallel ranks: rank `r` publishes on the `kv_events` / `kv_replay` port + `r` |
//! | `pool[].engine[].kv_topic` | empty | topic of its KV events (vLLM's `kv_events_config.topic`; empty: all) |
//!
//! Relative paths in the file (`server.global_router`, `model[].tokenizer`, `pool[].index_path`) are
//! taken from the file's folder; `gantry serve`'s command-line settings win over the file's, also
//! after a reload.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Default client listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8000";
/// Default engine connect timeout, ms.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Default time to an engine's response head, ms.
pub const DEFAULT_FIRST_BYTE_TIMEOUT_MS: u64 = 600_000;
/// Default longest silence inside an engine's response, ms.
pub const DEFAULT_UPSTREAM_IDLE_MS: u64 = 600_000;
/// Default pooled idle connections per engine per worker.
pub const DEFAULT_MAX_IDLE_PER_ENGINE: usize = 64;
/// Default engines tried per request.
pub const DEFAULT_RETRY_ATTEMPTS: usize = 3;
/// Default probe period, ms.
pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 2_000;
/// Default probe timeout, ms.
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 1_000;
/// Default first passive ejection, ms.
pub const DEFAULT_EJECT_MS: u64 = 5_000;
/// Default KV block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;
/// `model[].tokenizer` naming the built-in tokenizer rather than a folder.
pub const BUILTIN_TOKENIZER: &str = "builtin";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`.
    pub server: ServerConf,
    /// `[upstream]`.
    pub upstream: UpstreamConf,
    /// `[retry]`.
    pub retry: RetryConf,
    /// `[health]`.
    pub health: HealthConf,
    /// `[admin]`: the admin listener (off when absent).
    pub admin: Option<AdminConf>,
    /// `[routing]`.
    pub routing: RoutingConf,
    /// `[[model]]`.
    pub model: Vec<ModelConf>,
    /// `[[pool]]`.
    pub pool: Vec<PoolConf>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConf {
    /// Client listener address.
    pub listen: String,
    /// Worker threads (0 = one per core).
    pub workers: usize,
    /// I/O driver.
    pub driver: String,
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Largest request head, bytes.
    pub max_head_bytes: usize,
    /// Most header lines.
    pub max_headers: usize,
    /// Head timeout, ms.
    pub header_timeout_ms: u64,
    /// Body timeout, ms.
    pub body_timeout_ms: u64,
    /// Idle keep-alive timeout, ms.
    pub idle_timeout_ms: u64,
    /// Dynamo global-router JSON config (KV-aware routing issue).
    pub global_router: Option<PathBuf>,
}

impl Default for ServerConf {
    fn default() -> Self {
        ServerConf {
            listen: DEFAULT_LISTEN.into(),
            workers: 0,
            driver: "auto".into(),
            max_body_bytes: crate::http::DEFAULT_MAX_BODY_BYTES,
            max_head_bytes: crate::http::DEFAULT_MAX_HEAD_BYTES,
            max_headers: crate::http::DEFAULT_MAX_HEADERS,
            header_timeout_ms: crate::http::DEFAULT_HEADER_TIMEOUT.as_millis() as u64,
            body_timeout_ms: crate::http::DEFAULT_BODY_TIMEOUT.as_millis() as u64,
            idle_timeout_ms: crate::http::DEFAULT_IDLE_TIMEOUT.as_millis() as u64,
            global_router: None,
        }
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConf {
    /// Connect timeout, ms.
    pub connect_timeout_ms: u64,
    /// Time to the response head, ms.
    pub first_byte_timeout_ms: u64,
    /// Longest gap between body reads, ms.
    pub idle_timeout_ms: u64,
    /// Pooled idle connections per engine per worker.
    pub max_idle_per_engine: usize,
}

impl Default for UpstreamConf {
    fn default() -> Self {
        UpstreamConf {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            first_byte_timeout_ms: DEFAULT_FIRST_BYTE_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_UPSTREAM_IDLE_MS,
            max_idle_per_engine: DEFAULT_MAX_IDLE_PER_ENGINE,
        }
    }
}

/// `[retry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConf {
    /// Engines tried per request (1 = no retry).
    pub attempts: usize,
}

impl Default for RetryConf {
    fn default() -> Self {
        RetryConf { attempts: DEFAULT_RETRY_ATTEMPTS }
    }
}

/// `[health]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConf {
    /// Probe period, ms (0 = no active probes).
    pub interval_ms: u64,
    /// Probe timeout, ms.
    pub timeout_ms: u64,
    /// Failed probes in a row that eject.
    pub unhealthy_threshold: u32,
    /// Good probes in a row that restore.
    pub healthy_threshold: u32,
    /// Failed requests in a row that eject.
    pub passive_failures: u32,
    /// First passive ejection, ms (doubles per repeat, capped at 60 s).
    pub eject_ms: u64,
}

impl Default for HealthConf {
    fn default() -> Self {
        HealthConf {
            interval_ms: DEFAULT_HEALTH_INTERVAL_MS,
            timeout_ms: DEFAULT_HEALTH_TIMEOUT_MS,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            passive_failures: 3,
            eject_ms: DEFAULT_EJECT_MS,
        }
    }
}

/// `[routing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConf {
    /// Period of the engines' `/metrics` scrape, ms (0 = off).
    pub engine_metrics_interval_ms: u64,
    /// Grid TTFT target for requests that give none, ms.
    pub default_ttft_target_ms: Option<f64>,
    /// Grid ITL target for requests that give none, ms.
    pub default_itl_target_ms: Option<f64>,
}

impl Default for RoutingConf {
    fn default() -> Self {
        RoutingConf { engine_metrics_interval_ms: 1_000, default_ttft_target_ms: None, default_itl_target_ms: None }
    }
}

/// `[pool.kv]`: the `kv` policy's cost weights (see `route/kv.rs`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvConf {
    /// Weight of uncached plus pending prefill blocks.
    pub prefill_weight: f64,
    /// Weight of the prompt's uncached blocks within the prefill term.
    pub uncached_weight: f64,
    /// Weight of decode blocks.
    pub decode_weight: f64,
    /// Weight of the engine-reported waiting queue.
    pub waiting_weight: f64,
    /// Weight of the engine-reported KV cache use.
    pub usage_weight: f64,
    /// Bounded load factor (0 = off).
    pub load_factor: f64,
    /// Sampling temperature (0 = lowest cost).
    pub temperature: f64,
}

impl Default for KvConf {
    fn default() -> Self {
        let w = crate::route::kv::Weights::default();
        KvConf {
            prefill_weight: w.prefill,
            uncached_weight: w.uncached,
            decode_weight: w.decode,
            waiting_weight: w.waiting,
            usage_weight: w.usage,
            load_factor: w.load_factor,
            temperature: w.temperature,
        }
    }
}

impl KvConf {
    /// As the cost function takes them.
    pub fn weights(&self) -> crate::route::kv::Weights {
        crate::route::kv::Weights {
            prefill: self.prefill_weight,
            uncached: self.uncached_weight,
            decode: self.decode_weight,
            waiting: self.waiting_weight,
            usage: self.usage_weight,
            load_factor: self.load_factor,
            temperature: self.temperature,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConf {
    /// Admin listener address.
    pub listen: String,
    /// Bearer token every admin request must carry.
    pub token: String,
}

/// `[[model]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConf {
    /// Served model name.
    pub name: String,
    /// `builtin` or an HF model directory.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// vLLM's `max_model_len`: prompts of this many tokens or more are refused.
    #[serde(default)]
    pub max_model_len: Option<usize>,
    /// A LoRA adapter of this model (its `[[model]]` name): served by that model's engines.
    #[serde(default)]
    pub base: Option<String>,
}

/// Engine role in P/D.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Aggregated.
    #[default]
    Agg,
    /// Prefill.
    Prefill,
    /// Decode.
    Decode,
}

impl Role {
    /// `agg`, `prefill` or `decode`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agg => "agg",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// Engine choice policy inside a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// In turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// Fewest in-flight requests.
    LeastLoaded,
    /// The less loaded of two random engines.
    PowerOfTwo,
    /// Consistent hashing of a session header, with bounded load.
    Session,
    /// KV-aware: the engine holding most of the prompt unless its load outweighs it.
    Kv,
}

/// `[[pool]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConf {
    /// Pool name.
    pub name: String,
    /// Role.
    #[serde(default)]
    pub role: Role,
    /// Policy.
    #[serde(default)]
    pub policy: PolicyKind,
    /// Header for the session policy.
    #[serde(default = "default_session_header")]
    pub session_header: String,
    /// KV block size.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// `kv`: the index segment (default under /dev/shm, named by port and pool).
    #[serde(default)]
    pub index_path: Option<PathBuf>,
    /// `kv`: blocks the index holds.
    #[serde(default = "default_index_capacity")]
    pub index_capacity: usize,
    /// `kv`: cost weights.
    #[serde(default)]
    pub kv: KvConf,
    /// `[[pool.engine]]`.
    #[serde(default)]
    pub engine: Vec<EngineConf>,
}

fn default_session_header() -> String {
    "x-session-id".into()
}

fn default_block_size() -> u32 {
    DEFAULT_BLOCK_SIZE
}

fn default_index_capacity() -> usize {
    1 << 20
}

/// `[[pool.engine]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConf {
    /// `http://host:port`.
    pub url: String,
    /// Model it serves.
    pub model: String,
    /// ZMQ KV-event endpoint.
    #[serde(default)]
    pub kv_events: Option<String>,
    /// ZMQ KV-event replay endpoint.
    #[serde(default)]
    pub kv_replay: Option<String>,
    /// Data-parallel ranks of the engine (vLLM's `data_parallel_size`): rank `r` publishes on
    /// the `kv_events` (and `kv_replay`) port plus `r`.
    #[serde(default = "one")]
    pub dp_ranks: u32,
    /// Topic of its KV events (vLLM's `kv_events_config.topic`; empty: every topic).
    #[serde(default)]
    pub kv_topic: String,
}

impl Default for EngineConf {
    fn default() -> Self {
        EngineConf {
            url: String::new(),
            model: String::new(),
            kv_events: None,
            kv_replay: None,
            dp_ranks: 1,
            kv_topic: String::new(),
        }
    }
}

fn one() -> u32 {
    1
}

/// A config problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML of this shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (names the key and line).
        message: String,
    },
    /// A value is invalid.
    #[error("invalid `{key}`: {problem}")]
    Invalid {
        /// The key, e.g. `pool[0].engine[1].url`.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

/// An engine URL split into what the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineUrl {
    /// The URL as configured, without a trailing slash.
    pub url: String,
    /// `host:port` for the Host header.
    pub authority: String,
    /// Resolved address.
    pub addr: SocketAddr,
}

/// Parses `http://host[:port]` (no path, no TLS) and resolves it.
pub fn parse_engine_url(url: &str) -> Result<EngineUrl, String> {
    let url = url.trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` must start with http:// (TLS to engines is not supported)"))?;
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!("`{url}` must be http://host:port with no path"));
    }
    let addr = resolve_authority(rest)?;
    Ok(EngineUrl { url: url.to_owned(), authority: rest.to_owned(), addr })
}

/// Resolves an `http://` URL's `host[:port]` (port 80 when none is given) to its first address.
pub fn resolve_authority(authority: &str) -> Result<SocketAddr, String> {
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{with_port}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{with_port}` resolves to no address"))
}

/// Settings given on `gantry serve`'s command line. They win over the file's, at start and again
/// after every reload (a reload re-reads only the file).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--workers`.
    pub workers: Option<usize>,
    /// `--driver`.
    pub driver: Option<String>,
    /// `--global-router-config`.
    pub global_router: Option<PathBuf>,
    /// `--policy`: every pool's.
    pub policy: Option<PolicyKind>,
}

impl Overrides {
    /// Sets each given setting in `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(l) = &self.listen {
            cfg.server.listen.clone_from(l);
        }
        if let Some(w) = self.workers {
            cfg.server.workers = w;
        }
        if let Some(d) = &self.driver {
            cfg.server.driver.clone_from(d);
        }
        if let Some(g) = &self.global_router {
            cfg.server.global_router = Some(g.clone());
        }
        if let Some(p) = self.policy {
            for pool in &mut cfg.pool {
                pool.policy = p;
            }
        }
    }
}

impl Config {
    /// Reads and validates a TOML file. Relative paths in it (`server.global_router`, a
    /// `model[].tokenizer` directory, `pool[].index_path`) are taken from the file's folder, so the
    /// file means the same whatever directory the proxy starts in (a systemd unit's is `/`).
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        if let Some(dir) = path.parent() {
            cfg.resolve_paths(dir);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Joins the config's relative paths to `dir` (see [`Config::load`]).
    fn resolve_paths(&mut self, dir: &std::path::Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if let Some(g) = &mut self.server.global_router {
            join(g);
        }
        for m in &mut self.model {
            // `builtin` names the built-in tokenizer, not a folder.
            if let Some(t) = m.tokenizer.as_mut().filter(|t| t.as_os_str() != BUILTIN_TOKENIZER) {
                join(t);
            }
        }
        for p in &mut self.pool {
            if let Some(i) = &mut p.index_path {
                join(i);
            }
        }
    }

    /// One aggregated pool of `engines` serving `model` (the `--engine URL` shortcut).
    pub fn single_pool(model: &str, engines: &[String]) -> Config {
        Config {
            model: vec![ModelConf { name: model.into(), tokenizer: None, max_model_len: None, base: None }],
            pool: vec![PoolConf {
                name: "agg-0".into(),
                role: Role::Agg,
                policy: PolicyKind::RoundRobin,
                session_header: default_session_header(),
                block_size: DEFAULT_BLOCK_SIZE,
                index_path: None,
                index_capacity: default_index_capacity(),
                kv: KvConf::default(),
                engine: engines
                    .iter()
                    .map(|u| EngineConf { url: u.clone(), model: model.into(), ..EngineConf::default() })
                    .collect(),
            }],
            ..Config::default()
        }
    }

    /// Checks every value, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if crate::rt::Driver::parse(&self.server.driver).is_none() {
            return Err(invalid("server.driver", format!("`{}` is not auto, io_uring or legacy", self.server.driver)));
        }
        for (key, v) in [
            ("server.max_body_bytes", self.server.max_body_bytes),
            ("server.max_head_bytes", self.server.max_head_bytes),
            ("server.max_headers", self.server.max_headers),
            ("retry.attempts", self.retry.attempts),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.server.max_headers > crate::http::MAX_HEADERS_CAP {
            return Err(invalid("server.max_headers", format!("at most {}", crate::http::MAX_HEADERS_CAP)));
        }
        for (key, v) in [
            ("server.header_timeout_ms", self.server.header_timeout_ms),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.idle_timeout_ms", self.server.idle_timeout_ms),
            ("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms),
            ("upstream.first_byte_timeout_ms", self.upstream.first_byte_timeout_ms),
            ("upstream.idle_timeout_ms", self.upstream.idle_timeout_ms),
            ("health.timeout_ms", self.health.timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1 ms"));
            }
        }
        if self.health.unhealthy_threshold == 0 || self.health.healthy_threshold == 0 {
            return Err(invalid("health.unhealthy_threshold", "thresholds must be at least 1"));
        }
        if let Some(a) = &self.admin {
            a.listen.parse::<SocketAddr>().map_err(|e| invalid("admin.listen", e.to_string()))?;
            if a.token.len() < 8 {
                return Err(invalid("admin.token", "must be at least 8 characters"));
            }
        }
        if self.model.is_empty() {
            return Err(invalid("model", "at least one [[model]] is required"));
        }
        for (i, m) in self.model.iter().enumerate() {
            if m.name.is_empty() {
                return Err(invalid(format!("model[{i}].name"), "must not be empty"));
            }
            if self.model[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(format!("model[{i}].name"), format!("`{}` is listed twice", m.name)));
            }
            if m.max_model_len == Some(0) {
                return Err(invalid(format!("model[{i}].max_model_len"), "must be at least 1"));
            }
            if let Some(base) = &m.base {
                match self.model.iter().find(|o| &o.name == base) {
                    Some(b) if b.name == m.name => {
                        return Err(invalid(format!("model[{i}].base"), "an adapter cannot be its own base"))
                    }
                    Some(b) if b.base.is_none() => {
                        if let (Some(own), Some(of_base)) = (m.max_model_len, b.max_model_len) {
                            if own > of_base {
                                return Err(invalid(
                                    format!("model[{i}].max_model_len"),
                                    format!("{own} is more than its base model's {of_base}"),
                                ));
                            }
                        }
                    }
                    Some(_) => {
                        return Err(invalid(
                            format!("model[{i}].base"),
                            format!("`{base}` is itself an adapter; name the model it adapts"),
                        ))
                    }
                    None => {
                        return Err(invalid(
                            format!("model[{i}].base"),
                            format!("`{base}` is not a configured [[model]]"),
                        ))
                    }
                }
                if m.tokenizer.is_some() {
                    return Err(invalid(
                        format!("model[{i}].tokenizer"),
                        "a LoRA adapter is tokenized by its base model's tokenizer; drop it",
                    ));
                }
            }
        }
        if self.pool.is_empty() {
            return Err(invalid("pool", "at least one [[pool]] is required"));
        }
        for (i, p) in self.pool.iter().enumerate() {
            if p.name.is_empty() || self.pool[..i].iter().any(|o| o.name == p.name) {
                return Err(invalid(format!("pool[{i}].name"), "must be non-empty and unique"));
            }
            if p.block_size == 0 {
                return Err(invalid(format!("pool[{i}].block_size"), "must be at least 1"));
            }
            if p.index_capacity == 0 || p.index_capacity > 1 << 36 {
                return Err(invalid(format!("pool[{i}].index_capacity"), "must be in 1..=2^36"));
            }
            let k = &p.kv;
            for (key, v) in [
                ("prefill_weight", k.prefill_weight),
                ("uncached_weight", k.uncached_weight),
                ("decode_weight", k.decode_weight),
                ("waiting_weight", k.waiting_weight),
                ("usage_weight", k.usage_weight),
                ("load_factor", k.load_factor),
                ("temperature", k.temperature),
            ] {
                if !v.is_finite() || v < 0.0 {
                    return Err(invalid(
                        format!("pool[{i}].kv.{key}"),
                        format!("must be a finite number ≥ 0 (got {v})"),
                    ));
                }
            }
            if p.role != Role::Agg {
                return Err(invalid(
                    format!("pool[{i}].role"),
                    "prefill/decode pools arrive with P/D orchestration; only `agg` is served today",
                ));
            }
            for (j, e) in p.engine.iter().enumerate() {
                parse_engine_url(&e.url).map_err(|m| invalid(format!("pool[{i}].engine[{j}].url"), m))?;
                match self.model.iter().find(|m| m.name == e.model) {
                    None => {
                        return Err(invalid(
                            format!("pool[{i}].engine[{j}].model"),
                            format!("`{}` is not a configured [[model]]", e.model),
                        ))
                    }
                    Some(ModelConf { base: Some(base), .. }) => {
                        return Err(invalid(
                            format!("pool[{i}].engine[{j}].model"),
                            format!(
                                "`{}` is a LoRA adapter: list its base model `{base}`, whose engines serve it",
                                e.model
                            ),
                        ))
                    }
                    Some(_) => {}
                }
                let max = gantry_kvindex::subscriber::MAX_DP_RANKS;
                if !(1..=max).contains(&e.dp_ranks) {
                    return Err(invalid(
                        format!("pool[{i}].engine[{j}].dp_ranks"),
                        format!("must be in 1..={max} (got {})", e.dp_ranks),
                    ));
                }
                // The last rank's ports must exist.
                for (key, ep) in [("kv_events", &e.kv_events), ("kv_replay", &e.kv_replay)] {
                    if let Some(ep) = ep {
                        gantry_kvindex::subscriber::offset_endpoint(ep, e.dp_ranks - 1)
                            .map_err(|m| invalid(format!("pool[{i}].engine[{j}].{key}"), m))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The client listener address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|e| invalid("server.listen", format!("`{}`: {e}", self.server.listen)))
    }

    /// Server limits as the HTTP layer takes them.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            max_head_bytes: self.server.max_head_bytes,
            max_headers: self.server.max_headers,
            max_body_bytes: self.server.max_body_bytes,
            header_timeout: Duration::from_millis(self.server.header_timeout_ms),
            body_timeout: Duration::from_millis(self.server.body_timeout_ms),
            idle_timeout: Duration::from_millis(self.server.idle_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests;
