//! vLLM's Prometheus metrics, with vLLM 0.33's names, labels and default buckets.

use std::fmt::Write;

/// TTFT buckets (s), vLLM 0.33 defaults.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
/// Inter-token latency buckets (s), vLLM 0.33 defaults.
pub const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// End-to-end latency buckets (s), vLLM 0.33 defaults.
pub const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

/// A cumulative histogram.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (+Inf is implied).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one value.
    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {}", fmt_f(*b), fmt_f(cum as f64));
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", fmt_f(self.count as f64));
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", fmt_f(self.count as f64));
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", fmt_f(self.sum));
    }
}

/// Formats like Python's `float.__repr__` for the values we emit (`1.0`, `0.25`, `1e-05`).
fn fmt_f(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// The engine's counters and histograms.
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Prompt tokens of requests that reached their first token.
    pub prompt_tokens: u64,
    /// Output tokens produced.
    pub generation_tokens: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Finished requests by reason (`stop`, `length`, `abort`, `error`).
    pub success: [(&'static str, u64); 4],
    /// Time to first token.
    pub ttft: Histogram,
    /// Inter-token latency.
    pub itl: Histogram,
    /// End-to-end latency.
    pub e2e: Histogram,
    /// Scheduler steps.
    pub iterations: u64,
    /// Tokens computed across steps.
    pub iteration_tokens: u64,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            prefix_queries: 0,
            prefix_hits: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
            preemptions: 0,
            success: [("stop", 0), ("length", 0), ("abort", 0), ("error", 0)],
            ttft: Histogram::new(TTFT_BUCKETS),
            itl: Histogram::new(ITL_BUCKETS),
            e2e: Histogram::new(E2E_BUCKETS),
            iterations: 0,
            iteration_tokens: 0,
        }
    }
}

impl EngineMetrics {
    /// Counts a finished request.
    pub fn finished(&mut self, reason: &str) {
        if let Some(e) = self.success.iter_mut().find(|(r, _)| *r == reason) {
            e.1 += 1;
        }
    }

    /// Counts a scheduler step.
    pub fn iteration(&mut self, tokens: usize) {
        self.iterations += 1;
        self.iteration_tokens += tokens as u64;
    }
}

/// Gauges read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// KV usage 0..1.
    pub kv_usage: f64,
}

/// Cache configuration, exposed as `vllm:cache_config_info` labels.
#[derive(Debug, Clone)]
pub struct CacheInfo {
    /// Tokens per block.
    pub block_size: usize,
    /// KV blocks.
    pub num_gpu_blocks: usize,
    /// Prefix caching on.
    pub prefix_caching: bool,
    /// Hash algorithm name.
    pub hash_algo: &'static str,
}

/// Renders the Prometheus text exposition of one engine.
pub fn render(model: &str, m: &EngineMetrics, g: &Gauges, cache: &CacheInfo) -> String {
    let labels = format!("engine=\"0\",model_name=\"{}\"", escape(model));
    let mut out = String::with_capacity(8 * 1024);
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {}", fmt_f(v));
    };
    gauge("vllm:num_requests_running", "Number of requests in model execution batches.", g.running as f64);
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", g.waiting as f64);
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", g.kv_usage);
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{{labels}}} {}", fmt_f(v as f64));
    };
    counter(
        "vllm:prefix_cache_queries_total",
        "Prefix cache queries, in terms of number of queried tokens.",
        m.prefix_queries,
    );
    counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", m.prefix_hits);
    counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", m.prompt_tokens);
    counter("vllm:generation_tokens_total", "Number of generation tokens processed.", m.generation_tokens);
    counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.", m.preemptions);
    counter("vllm:iteration_tokens_total_count", "Number of scheduler steps.", m.iterations);
    let _ = writeln!(out, "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter");
    for (reason, n) in &m.success {
        let _ =
            writeln!(out, "vllm:request_success_total{{{labels},finished_reason=\"{reason}\"}} {}", fmt_f(*n as f64));
    }
    m.ttft.render(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Histogram of time to first token in seconds.",
        &labels,
    );
    m.itl.render(&mut out, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", &labels);
    m.e2e.render(&mut out, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", &labels);
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n# TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"auto\",enable_prefix_caching=\"{}\",engine=\"0\",\
         gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"{}\",prefix_caching_hash_algo=\"{}\"}} 1.0",
        cache.block_size,
        if cache.prefix_caching { "True" } else { "False" },
        cache.num_gpu_blocks,
        cache.hash_algo,
    );
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
