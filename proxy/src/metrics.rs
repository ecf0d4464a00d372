//! The proxy's Prometheus metrics (`gantry_*`): atomics written by every worker, rendered on
//! scrape. No lock is taken on the request path.
//!
//! The counters every request touches (histograms, per-engine request counts) are sharded by
//! worker: each worker thread adds to its own cache-line-aligned shard ([`set_worker`]), so cores
//! never contend for a counter line; a scrape sums the shards.

use std::cell::Cell;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::fleet::{now_ms, Fleet};

/// Statuses counted individually; any other lands in the last slot (`other`).
pub const STATUSES: [u16; 12] = [200, 400, 401, 404, 405, 408, 413, 429, 500, 502, 503, 504];
const SLOTS: usize = STATUSES.len() + 1;

fn slot(status: u16) -> usize {
    STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len())
}

/// Counter shards; worker `i` writes shard `i % SHARDS`.
pub const SHARDS: usize = 8;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread (worker `i`) write its own metric shard.
pub fn set_worker(i: usize) {
    SHARD.with(|s| s.set(i % SHARDS));
}

#[inline]
fn shard() -> usize {
    SHARD.with(Cell::get)
}

/// One shard on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

fn slot_label(i: usize) -> String {
    STATUSES.get(i).map_or_else(|| "other".to_owned(), u16::to_string)
}

/// Requests by the status the client got, sharded by worker.
#[derive(Debug, Default)]
pub struct StatusCounts([Padded<[AtomicU64; SLOTS]>; SHARDS]);

impl StatusCounts {
    /// Counts a request answered with `status`.
    pub fn request(&self, status: u16) {
        self.0[shard()].0[slot(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests answered with `status` so far.
    pub fn requests(&self, status: u16) -> u64 {
        self.slot_total(slot(status))
    }

    fn slot_total(&self, slot: usize) -> u64 {
        self.0.iter().map(|s| s.0[slot].load(Ordering::Relaxed)).sum()
    }
}

/// Counters of one engine.
#[derive(Debug, Default)]
pub struct EngineCounters {
    requests: StatusCounts,
    /// Upstream failures (connect, reset, malformed or truncated responses, timeouts).
    pub upstream_errors: AtomicU64,
    /// Attempts moved from this engine to another.
    pub retries: AtomicU64,
    /// Passive or active ejections.
    pub ejections: AtomicU64,
}

impl EngineCounters {
    /// Counts an attempt the engine answered with `status`.
    pub fn request(&self, status: u16) {
        self.requests.request(status);
    }

    /// Attempts answered with `status` so far.
    pub fn requests(&self, status: u16) -> u64 {
        self.requests.requests(status)
    }
}

/// Most bounds a histogram has.
const MAX_BOUNDS: usize = 20;

#[derive(Debug, Default)]
struct HistShard {
    counts: [AtomicU64; MAX_BOUNDS],
    sum_micro: AtomicU64,
    count: AtomicU64,
}

/// A histogram over fixed bounds, in per-worker shards of atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    shards: Box<[Padded<HistShard>]>,
}

impl Histogram {
    /// An empty histogram (at most 20 bounds).
    pub fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.len() <= MAX_BOUNDS, "a histogram has at most {MAX_BOUNDS} bounds");
        Histogram { bounds, shards: (0..SHARDS).map(|_| Padded::default()).collect() }
    }

    /// Records `v` (non-negative).
    pub fn observe(&self, v: f64) {
        let s = &self.shards[shard()].0;
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            s.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        s.sum_micro.fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        s.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.shards.iter().map(|s| s.0.count.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.shards.iter().map(|s| s.0.counts[i].load(Ordering::Relaxed)).sum::<u64>();
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count();
        let sum: u64 = self.shards.iter().map(|s| s.0.sum_micro.load(Ordering::Relaxed)).sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
const ITL_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5];
const DECISION_BUCKETS: &[f64] =
    &[0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.005, 0.025];
const BLOCK_BUCKETS: &[f64] = &[0.0, 1.0, 4.0, 16.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
const TOKEN_BUCKETS: &[f64] =
    &[16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0, 131072.0];

/// Process-wide proxy metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Open client connections.
    pub open_connections: std::sync::Arc<AtomicI64>,
    /// Requests answered by the proxy itself (no engine): by status.
    rejected: [AtomicU64; SLOTS],
    /// Time to first token (first SSE event with content, or the whole response).
    pub ttft: Histogram,
    /// Gaps between SSE token events.
    pub itl: Histogram,
    /// Whole request.
    pub e2e: Histogram,
    /// Prompt tokens (from the engine's usage).
    pub isl: Histogram,
    /// Output tokens.
    pub osl: Histogram,
    /// Streams that ended with an error event because the engine failed mid-stream.
    pub broken_streams: AtomicU64,
    /// Requests whose client went away before the end.
    pub client_aborts: AtomicU64,
    /// `kv` routing: time to tokenize, hash, look up and cost one request.
    pub route_decision: Histogram,
    /// `kv` routing: overlap blocks of the chosen engine.
    pub route_overlap: Histogram,
    /// Requests whose grid-chosen pools do not serve their model, sent to the model's first
    /// aggregated pool instead.
    pub grid_fallbacks: AtomicU64,
}

/// Per-pool routing and demand counters; carried over reloads by pool name.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// `kv` decisions where the chosen engine held part of the prompt.
    pub kv_hit: AtomicU64,
    /// `kv` decisions where no engine held any of it (load and cost alone).
    pub kv_miss: AtomicU64,
    /// `kv` decisions without an index (load only).
    pub load_only: AtomicU64,
    /// Sum of the chosen engines' cost terms, in milli-blocks.
    pub cost_prefill_milli: AtomicU64,
    /// See `cost_prefill_milli`.
    pub cost_decode_milli: AtomicU64,
    /// See `cost_prefill_milli`.
    pub cost_pressure_milli: AtomicU64,
    /// Prompt tokens the router expected the engine to hold (overlap × tokens per hashed block).
    pub predicted_cached_tokens: AtomicU64,
    /// Of the requests whose engine reported `cached_tokens`: what the router predicted.
    pub predicted_cached_tokens_reported: AtomicU64,
    /// `usage.prompt_tokens_details.cached_tokens` the engines reported.
    pub reported_cached_tokens: AtomicU64,
    /// Prompt tokens routed (demand).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens not in the chosen engine's cache by the index (uncached prefill demand).
    pub uncached_prompt_tokens: AtomicU64,
    /// Output tokens relayed (decode demand).
    pub output_tokens: AtomicU64,
    /// Requests whose TTFT exceeded their target.
    pub over_ttft_target: AtomicU64,
    /// Requests whose mean ITL exceeded their target.
    pub over_itl_target: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            open_connections: Default::default(),
            rejected: Default::default(),
            ttft: Histogram::new(LATENCY_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(LATENCY_BUCKETS),
            isl: Histogram::new(TOKEN_BUCKETS),
            osl: Histogram::new(TOKEN_BUCKETS),
            broken_streams: AtomicU64::new(0),
            client_aborts: AtomicU64::new(0),
            route_decision: Histogram::new(DECISION_BUCKETS),
            route_overlap: Histogram::new(BLOCK_BUCKETS),
            grid_fallbacks: AtomicU64::new(0),
        }
    }
}

/// Per-pool routing, accuracy and demand metrics.
fn render_pools(out: &mut String, fleet: &Fleet) {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    type PoolValue = fn(&crate::fleet::Pool, &dyn Fn(&AtomicU64) -> f64) -> f64;
    let rows: [(&str, &str, &str, PoolValue); 13] = [
        ("gantry_route_index_available", "gauge", "1 if the pool's kv index is up (0: load-only routing).", |p, _| {
            f64::from(u8::from(p.index.is_some()))
        }),
        (
            "gantry_route_index_open_failures_total",
            "counter",
            "Times a worker could not open the pool's kv index (it routes on load alone for 5 s).",
            |p, l| p.index.as_ref().map_or(0.0, |i| l(&i.open_failures)),
        ),
        (
            "gantry_route_cost_prefill_blocks_total",
            "counter",
            "Sum of chosen engines' prefill cost term (weighted blocks).",
            |p, l| l(&p.counters.cost_prefill_milli) / 1e3,
        ),
        (
            "gantry_route_cost_decode_blocks_total",
            "counter",
            "Sum of chosen engines' decode cost term (weighted blocks).",
            |p, l| l(&p.counters.cost_decode_milli) / 1e3,
        ),
        (
            "gantry_route_cost_pressure_blocks_total",
            "counter",
            "Sum of chosen engines' pressure cost term (weighted blocks).",
            |p, l| l(&p.counters.cost_pressure_milli) / 1e3,
        ),
        (
            "gantry_route_predicted_cached_tokens_total",
            "counter",
            "Prompt tokens the index said the engine held.",
            |p, l| l(&p.counters.predicted_cached_tokens),
        ),
        (
            "gantry_route_accuracy_predicted_tokens_total",
            "counter",
            "Predicted cached tokens, over requests whose engine reported cached_tokens.",
            |p, l| l(&p.counters.predicted_cached_tokens_reported),
        ),
        (
            "gantry_route_accuracy_reported_tokens_total",
            "counter",
            "usage.prompt_tokens_details.cached_tokens reported by engines.",
            |p, l| l(&p.counters.reported_cached_tokens),
        ),
        ("gantry_pool_prompt_tokens_total", "counter", "Prompt tokens routed to the pool.", |p, l| {
            l(&p.counters.prompt_tokens)
        }),
        ("gantry_pool_uncached_prompt_tokens_total", "counter", "Prefill demand: prompt tokens not cached.", |p, l| {
            l(&p.counters.uncached_prompt_tokens)
        }),
        ("gantry_pool_output_tokens_total", "counter", "Decode demand: output tokens relayed.", |p, l| {
            l(&p.counters.output_tokens)
        }),
        ("gantry_pool_over_ttft_target_total", "counter", "Requests over their TTFT target.", |p, l| {
            l(&p.counters.over_ttft_target)
        }),
        ("gantry_pool_over_itl_target_total", "counter", "Requests over their ITL target.", |p, l| {
            l(&p.counters.over_itl_target)
        }),
    ];
    for (name, kind, help, get) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &fleet.pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", esc(&p.name), get(p, &load));
        }
    }
    let _ = writeln!(
        out,
        "# HELP gantry_route_decisions_total kv routing decisions by outcome.\n# TYPE gantry_route_decisions_total counter"
    );
    for p in &fleet.pools {
        for (outcome, c) in
            [("overlap", &p.counters.kv_hit), ("no_overlap", &p.counters.kv_miss), ("load_only", &p.counters.load_only)]
        {
            let _ = writeln!(
                out,
                "gantry_route_decisions_total{{pool=\"{}\",outcome=\"{outcome}\"}} {}",
                esc(&p.name),
                load(c)
            );
        }
    }
    // Two views of a pool's load, kept apart: the proxy's requests in flight include those the
    // engines report waiting, so a sum would count them twice.
    type EngineValue = fn(&crate::fleet::EngineState) -> u64;
    let pool_gauges: [(&str, &str, EngineValue); 2] = [
        (
            "gantry_pool_queue_depth",
            "Requests waiting in the engines' queues (vllm:num_requests_waiting, scraped; 0 when routing.engine_metrics_interval_ms is 0).",
            |e| e.waiting.load(Ordering::Relaxed),
        ),
        ("gantry_pool_in_flight", "Requests in flight through the proxy (waiting, prefilling or decoding).", |e| e.load()),
    ];
    for (name, help, value) in pool_gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for p in &fleet.pools {
            let v: u64 = p.engines.iter().map(|e| value(e)).sum();
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {v}", esc(&p.name));
        }
    }
}

/// Reads one per-engine value at `now_ms`.
type EngineGauge = fn(&crate::fleet::EngineState, u64) -> f64;

/// One `name{labels,status="..."} n` line per status slot with a count (`total(slot)`).
fn status_lines(out: &mut String, name: &str, labels: &str, total: impl Fn(usize) -> u64) {
    for i in 0..SLOTS {
        let n = total(i);
        if n > 0 {
            let _ = writeln!(out, "{name}{{{labels},status=\"{}\"}} {n}", slot_label(i));
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Counts a request the proxy answered itself.
    pub fn rejected(&self, status: u16) {
        self.rejected[slot(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text for these metrics and `fleet`'s engines.
    pub fn render(&self, fleet: &Fleet) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let now = now_ms();
        let _ = writeln!(out, "# HELP gantry_requests_total Engine answers by the engine's model (a LoRA adapter's under its base), pool, engine and status; answers of the proxy itself with empty labels.\n# TYPE gantry_requests_total counter");
        for (pool, e) in fleet.engines() {
            let labels = format!("model=\"{}\",pool=\"{}\",engine=\"{}\"", esc(&e.model), esc(&pool.name), esc(&e.url));
            status_lines(&mut out, "gantry_requests_total", &labels, |i| e.counters.requests.slot_total(i));
        }
        status_lines(&mut out, "gantry_requests_total", "model=\"\",pool=\"\",engine=\"\"", |i| {
            self.rejected[i].load(Ordering::Relaxed)
        });
        let _ = writeln!(
            out,
            "# HELP gantry_model_requests_total Requests by the model they named (a LoRA adapter by its own name; `base` is the model its engines serve) and the status the client got.\n# TYPE gantry_model_requests_total counter"
        );
        for m in &fleet.model_info {
            let labels = format!("model=\"{}\",base=\"{}\"", esc(&m.name), esc(&m.served_by));
            status_lines(&mut out, "gantry_model_requests_total", &labels, |i| m.requests.slot_total(i));
        }
        let per_engine: [(&str, &str, &str, EngineGauge); 9] = [
            ("gantry_engine_pending_prefill_tokens", "gauge", "Prompt tokens awaiting a first token.", |e, _| {
                e.pending_prefill.load(Ordering::Relaxed) as f64
            }),
            ("gantry_engine_active_blocks", "gauge", "Estimated KV blocks of requests in flight.", |e, _| {
                e.active_blocks.load(Ordering::Relaxed) as f64
            }),
            ("gantry_engine_waiting", "gauge", "Engine-reported vllm:num_requests_waiting (scraped).", |e, _| {
                e.waiting.load(Ordering::Relaxed) as f64
            }),
            ("gantry_engine_kv_usage", "gauge", "Engine-reported vllm:kv_cache_usage_perc (scraped).", |e, _| {
                e.kv_usage_ppm.load(Ordering::Relaxed) as f64 / 1e6
            }),
            ("gantry_engine_in_flight", "gauge", "Requests in flight per engine.", |e, _| e.load() as f64),
            (
                "gantry_engine_healthy",
                "gauge",
                "1 if the engine takes traffic (not probed down, ejected or draining).",
                |e, now| f64::from(u8::from(e.healthy(now))),
            ),
            ("gantry_upstream_errors_total", "counter", "Upstream failures per engine.", |e, _| {
                e.counters.upstream_errors.load(Ordering::Relaxed) as f64
            }),
            ("gantry_retries_total", "counter", "Attempts moved away from an engine.", |e, _| {
                e.counters.retries.load(Ordering::Relaxed) as f64
            }),
            ("gantry_ejections_total", "counter", "Engine ejections (probes or passive).", |e, _| {
                e.counters.ejections.load(Ordering::Relaxed) as f64
            }),
        ];
        for (name, kind, help, get) in per_engine {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (pool, e) in fleet.engines() {
                let _ = writeln!(
                    out,
                    "{name}{{model=\"{}\",pool=\"{}\",engine=\"{}\"}} {}",
                    esc(&e.model),
                    esc(&pool.name),
                    esc(&e.url),
                    get(e, now)
                );
            }
        }
        self.ttft.render(&mut out, "gantry_ttft_seconds", "Time to first token seen by the proxy.");
        self.itl.render(&mut out, "gantry_itl_seconds", "Gap between streamed token events.");
        self.e2e.render(&mut out, "gantry_e2e_seconds", "Request duration seen by the proxy.");
        self.isl.render(&mut out, "gantry_input_tokens", "Prompt tokens per request (engine usage).");
        self.osl.render(&mut out, "gantry_output_tokens", "Output tokens per request.");
        self.route_decision.render(
            &mut out,
            "gantry_route_decision_seconds",
            "kv routing: tokenize + hash + index lookup + cost, per request.",
        );
        self.route_overlap.render(&mut out, "gantry_route_overlap_blocks", "kv routing: overlap of the chosen engine.");
        render_pools(&mut out, fleet);
        for (name, help, v) in [
            (
                "gantry_open_connections",
                "Open client connections.",
                self.open_connections.load(Ordering::Relaxed) as f64,
            ),
            (
                "gantry_broken_streams_total",
                "Streams ended with an error event after the engine failed.",
                self.broken_streams.load(Ordering::Relaxed) as f64,
            ),
            (
                "gantry_client_aborts_total",
                "Requests whose client went away before the end.",
                self.client_aborts.load(Ordering::Relaxed) as f64,
            ),
            (
                "gantry_route_grid_fallbacks_total",
                "Requests whose grid-chosen pools do not serve their model, sent to its first agg pool.",
                self.grid_fallbacks.load(Ordering::Relaxed) as f64,
            ),
        ] {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        out
    }
}
