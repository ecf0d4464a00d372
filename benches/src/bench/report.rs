//! Turning records into figures: [`Summary`] per target, [`Report`] for the run, and the
//! `report.json` / `report.md` files.
//!
//! Every request sent is counted exactly once: `sent = completed + failed`, and `failed` is
//! broken down by kind in `errors_by_kind` with the first message of each kind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use super::client::Records;
use super::scrape::Counters;
use super::stats::{bucket_width, timeline, Bucket, Completion, Dist};

/// What one engine's `/metrics` counters moved by during the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EngineReport {
    /// The URL scraped.
    pub url: String,
    /// Finished requests (`vllm:request_success_total`).
    pub requests: f64,
    /// Prefix-cache hit tokens.
    pub prefix_hits: f64,
    /// Prefix-cache queried tokens.
    pub prefix_queries: f64,
    /// `prefix_hits / prefix_queries` (absent with no queries).
    pub prefix_hit_rate: Option<f64>,
}

/// Every figure about one target.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Target name (`default` outside `compare`).
    pub target: String,
    /// Target URL.
    pub url: String,
    /// Requests sent (= `completed + failed`).
    pub sent: u64,
    /// Same as `sent`.
    pub requests: u64,
    /// Requests answered in full.
    pub completed: u64,
    /// Requests that failed, any kind.
    pub failed: u64,
    /// Same as `failed`.
    pub errors: u64,
    /// Failures by kind (`connect`, `timeout`, `http_NNN`, `bad_response`, `cut`, `stream_error`).
    pub errors_by_kind: BTreeMap<String, u64>,
    /// The first message of each failure kind.
    pub error_samples: BTreeMap<String, String>,
    /// Wall time of the measured run, s.
    pub duration_s: f64,
    /// Completed requests per second.
    pub throughput_rps: f64,
    /// Prompt tokens of completed requests (built-in tokenizer count).
    pub input_tokens: u64,
    /// Generated tokens of completed requests.
    pub output_tokens: u64,
    /// Generated tokens per second.
    pub output_tokens_per_s: f64,
    /// Prompt + generated tokens per second.
    pub total_tokens_per_s: f64,
    /// Time to first token, ms (streaming only).
    pub ttft_ms: Dist,
    /// Gaps between token events, ms (streaming only).
    pub itl_ms: Dist,
    /// Send to last byte, ms.
    pub e2e_ms: Dist,
    /// How late open-loop sends left after their due time, ms (generator health).
    pub schedule_lag_ms: Dist,
    /// Prefix-cache hit rate summed over `--engine-metrics` engines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_hit_rate: Option<f64>,
    /// Completed requests per `x-gantry-engine` value.
    pub requests_per_engine: BTreeMap<String, u64>,
    /// Per-engine `/metrics` deltas (with `--engine-metrics`).
    pub engine_metrics: Vec<EngineReport>,
    /// Per-interval throughput and latency.
    pub timeline: Vec<Bucket>,
    /// Sorted TTFT samples, ms (for the CDF plot; not written).
    #[serde(skip)]
    pub ttft_sorted_ms: Vec<f64>,
}

impl Summary {
    /// Summarises `recs`; `engines` pairs each `--engine-metrics` URL with its counter deltas.
    pub fn new(target: &str, url: &str, recs: &Records, engines: &[(String, Counters)]) -> Summary {
        let mut ttft = Vec::new();
        let mut e2e = Vec::new();
        let mut lag = Vec::new();
        let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_engine: BTreeMap<String, u64> = BTreeMap::new();
        let mut events = Vec::with_capacity(recs.records.len());
        let (mut input_tokens, mut output_tokens, mut completed) = (0u64, 0u64, 0u64);
        for r in &recs.records {
            lag.push((r.start_us - r.scheduled_us) as f64 / 1000.0);
            let e2e_ms = (r.end_us - r.start_us) as f64 / 1000.0;
            let ttft_ms = r.ttft_us.map(|t| (t - r.start_us) as f64 / 1000.0);
            events.push(Completion {
                end_s: r.end_us as f64 / 1e6,
                ok: r.error.is_none(),
                ttft_ms,
                e2e_ms,
                output_tokens: r.output_tokens,
            });
            match r.error {
                Some(kind) => *by_kind.entry(kind.name()).or_default() += 1,
                None => {
                    completed += 1;
                    input_tokens += u64::from(r.input_tokens);
                    output_tokens += u64::from(r.output_tokens);
                    e2e.push(e2e_ms);
                    ttft.extend(ttft_ms);
                    if let Some(e) = r.engine {
                        *per_engine.entry(recs.engines[usize::from(e)].clone()).or_default() += 1;
                    }
                }
            }
        }
        let sent = recs.records.len() as u64;
        let failed = sent - completed;
        let duration_s = recs.wall.as_secs_f64().max(1e-9);
        let engine_metrics: Vec<EngineReport> = engines
            .iter()
            .map(|(url, c)| EngineReport {
                url: url.clone(),
                requests: c.requests,
                prefix_hits: c.prefix_hits,
                prefix_queries: c.prefix_queries,
                prefix_hit_rate: (c.prefix_queries > 0.0).then(|| c.prefix_hits / c.prefix_queries),
            })
            .collect();
        let (hits, queries) =
            engines.iter().fold((0.0, 0.0), |(h, q), (_, c)| (h + c.prefix_hits, q + c.prefix_queries));
        let mut itl = recs.itl_ms.clone();
        let ttft_ms = Dist::of(&mut ttft);
        Summary {
            target: target.to_owned(),
            url: url.to_owned(),
            sent,
            requests: sent,
            completed,
            failed,
            errors: failed,
            errors_by_kind: by_kind,
            error_samples: recs.error_samples.clone(),
            duration_s,
            throughput_rps: completed as f64 / duration_s,
            input_tokens,
            output_tokens,
            output_tokens_per_s: output_tokens as f64 / duration_s,
            total_tokens_per_s: (input_tokens + output_tokens) as f64 / duration_s,
            ttft_ms,
            itl_ms: Dist::of(&mut itl),
            e2e_ms: Dist::of(&mut e2e),
            schedule_lag_ms: Dist::of(&mut lag),
            prefix_hit_rate: (!engines.is_empty() && queries > 0.0).then(|| hits / queries),
            requests_per_engine: per_engine,
            engine_metrics,
            timeline: timeline(&events, duration_s, bucket_width(duration_s)),
            ttft_sorted_ms: ttft,
        }
    }
}

/// One target against the first, as `this / first`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ratio {
    /// The target.
    pub target: String,
    /// The target compared with (the first).
    pub baseline: String,
    /// Ratios of the figures named by the keys.
    pub ratios: BTreeMap<String, f64>,
}

/// The whole run: what was asked, and a summary per target (the first is the baseline).
#[derive(Debug, Clone)]
pub struct Report {
    /// The run's settings, as written to `report.json` under `run`.
    pub run: Value,
    /// One summary per target, in `--target` order.
    pub targets: Vec<Summary>,
    /// Every other target against the first.
    pub ratios: Vec<Ratio>,
}

/// A table row: its label and how to read its figure from a summary.
type Row<T> = (&'static str, fn(&Summary) -> T);
/// A percentile row: its label and how to read it from a distribution.
type Pct = (&'static str, fn(&Dist) -> f64);

/// The figures compared between targets: `(key, value)`.
fn compared(s: &Summary) -> Vec<(&'static str, f64)> {
    let mut v = vec![
        ("throughput_rps", s.throughput_rps),
        ("output_tokens_per_s", s.output_tokens_per_s),
        ("ttft_ms.p50", s.ttft_ms.p50),
        ("ttft_ms.p99", s.ttft_ms.p99),
        ("itl_ms.p50", s.itl_ms.p50),
        ("itl_ms.p99", s.itl_ms.p99),
        ("e2e_ms.p50", s.e2e_ms.p50),
        ("e2e_ms.p99", s.e2e_ms.p99),
    ];
    if let Some(h) = s.prefix_hit_rate {
        v.push(("prefix_hit_rate", h));
    }
    v
}

impl Report {
    /// A report over `targets` (at least one).
    pub fn new(run: Value, targets: Vec<Summary>) -> Report {
        let ratios = match targets.split_first() {
            Some((base, rest)) => rest
                .iter()
                .map(|t| {
                    let b: BTreeMap<_, _> = compared(base).into_iter().collect();
                    let ratios = compared(t)
                        .into_iter()
                        .filter_map(|(k, v)| b.get(k).filter(|bv| **bv != 0.0).map(|bv| (k.to_owned(), v / bv)))
                        .collect();
                    Ratio { target: t.target.clone(), baseline: base.target.clone(), ratios }
                })
                .collect(),
            None => Vec::new(),
        };
        Report { run, targets, ratios }
    }

    /// The first (or only) target's summary.
    pub fn summary(&self) -> &Summary {
        &self.targets[0]
    }

    /// `report.json`: the first target's figures at the top level, then `run`, and with several
    /// targets `targets` (all of them) and `ratios`.
    pub fn to_json(&self) -> Value {
        let mut top = serde_json::to_value(self.summary()).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut top {
            m.insert("run".into(), self.run.clone());
            if self.targets.len() > 1 {
                m.insert("targets".into(), serde_json::to_value(&self.targets).unwrap_or_default());
                m.insert("ratios".into(), serde_json::to_value(&self.ratios).unwrap_or_default());
            }
        }
        top
    }

    /// `report.md`: one table, a column per target (ratios against the first in parentheses).
    pub fn to_markdown(&self) -> String {
        let mut md = String::from("# gantry bench\n\n");
        let mode = self.run.get("mode").and_then(Value::as_str).unwrap_or("");
        let _ =
            writeln!(md, "Mode `{mode}`, model `{}`.\n", self.run.get("model").and_then(Value::as_str).unwrap_or(""));
        md.push_str("| figure |");
        for t in &self.targets {
            let _ = write!(md, " {} |", t.target);
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(self.targets.len()));
        md.push('\n');
        let count_rows: [Row<f64>; 5] = [
            ("requests sent", |s| s.sent as f64),
            ("completed", |s| s.completed as f64),
            ("failed", |s| s.failed as f64),
            ("duration (s)", |s| s.duration_s),
            ("throughput (req/s)", |s| s.throughput_rps),
        ];
        for (name, f) in count_rows {
            self.row(&mut md, name, f, false);
        }
        self.row(&mut md, "output tokens/s", |s| s.output_tokens_per_s, true);
        let dists: [Row<Dist>; 3] = [("TTFT", |s| s.ttft_ms), ("ITL", |s| s.itl_ms), ("e2e", |s| s.e2e_ms)];
        for (name, d) in dists {
            let pcts: [Pct; 4] = [("p50", |d| d.p50), ("p90", |d| d.p90), ("p99", |d| d.p99), ("mean", |d| d.mean)];
            for (p, f) in pcts {
                let label = format!("{name} {p} (ms)");
                self.row_owned(&mut md, &label, |s| f(&d(s)), true);
            }
        }
        if self.targets.iter().any(|t| t.prefix_hit_rate.is_some()) {
            self.row(&mut md, "prefix-cache hit rate", |s| s.prefix_hit_rate.unwrap_or(f64::NAN), true);
        }
        let kinds: std::collections::BTreeSet<&String> =
            self.targets.iter().flat_map(|t| t.errors_by_kind.keys()).collect();
        for k in kinds {
            let label = format!("errors: {k}");
            self.row_owned(&mut md, &label, |s| s.errors_by_kind.get(k).copied().unwrap_or(0) as f64, false);
        }
        for t in &self.targets {
            for (k, msg) in &t.error_samples {
                let _ = writeln!(md, "\n`{}` {k}: {}", t.target, msg.replace('\n', " "));
            }
        }
        md
    }

    fn row(&self, md: &mut String, name: &str, f: fn(&Summary) -> f64, ratio: bool) {
        self.row_owned(md, name, f, ratio);
    }

    fn row_owned(&self, md: &mut String, name: &str, f: impl Fn(&Summary) -> f64, ratio: bool) {
        let _ = write!(md, "| {name} |");
        let base = f(&self.targets[0]);
        for (i, t) in self.targets.iter().enumerate() {
            let v = f(t);
            let shown = if v.is_nan() {
                "–".to_owned()
            } else if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            };
            if ratio && i > 0 && base != 0.0 && !v.is_nan() {
                let _ = write!(md, " {shown} ({:.2}×) |", v / base);
            } else {
                let _ = write!(md, " {shown} |");
            }
        }
        md.push('\n');
    }

    /// Writes `report.json`, `report.md` and the plots into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| format!("writing {}: {e}", p.display()))
        };
        let json = serde_json::to_vec_pretty(&self.to_json()).map_err(|e| format!("encoding report.json: {e}"))?;
        write("report.json", &json)?;
        write("report.md", self.to_markdown().as_bytes())?;
        super::plot::write_all(&self.targets, dir)
    }
}

/// Writes one JSON line per request of `recs` to `path`, in workload order: `index` (the
/// workload's), `scheduled_ms`, `start_ms`, `ttft_ms` (from the start; streaming only), `end_ms`
/// (times from the run's start), `input_tokens`, `output_tokens`, `engine` (its
/// `x-gantry-engine`) and `error` (its kind). For analyses the summary cannot answer, such as what
/// was in flight at each moment.
pub fn write_requests(path: &Path, recs: &super::client::Records) -> Result<(), String> {
    let mut rows: Vec<&super::client::Record> = recs.records.iter().collect();
    rows.sort_by_key(|r| (r.index, r.start_us));
    let ms = |us: u64| us as f64 / 1e3;
    let mut out = String::with_capacity(rows.len() * 160);
    for r in rows {
        let line = json!({
            "index": r.index,
            "scheduled_ms": ms(r.scheduled_us),
            "start_ms": ms(r.start_us),
            "ttft_ms": r.ttft_us.map(|t| ms(t.saturating_sub(r.start_us))),
            "end_ms": ms(r.end_us),
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "engine": r.engine.and_then(|e| recs.engines.get(usize::from(e))),
            "error": r.error.map(|e| e.name()),
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))
}
