//! The request path of `gantry serve`: the OpenAI surface, engine choice, forwarding with
//! retries, and relaying the response (whole or streamed) while measuring it.
//!
//! Bodies go upstream byte for byte; only hop-by-hop headers and Host are rewritten. A request
//! is retried on another engine only while nothing has reached the client (connect refused,
//! reset or timeout before the response head, or a 503). Once a stream has started, an engine
//! failure ends it with vLLM's SSE error event and `data: [DONE]`. A client that goes away
//! drops this future: the upstream connection is closed (the engine aborts the request) and
//! the load charge is released by `Charge`'s destructor.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_tokenizer::EncodeCache;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{HealthConf, PolicyKind, RetryConf, UpstreamConf};
use crate::fleet::{now_ms, EngineState, Fleet, Pool, SharedFleet};
use crate::http::client::ClientConn;
use crate::http::server::{content_length_line, Handler, Request, Responder, Response};
use crate::http::sse::{is_token_event, json_uint_after, SseScanner};
use crate::http::{HttpError, Method, ResponseHead};
use crate::metrics::{Metrics, StatusCounts};
use crate::policy::{pick, PickInput};
use crate::route::grid::{targets_from_body, PoolQuery, Targets};
use crate::route::index::{prediction_ttl, PoolIndex, WorkerIndex};
use crate::route::kv::{self, Candidate, Cost};
use crate::route::prompt::{Endpoint, PromptInput, TEXT_CHUNK_BYTES};

/// Longest ejection after repeated passive failures.
const MAX_EJECT_MS: u64 = 60_000;
/// Largest error body read from an engine before retrying elsewhere.
const MAX_DISCARD_BYTES: usize = 64 * 1024;
/// Most engines one request is tried on.
const MAX_ATTEMPTS: usize = 16;

/// vLLM's error `type` for a status (its error JSON is the OpenAI shape clients expect).
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "UnauthorizedError",
        404 => "NotFoundError",
        405 => "MethodNotAllowedError",
        408 => "RequestTimeoutError",
        409 => "ConflictError",
        413 => "PayloadTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "TooManyRequestsError",
        431 => "RequestHeaderFieldsTooLargeError",
        501 => "NotImplementedError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        s if s >= 500 => "InternalServerError",
        _ => "BadRequestError",
    }
}

/// The body of a vLLM/OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(status: u16, message: &str, param: Option<&str>) -> String {
    serde_json::json!({"error": {"message": message, "type": error_type(status), "param": param, "code": status}})
        .to_string()
}

/// A vLLM/OpenAI-shaped error response.
pub fn error_response(status: u16, message: &str, param: Option<&str>) -> Response {
    Response::json(status, error_body(status, message, param))
}

/// Settings of the request path.
#[derive(Debug, Clone)]
pub struct PathConf {
    /// Upstream timeouts and pooling.
    pub upstream: UpstreamConf,
    /// Retries.
    pub retry: RetryConf,
    /// Passive health.
    pub health: HealthConf,
}

/// The load view's charge for one request on one engine: its in-flight count, its prompt's
/// uncached tokens as pending prefill (released at the first token) and its prompt blocks as
/// active KV blocks, all released when the charge drops (request end, failure or client abort).
struct Charge<'a> {
    e: &'a EngineState,
    prefill: std::cell::Cell<u64>,
    blocks: u64,
}

impl<'a> Charge<'a> {
    fn new(e: &'a EngineState, prefill: u64, blocks: u64) -> Charge<'a> {
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        if prefill > 0 {
            e.pending_prefill.fetch_add(prefill, Ordering::Relaxed);
        }
        if blocks > 0 {
            e.active_blocks.fetch_add(blocks, Ordering::Relaxed);
        }
        Charge { e, prefill: std::cell::Cell::new(prefill), blocks }
    }

    /// The engine produced its first token: the prefill is no longer pending.
    fn first_token(&self) {
        let p = self.prefill.replace(0);
        if p > 0 {
            self.e.pending_prefill.fetch_sub(p, Ordering::Relaxed);
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.first_token();
        if self.blocks > 0 {
            self.e.active_blocks.fetch_sub(self.blocks, Ordering::Relaxed);
        }
        self.e.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A `kv` decision's inputs for one pool: the prompt's blocks, what each engine holds of it,
/// and the load view when it was read. Kept for the request's retries.
struct KvPlan {
    /// Prompt tokens.
    tokens: u64,
    /// Blocks the prompt occupies (the last one partial).
    blocks: u32,
    /// Chained hashes of its full blocks (for predictions).
    hashes: Vec<u64>,
    /// Prompt tokens per hashed block: the pool's block size, or about
    /// [`TEXT_CHUNK_BYTES`]` / 4` for a prompt hashed as text chunks.
    block_tokens: u64,
    /// Whether the hashes are token blocks (as the engines' events are), not text chunks.
    exact: bool,
    /// Per engine (pool order).
    candidates: Vec<Candidate>,
    /// Whether the pool's index answered (else load only).
    indexed: bool,
}

/// The pools a request may try, in order; the common single pool without an allocation.
enum Pools<'f> {
    /// The model's first aggregated pool (none when no pool serves it).
    One(Option<&'f Pool>),
    /// The grid's choice and its priority-retry fallbacks.
    Many(Vec<&'f Pool>),
}

impl<'f> Pools<'f> {
    fn as_slice(&self) -> &[&'f Pool] {
        match self {
            Pools::One(p) => p.as_slice(),
            Pools::Many(v) => v,
        }
    }
}

impl KvPlan {
    /// Prompt tokens engine `idx` holds by the index (its overlap in tokens).
    fn cached_tokens(&self, idx: usize) -> u64 {
        (u64::from(self.candidates[idx].overlap_blocks) * self.block_tokens).min(self.tokens)
    }
}

/// One client request on its way to a pool: its prompt (when routing read it), its latency
/// targets, when it arrived, and the counters of the model it named.
#[derive(Clone, Copy)]
struct Job<'a> {
    input: Option<&'a PromptInput>,
    targets: &'a Targets,
    started: Instant,
    model_requests: &'a StatusCounts,
}

/// What the relay needs to know about the routing of a request.
struct Routed<'a> {
    charge: &'a Charge<'a>,
    /// When the request arrived.
    started: Instant,
    /// The chosen engine's overlap (`kv` only; the `x-gantry-overlap-blocks` header).
    overlap: Option<u32>,
    /// Prompt tokens the router expected the engine to hold (`kv` decisions on token blocks).
    predicted_cached: Option<u64>,
    targets: &'a Targets,
    /// The requested model's counters: the relay counts the status the client gets.
    model_requests: &'a StatusCounts,
}

/// A worker's routing state: tokenizer caches (by served model: adapters share their base's),
/// index readers, scratch space.
#[derive(Default)]
struct RouteWorker {
    caches: Vec<(String, EncodeCache)>,
    indexes: Vec<WorkerIndex>,
    /// Indexes this worker could not open, and when (`now_ms`) to try again.
    unreadable: Vec<(Arc<PoolIndex>, u64)>,
    costs: Vec<f64>,
}

/// How long a worker routes a pool on load alone after failing to open its index.
const INDEX_RETRY_MS: u64 = 5_000;

/// Counts a client abort unless disarmed.
struct AbortWatch<'a> {
    metrics: &'a Metrics,
    done: bool,
}

impl Drop for AbortWatch<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.client_aborts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The fields routing reads; everything else is forwarded untouched.
#[derive(Debug, Deserialize)]
struct Peek<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// One worker's proxy handler. Its upstream connection pool is per worker (no sharing).
pub struct Proxy {
    fleet: SharedFleet,
    /// This worker's handle on the current fleet: requests clone the `Rc` (no atomic on a line
    /// other cores write); it is replaced when a reload swaps the shared fleet.
    #[allow(clippy::redundant_allocation)] // the Rc is the point: a per-worker count
    local_fleet: RefCell<Rc<Arc<Fleet>>>,
    metrics: Arc<Metrics>,
    conf: Arc<PathConf>,
    idle: RefCell<HashMap<SocketAddr, Vec<ClientConn>>>,
    rng: RefCell<fastrand::Rng>,
    routing: RefCell<RouteWorker>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "expect",
];

fn is_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Why an attempt failed before anything reached the client.
enum AttemptError {
    /// Connect, write or read failure, or a malformed head; `timeout` if a timer ran out.
    Upstream { message: String, timeout: bool },
}

impl Proxy {
    /// A handler for one worker.
    pub fn new(fleet: SharedFleet, metrics: Arc<Metrics>, conf: Arc<PathConf>, seed: u64) -> Proxy {
        let local_fleet = RefCell::new(Rc::new(fleet.load_full()));
        Proxy {
            fleet,
            local_fleet,
            metrics,
            conf,
            idle: RefCell::default(),
            rng: RefCell::new(fastrand::Rng::with_seed(seed)),
            routing: RefCell::default(),
        }
    }

    /// The current fleet, through this worker's cache.
    #[allow(clippy::redundant_allocation)] // see `local_fleet`
    fn current_fleet(&self) -> Rc<Arc<Fleet>> {
        let shared = self.fleet.load();
        let mut local = self.local_fleet.borrow_mut();
        if !Arc::ptr_eq(&shared, &local) {
            *local = Rc::new(arc_swap::Guard::into_inner(shared));
        }
        Rc::clone(&local)
    }

    fn passive_failure(&self, e: &EngineState) {
        e.counters.upstream_errors.fetch_add(1, Ordering::Relaxed);
        let n = e.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.conf.health.passive_failures {
            let k = e.ejections.fetch_add(1, Ordering::Relaxed).min(6);
            let dur = (self.conf.health.eject_ms << k).min(MAX_EJECT_MS);
            e.ejected_until.store(now_ms() + dur, Ordering::Relaxed);
            e.passive_failures.store(0, Ordering::Relaxed);
            e.counters.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(engine = %e.url, eject_ms = dur, "engine ejected after {n} failed requests");
        }
    }

    fn passive_success(&self, e: &EngineState) {
        if e.passive_failures.load(Ordering::Relaxed) != 0 {
            e.passive_failures.store(0, Ordering::Relaxed);
        }
        if e.ejections.load(Ordering::Relaxed) != 0 && e.ejected_until.load(Ordering::Relaxed) <= now_ms() {
            e.ejections.store(0, Ordering::Relaxed);
        }
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<ClientConn> {
        self.idle.borrow_mut().get_mut(&addr).and_then(Vec::pop)
    }

    fn put_idle(&self, addr: SocketAddr, conn: ClientConn) {
        if !conn.reusable() {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(addr).or_default();
        if list.len() < self.conf.upstream.max_idle_per_engine {
            list.push(conn);
        }
    }

    fn upstream_head(req: &Request, engine: &EngineState) -> Vec<u8> {
        let mut out = Vec::with_capacity(req.head.raw().len() + 64 + req.body.len());
        out.extend_from_slice(req.head.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(req.head.target().as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(engine.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in req.head.headers().iter() {
            if !is_hop(name) {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
        if !req.body.is_empty() || req.head.method == Method::Post {
            let mut cl = [0u8; 40];
            out.extend_from_slice(content_length_line(&mut cl, req.body.len()));
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&req.body);
        out
    }

    /// Sends the request to `engine` and reads the response head (one retry on a fresh
    /// connection when a pooled one turns out to be closed).
    async fn attempt(&self, engine: &EngineState, wire: &[u8]) -> Result<(ClientConn, ResponseHead), AttemptError> {
        let up = &self.conf.upstream;
        let first_byte = Duration::from_millis(up.first_byte_timeout_ms);
        let mut pooled = self.take_idle(engine.addr);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(c) => c,
                None => ClientConn::connect(engine.addr, Duration::from_millis(up.connect_timeout_ms)).await.map_err(
                    |e| AttemptError::Upstream {
                        message: format!("connect to {}: {e}", engine.url),
                        timeout: e.kind() == std::io::ErrorKind::TimedOut,
                    },
                )?,
            };
            let exchange = async {
                conn.send_raw(wire).await?;
                conn.read_head(false).await
            };
            match monoio::time::timeout(first_byte, exchange).await {
                Ok(Ok(head)) => return Ok((conn, head)),
                Ok(Err(e)) if reused && matches!(e, HttpError::Io(_) | HttpError::UnexpectedEof(_)) => {
                    // The engine closed an idle pooled connection: try once on a fresh one.
                    pooled = self.take_idle(engine.addr);
                }
                Ok(Err(e)) => {
                    return Err(AttemptError::Upstream { message: format!("{}: {e}", engine.url), timeout: false })
                }
                Err(_) => {
                    return Err(AttemptError::Upstream {
                        message: format!("{}: no response head within {first_byte:?}", engine.url),
                        timeout: true,
                    })
                }
            }
        }
    }

    /// Refuses a request before routing, as vLLM would.
    async fn refuse(&self, resp: &mut Responder, status: u16, message: &str, param: Option<&str>) {
        self.metrics.rejected(status);
        let _ = resp.send(error_response(status, message, param)).await;
    }

    /// Whether routing reads the prompt (a grid picks pools, or a pool is `kv`).
    fn routes_on_prompt(fleet: &Fleet) -> bool {
        fleet.router.is_some() || fleet.pools.iter().any(|p| p.policy == PolicyKind::Kv)
    }

    /// Routes a request. `body` is the parsed body when routing reads the prompt
    /// ([`Proxy::routes_on_prompt`] and an OpenAI generation endpoint).
    #[allow(clippy::redundant_allocation)] // see `local_fleet`
    async fn route(
        &self,
        fleet: Rc<Arc<Fleet>>,
        req: &Request,
        resp: &mut Responder,
        model: Option<&str>,
        endpoint: Option<Endpoint>,
        body: Option<&Value>,
    ) {
        let started = Instant::now();
        let model = match model {
            Some(m) => m,
            None => fleet.models.first().map_or("", String::as_str),
        };
        let Some(info) = fleet.model(model) else {
            return self.refuse(resp, 404, &format!("The model `{model}` does not exist."), Some("model")).await;
        };
        let mut targets = Targets::default();
        let mut input: Option<PromptInput> = None;
        if let (Some(ep), Some(body)) = (endpoint, body) {
            targets = match targets_from_body(body) {
                // A request without a target is held to the default one (as the grid is).
                Ok(t) => Targets {
                    ttft_target_ms: t.ttft_target_ms.or(fleet.default_targets.ttft_ms),
                    itl_target_ms: t.itl_target_ms.or(fleet.default_targets.itl_ms),
                    ..t
                },
                Err(bad) => {
                    info.requests.request(400);
                    return self.refuse(resp, 400, &bad.message, Some(&bad.param)).await;
                }
            };
            let read = {
                let mut routing = self.routing.borrow_mut();
                let caches = &mut routing.caches;
                // One cache per tokenizer: a LoRA adapter shares its base model's.
                let at = match caches.iter().position(|(m, _)| *m == info.served_by) {
                    Some(i) => i,
                    None => {
                        caches.push((info.served_by.clone(), EncodeCache::default()));
                        caches.len() - 1
                    }
                };
                PromptInput::read(
                    body,
                    ep,
                    info.tokenizer.as_deref(),
                    &mut caches[at].1,
                    info.context_len(),
                    info.lora.as_deref(),
                )
            };
            match read {
                Ok(p) => input = Some(p),
                Err(bad) => {
                    info.requests.request(400);
                    return self.refuse(resp, 400, &bad.message, bad.param).await;
                }
            }
        }
        // A LoRA adapter is served by its base model's engines.
        let chosen = self.choose_pools(&fleet, &info.served_by, input.as_ref(), &targets);
        let pools = chosen.as_slice();
        if pools.is_empty() {
            info.requests.request(503);
            return self.refuse(resp, 503, &format!("no engine serves model `{model}`"), None).await;
        }
        let mut watch = AbortWatch { metrics: &self.metrics, done: false };
        let mut last = (String::from("no engine available"), false);
        for pool in pools {
            let job = Job { input: input.as_ref(), targets: &targets, started, model_requests: &info.requests };
            match self.serve_in_pool(req, resp, pool, &job).await {
                Ok(()) => {
                    watch.done = true;
                    return;
                }
                Err(e) => last = e,
            }
        }
        let (last_error, last_timeout) = last;
        let pool = pools[pools.len() - 1];
        let status = if last_timeout { 504 } else { 502 };
        self.metrics.rejected(status);
        info.requests.request(status);
        let msg = format!("no engine of pool `{}` could serve the request: {last_error}", pool.name);
        let _ = resp.send(error_response(status, &msg, None).header("x-gantry-pool", pool.name.clone())).await;
        watch.done = true;
    }

    /// The pools to try, in order: the global router's grid choice (then faster pools when its
    /// priority retry is on), or the first aggregated pool serving `model`.
    fn choose_pools<'f>(
        &self,
        fleet: &'f Fleet,
        model: &str,
        input: Option<&PromptInput>,
        targets: &Targets,
    ) -> Pools<'f> {
        let serves = |p: &&Pool| p.engines.iter().any(|e| e.model == model);
        let mut grid_missed = None;
        if let (Some(g), Some(input)) = (&fleet.router, input) {
            let q = PoolQuery::new(u32::try_from(input.tokens()).unwrap_or(u32::MAX), targets);
            if let Some(first) = g.select_agg(&q) {
                let pools: Vec<&Pool> = g
                    .fallback_order(&first)
                    .iter()
                    .filter_map(|c| fleet.pools.iter().find(|p| p.name == c.namespace))
                    .filter(serves)
                    .collect();
                if !pools.is_empty() {
                    return Pools::Many(pools);
                }
                grid_missed = Some(first.namespace);
            }
        }
        let fallback = fleet.pool_for(model);
        if let (Some(grid_pool), Some(pool)) = (grid_missed, fallback) {
            // Counted, and logged at the 1st, 2nd, 4th, 8th… time: a misconfigured grid shows
            // without flooding the log.
            let n = self.metrics.grid_fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    model,
                    grid_pool,
                    pool = %pool.name,
                    fallbacks = n,
                    "the grid's pools do not serve this model: using its first agg pool"
                );
            }
        }
        Pools::One(fallback)
    }

    /// Opens this worker's reader of `index` (a pool's first request here, or the first after a
    /// reload replaced its index) and keeps it; after a failure, tries again only once
    /// [`INDEX_RETRY_MS`] have passed (the pool routes on load alone meanwhile).
    fn open_index(routing: &mut RouteWorker, pool: &Pool, index: &Arc<PoolIndex>) -> Option<usize> {
        let now = now_ms();
        if routing.unreadable.iter().any(|(i, until)| Arc::ptr_eq(i, index) && now < *until) {
            return None;
        }
        routing.unreadable.retain(|(i, _)| !Arc::ptr_eq(i, index) && Arc::strong_count(i) > 1);
        match WorkerIndex::open(index) {
            Ok(w) => {
                routing.indexes.retain(|w| Arc::strong_count(&w.index) > 1);
                routing.indexes.push(w);
                Some(routing.indexes.len() - 1)
            }
            Err(e) => {
                index.open_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(pool = %pool.name, error = %e, retry_ms = INDEX_RETRY_MS, "kv index unreadable by this worker: routing on load alone");
                routing.unreadable.push((Arc::clone(index), now + INDEX_RETRY_MS));
                None
            }
        }
    }

    /// Reads the index and the load view for a `kv` pool.
    fn plan(&self, pool: &Pool, input: &PromptInput) -> KvPlan {
        let seed = pool.index.as_ref().map_or(gantry_kvindex::hash::DEFAULT_SEED, |i| i.seed);
        let prompt = input.hash(pool.block_size, seed);
        let mut candidates = Vec::with_capacity(pool.engines.len());
        let mut indexed = false;
        if let Some(index) = &pool.index {
            let mut routing = self.routing.borrow_mut();
            let at = match routing.indexes.iter().position(|w| Arc::ptr_eq(&w.index, index)) {
                Some(i) => Some(i),
                None => Self::open_index(&mut routing, pool, index),
            };
            if let Some(at) = at {
                let w = &mut routing.indexes[at];
                w.reader.overlaps(&prompt.hashes, &mut w.overlaps);
                kv::fill_candidates(
                    pool.engines.iter().map(|e| &**e),
                    &pool.by_slot,
                    w.overlaps.as_slice(),
                    &mut candidates,
                );
                indexed = true;
            }
        }
        if !indexed {
            kv::fill_candidates(pool.engines.iter().map(|e| &**e), &pool.by_slot, &[], &mut candidates);
        }
        let block_tokens = if prompt.exact { u64::from(pool.block_size.max(1)) } else { (TEXT_CHUNK_BYTES / 4) as u64 };
        let tokens = prompt.tokens as u64;
        KvPlan {
            tokens,
            // In the units of the overlap: token blocks, or text chunks.
            blocks: u32::try_from(tokens.div_ceil(block_tokens)).unwrap_or(u32::MAX),
            hashes: prompt.hashes,
            block_tokens,
            exact: prompt.exact,
            candidates,
            indexed,
        }
    }

    /// The `kv` choice among engines not tried yet: healthy ones first, else any not draining.
    fn kv_pick(&self, pool: &Pool, plan: &KvPlan, tried: &[usize], now: u64) -> Option<usize> {
        let mut routing = self.routing.borrow_mut();
        let mut rng = self.rng.borrow_mut();
        let e = &pool.engines;
        let open = |i: usize| !tried.contains(&i) && !e[i].draining.load(Ordering::Relaxed);
        let (bs, w) = (pool.block_size, &pool.kv);
        kv::choose(&plan.candidates, |i| open(i) && e[i].healthy(now), plan.blocks, bs, w, &mut rng, &mut routing.costs)
            .or_else(|| kv::choose(&plan.candidates, open, plan.blocks, bs, w, &mut rng, &mut routing.costs))
    }

    /// Tries the engines of `pool` for the request; Ok once a response went to the client (counted
    /// for the model it named, with the status the client got, before it goes), else the last
    /// error and whether it was a timeout.
    async fn serve_in_pool(
        &self,
        req: &Request,
        resp: &mut Responder,
        pool: &Pool,
        job: &Job<'_>,
    ) -> Result<(), (String, bool)> {
        let Job { input, targets, started, model_requests } = *job;
        let plan = match input {
            Some(p) if pool.policy == PolicyKind::Kv => Some(self.plan(pool, p)),
            _ => None,
        };
        let session = req.head.headers().get(&pool.session_header);
        let mut tried = [0usize; MAX_ATTEMPTS];
        let mut last_error = String::from("no engine available");
        let mut last_timeout = false;
        let attempts = self.conf.retry.attempts.min(pool.engines.len().max(1)).min(MAX_ATTEMPTS);
        for attempt in 0..attempts {
            let now = now_ms();
            let idx = match &plan {
                Some(plan) => self.kv_pick(pool, plan, &tried[..attempt], now),
                None => {
                    let pick_in = PickInput { tried: &tried[..attempt], session, now };
                    pick(pool, &pick_in, &mut self.rng.borrow_mut())
                }
            };
            let Some(idx) = idx else { break };
            tried[attempt] = idx;
            let engine = &pool.engines[idx];
            let (charge, overlap) = match &plan {
                Some(plan) => {
                    if attempt == 0 {
                        self.metrics.route_decision.observe(started.elapsed().as_secs_f64());
                    }
                    let o = plan.candidates[idx].overlap_blocks;
                    let cached = plan.cached_tokens(idx);
                    if let (Some(index), Some(slot)) = (&pool.index, pool.slots[idx]) {
                        let ttl = prediction_ttl(pool.events[idx], plan.exact);
                        index.predictor.predict_for(slot, &plan.hashes, ttl);
                    }
                    // Active blocks: the request's whole KV footprint while it runs (what its
                    // decode steps read), cached prefix included.
                    (Charge::new(engine, plan.tokens - cached, u64::from(plan.blocks)), Some(o))
                }
                None => (Charge::new(engine, 0, 0), None),
            };
            let wire = Self::upstream_head(req, engine);
            match self.attempt(engine, &wire).await {
                Ok((mut conn, head)) => {
                    if head.status == 503 && attempt + 1 < attempts {
                        // Admission control: try another engine; the client has seen nothing.
                        // Read the (small) error body so the connection can be reused; a large
                        // or slow one just makes the connection unusable.
                        if head
                            .headers()
                            .get_str("content-length")
                            .and_then(|v| v.parse::<usize>().ok())
                            .is_some_and(|n| n <= MAX_DISCARD_BYTES)
                        {
                            let _ = monoio::time::timeout(Duration::from_secs(5), conn.read_body()).await;
                        }
                        self.passive_failure(engine);
                        engine.counters.retries.fetch_add(1, Ordering::Relaxed);
                        engine.counters.request(503);
                        last_error = format!("{} answered 503", engine.url);
                        last_timeout = false;
                        self.put_idle(engine.addr, conn);
                        continue;
                    }
                    if head.status >= 500 {
                        self.passive_failure(engine);
                    } else {
                        self.passive_success(engine);
                    }
                    engine.counters.request(head.status);
                    if let Some(plan) = &plan {
                        self.count_decision(pool, plan, idx);
                    }
                    // Predictions over text chunks are estimates: routing accuracy is measured
                    // on token blocks only.
                    let predicted_cached = plan.as_ref().filter(|p| p.exact).map(|plan| plan.cached_tokens(idx));
                    let routed =
                        Routed { charge: &charge, started, overlap, predicted_cached, targets, model_requests };
                    let usage = self.relay(conn, head, resp, pool, engine, &routed).await;
                    if plan.is_none() {
                        // A `kv` decision counted its demand above.
                        Self::count_demand(pool, usage, input.map(|p| p.tokens() as u64));
                    }
                    drop(charge);
                    return Ok(());
                }
                Err(AttemptError::Upstream { message, timeout }) => {
                    tracing::debug!(error = %message, "upstream attempt failed");
                    self.passive_failure(engine);
                    if attempt + 1 < attempts {
                        engine.counters.retries.fetch_add(1, Ordering::Relaxed);
                    }
                    last_error = message;
                    last_timeout = timeout;
                }
            }
        }
        Err((last_error, last_timeout))
    }

    /// Routing and demand counters for a served `kv` decision.
    fn count_decision(&self, pool: &Pool, plan: &KvPlan, idx: usize) {
        let c = &pool.counters;
        let chosen = &plan.candidates[idx];
        let outcome = match (plan.indexed, chosen.overlap_blocks) {
            (false, _) => &c.load_only,
            (true, 0) => &c.kv_miss,
            (true, _) => &c.kv_hit,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        self.metrics.route_overlap.observe(f64::from(chosen.overlap_blocks));
        let cost: Cost = kv::cost(chosen, plan.blocks, pool.block_size, &pool.kv);
        let milli = |v: f64| (v.max(0.0) * 1e3) as u64;
        c.cost_prefill_milli.fetch_add(milli(cost.prefill), Ordering::Relaxed);
        c.cost_decode_milli.fetch_add(milli(cost.decode), Ordering::Relaxed);
        c.cost_pressure_milli.fetch_add(milli(cost.pressure), Ordering::Relaxed);
        let cached = plan.cached_tokens(idx);
        c.predicted_cached_tokens.fetch_add(cached, Ordering::Relaxed);
        c.prompt_tokens.fetch_add(plan.tokens, Ordering::Relaxed);
        c.uncached_prompt_tokens.fetch_add(plan.tokens - cached, Ordering::Relaxed);
    }

    /// Prefill demand of a request served by a pool that is not `kv`, once its response ended
    /// (whatever its status, as `kv` decisions are counted): the prompt tokens the engine reported
    /// less those it reported cached, else the prompt as routing read it (all uncached).
    fn count_demand(pool: &Pool, usage: Usage, read: Option<u64>) {
        if let Some(prompt) = usage.prompt.or(read) {
            let c = &pool.counters;
            c.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
            let cached = usage.cached.unwrap_or(0).min(prompt);
            c.uncached_prompt_tokens.fetch_add(prompt - cached, Ordering::Relaxed);
        }
    }

    /// Usage the engine reported, against what routing predicted and the request's targets.
    fn record_outcome(&self, pool: &Pool, routed: &Routed<'_>, usage: Usage, ttft: Option<f64>, mean_itl: Option<f64>) {
        let c = &pool.counters;
        if let Some(i) = usage.prompt {
            self.metrics.isl.observe(i as f64);
        }
        if let Some(o) = usage.completion {
            self.metrics.osl.observe(o as f64);
            c.output_tokens.fetch_add(o, Ordering::Relaxed);
        }
        if let (Some(p), Some(r)) = (routed.predicted_cached, usage.cached) {
            c.predicted_cached_tokens_reported.fetch_add(p, Ordering::Relaxed);
            c.reported_cached_tokens.fetch_add(r, Ordering::Relaxed);
        }
        if let (Some(t), Some(target)) = (ttft, routed.targets.ttft_target_ms) {
            if t * 1e3 > target {
                c.over_ttft_target.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(t), Some(target)) = (mean_itl, routed.targets.itl_target_ms) {
            if t * 1e3 > target {
                c.over_itl_target.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The client's response header lines, in wire form: the engine's end-to-end headers as
    /// they came, then where the request went. One allocation.
    fn response_lines(head: &ResponseHead, pool: &Pool, engine: &EngineState, overlap: Option<u32>) -> Vec<u8> {
        let mut out = Vec::with_capacity(head.raw().len() + pool.name.len() + engine.url.len() + 40);
        for (name, value) in head.headers().iter() {
            if !is_hop(name) {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"x-gantry-pool: ");
        out.extend_from_slice(pool.name.as_bytes());
        out.extend_from_slice(b"\r\nx-gantry-engine: ");
        out.extend_from_slice(engine.url.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(o) = overlap {
            out.extend_from_slice(b"x-gantry-overlap-blocks: ");
            out.extend_from_slice(o.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    async fn relay(
        &self,
        mut conn: ClientConn,
        head: ResponseHead,
        resp: &mut Responder,
        pool: &Pool,
        engine: &EngineState,
        routed: &Routed<'_>,
    ) -> Usage {
        let started = routed.started;
        let lines = Self::response_lines(&head, pool, engine, routed.overlap);
        let chunked_or_close = head.headers().get("content-length").is_none();
        let is_sse = head.headers().get_str("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        let idle = Duration::from_millis(self.conf.upstream.idle_timeout_ms);
        if !chunked_or_close && !is_sse {
            let mut usage = Usage::default();
            match monoio::time::timeout(idle, conn.read_body()).await {
                Ok(Ok(body)) => {
                    routed.charge.first_token();
                    let elapsed = started.elapsed().as_secs_f64();
                    self.metrics.ttft.observe(elapsed);
                    self.metrics.e2e.observe(elapsed);
                    if head.status == 200 {
                        usage = Usage::scan(&body);
                        self.record_outcome(pool, routed, usage, Some(elapsed), None);
                    }
                    routed.model_requests.request(head.status);
                    if resp.send_raw(head.status, &lines, &body).await.is_ok() {
                        self.put_idle(engine.addr, conn);
                    }
                }
                Ok(Err(e)) => {
                    self.passive_failure(engine);
                    routed.model_requests.request(502);
                    let _ = resp.send(error_response(502, &format!("engine {}: {e}", engine.url), None)).await;
                }
                Err(_) => {
                    self.passive_failure(engine);
                    routed.model_requests.request(504);
                    let _ =
                        resp.send(error_response(504, &format!("engine {}: body timed out", engine.url), None)).await;
                }
            }
            return usage;
        }
        // The engine's head goes to the client as it is, whatever the body does next.
        routed.model_requests.request(head.status);
        // Keep the engine's framing: a sized body stays sized (no re-chunking).
        let sized = if chunked_or_close {
            None
        } else {
            head.headers().get_str("content-length").and_then(|v| v.parse::<u64>().ok())
        };
        if resp.start_stream_raw(head.status, &lines, sized).await.is_err() {
            return Usage::default();
        }
        conn.stream_reads(crate::http::STREAM_READ_RESERVE);
        let mut scanner = is_sse.then(SseScanner::new);
        let mut first_token: Option<Instant> = None;
        let mut last_token: Option<Instant> = None;
        let mut tokens = 0u64;
        let mut usage: Option<Usage> = None;
        loop {
            match monoio::time::timeout(idle, conn.read_chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    if let Some(sc) = scanner.as_mut() {
                        let now = Instant::now();
                        sc.feed(&chunk, |ev| {
                            if is_token_event(ev) {
                                tokens += 1;
                                match last_token {
                                    None => {
                                        first_token = Some(now);
                                        routed.charge.first_token();
                                    }
                                    Some(t) => self.metrics.itl.observe(now.duration_since(t).as_secs_f64()),
                                }
                                last_token = Some(now);
                            } else if memchr::memmem::find(ev, b"\"usage\":{").is_some() {
                                usage = Some(Usage::scan(ev));
                            }
                        });
                    }
                    if resp.send_chunk(&chunk).await.is_err() {
                        return usage.unwrap_or_default();
                    }
                }
                Ok(Ok(None)) => {
                    if resp.end_stream().await.is_ok() {
                        self.put_idle(engine.addr, conn);
                    }
                    break;
                }
                Ok(Err(_)) | Err(_) => {
                    // The engine failed mid-stream: end the stream as vLLM does, never hang. A
                    // sized body cannot take extra bytes, so that connection is closed instead.
                    self.passive_failure(engine);
                    self.metrics.broken_streams.fetch_add(1, Ordering::Relaxed);
                    if is_sse && sized.is_none() {
                        let err = error_response(502, &format!("engine {} failed mid-stream", engine.url), None);
                        let mut ev = Vec::with_capacity(err.body.len() + 32);
                        ev.extend_from_slice(b"data: ");
                        ev.extend_from_slice(&err.body);
                        ev.extend_from_slice(b"\n\ndata: [DONE]\n\n");
                        let _ = resp.send_chunk(&ev).await;
                        let _ = resp.end_stream().await;
                    } else {
                        resp.abort();
                    }
                    break;
                }
            }
        }
        let ttft = first_token.map(|t| t.duration_since(started).as_secs_f64());
        if let Some(t) = ttft {
            self.metrics.ttft.observe(t);
        }
        self.metrics.e2e.observe(started.elapsed().as_secs_f64());
        let mean_itl = match (first_token, last_token) {
            (Some(f), Some(l)) if tokens > 1 => Some(l.duration_since(f).as_secs_f64() / (tokens - 1) as f64),
            _ => None,
        };
        let mut usage = usage.unwrap_or_default();
        if usage.completion.is_none() && tokens > 0 {
            usage.completion = Some(tokens);
        }
        self.record_outcome(pool, routed, usage, ttft, mean_itl);
        usage
    }

    fn models(fleet: &Fleet) -> Response {
        let data: Vec<serde_json::Value> = fleet
            .models
            .iter()
            .map(|m| {
                // A LoRA adapter names its base model, as vLLM's model list does.
                let parent = fleet.model(m).and_then(|i| i.lora.as_ref().map(|_| i.served_by.as_str()));
                serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "gantry", "parent": parent})
            })
            .collect();
        Response::json(200, serde_json::json!({"object": "list", "data": data}).to_string())
    }

    fn health(fleet: &Fleet) -> Response {
        let now = now_ms();
        let missing: Vec<&str> = fleet
            .models
            .iter()
            .filter(|m| {
                let served_by = fleet.model(m).map_or(m.as_str(), |i| i.served_by.as_str());
                !fleet.engines().any(|(_, e)| e.model == served_by && e.healthy(now))
            })
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            Response::new(200)
        } else {
            error_response(503, &format!("no healthy engine for: {}", missing.join(", ")), None)
        }
    }
}

/// Token counts from an OpenAI `usage` object, found by scanning (the body is forwarded as is).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    prompt: Option<u64>,
    completion: Option<u64>,
    /// `prompt_tokens_details.cached_tokens`.
    cached: Option<u64>,
}

impl Usage {
    fn scan(json: &[u8]) -> Usage {
        let Some(at) = memchr::memmem::find(json, b"\"usage\":{") else { return Usage::default() };
        let usage = &json[at..];
        Usage {
            prompt: json_uint_after(usage, b"\"prompt_tokens\":"),
            completion: json_uint_after(usage, b"\"completion_tokens\":"),
            cached: json_uint_after(usage, b"\"cached_tokens\":"),
        }
    }
}

const ROUTED: &[&str] = &["/v1/chat/completions", "/v1/completions"];

impl Handler for Proxy {
    async fn handle(&self, req: Request, resp: &mut Responder) {
        let path = req.head.path();
        let method = &req.head.method;
        let (get, post) = (matches!(method, Method::Get | Method::Head), *method == Method::Post);
        match path {
            "/v1/models" if get => {
                let _ = resp.send(Self::models(&self.fleet.load())).await;
            }
            "/health" if get => {
                let _ = resp.send(Self::health(&self.fleet.load())).await;
            }
            "/metrics" if get => {
                let text = self.metrics.render(&self.fleet.load());
                let r =
                    Response::new(200).header("content-type", "text/plain; version=0.0.4; charset=utf-8").body(text);
                let _ = resp.send(r).await;
            }
            "/version" if get => {
                let v = serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "name": "gantry"});
                let _ = resp.send(Response::json(200, v.to_string())).await;
            }
            "/v1/load_lora_adapter" | "/v1/unload_lora_adapter" => {
                // Sent on, it would reach one engine of the fleet, which would then disagree with
                // the others and with the proxy's models.
                self.metrics.rejected(501);
                let msg = format!(
                    "{path}: runtime LoRA changes through the proxy are not supported; declare the adapter as a \
                     [[model]] with `base` and start the base model's engines with --lora-modules"
                );
                let _ = resp.send(error_response(501, &msg, None)).await;
            }
            p if post && (ROUTED.contains(&p) || p.starts_with("/v1/") || p == "/tokenize" || p == "/detokenize") => {
                let endpoint = match p {
                    "/v1/chat/completions" => Some(Endpoint::Chat),
                    "/v1/completions" => Some(Endpoint::Completions),
                    _ => None,
                };
                let fleet = self.current_fleet();
                // A grid or a `kv` pool routes on the prompt: the body is parsed once, whole.
                if endpoint.is_some() && Self::routes_on_prompt(&fleet) {
                    let body: Value = match serde_json::from_slice(&req.body) {
                        Ok(v) => v,
                        Err(e) => return self.refuse(resp, 400, &format!("Invalid JSON body: {e}"), None).await,
                    };
                    let model = match body.get("model") {
                        Some(Value::String(m)) => m.as_str(),
                        None | Some(Value::Null) => {
                            return self.refuse(resp, 400, "Field required: `model`", Some("model")).await
                        }
                        Some(other) => {
                            let msg = format!("Invalid JSON body: `model` must be a string, got {other}");
                            return self.refuse(resp, 400, &msg, Some("model")).await;
                        }
                    };
                    return self.route(fleet, &req, resp, Some(model), endpoint, Some(&body)).await;
                }
                let peek: Result<Peek<'_>, _> = serde_json::from_slice(&req.body);
                let model = match peek {
                    Ok(Peek { model: Some(m), .. }) => Some(m),
                    Ok(Peek { model: None, .. }) if ROUTED.contains(&p) => {
                        return self.refuse(resp, 400, "Field required: `model`", Some("model")).await
                    }
                    Ok(_) => None,
                    Err(e) if ROUTED.contains(&p) || !req.body.is_empty() => {
                        return self.refuse(resp, 400, &format!("Invalid JSON body: {e}"), None).await
                    }
                    Err(_) => None,
                };
                self.route(fleet, &req, resp, model.as_deref(), endpoint, None).await;
            }
            "/v1/models"
            | "/health"
            | "/metrics"
            | "/version"
            | "/v1/chat/completions"
            | "/v1/completions"
            | "/tokenize"
            | "/detokenize" => {
                self.metrics.rejected(405);
                let _ = resp
                    .send(error_response(405, &format!("method {} not allowed on {path}", method.as_str()), None))
                    .await;
            }
            _ => {
                self.metrics.rejected(404);
                let _ = resp.send(error_response(404, &format!("no route for {} {path}", method.as_str()), None)).await;
            }
        }
    }

    fn error_response(&self, status: u16, message: &str) -> Response {
        self.metrics.rejected(status);
        error_response(status, message, None)
    }
}
