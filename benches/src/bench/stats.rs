//! Exact percentiles from sorted samples (linear interpolation between order statistics, as
//! numpy's default), and the per-interval timeline.

/// Summary of one distribution, in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Dist {
    /// Number of samples.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

impl Dist {
    /// Sorts `samples` and summarises them (all zero when empty).
    pub fn of(samples: &mut [f64]) -> Dist {
        if samples.is_empty() {
            return Dist::default();
        }
        samples.sort_unstable_by(f64::total_cmp);
        let sum: f64 = samples.iter().sum();
        Dist {
            count: samples.len() as u64,
            mean: sum / samples.len() as f64,
            p50: percentile(samples, 50.0),
            p90: percentile(samples, 90.0),
            p99: percentile(samples, 99.0),
            min: samples[0],
            max: samples[samples.len() - 1],
        }
    }
}

/// The `p`th percentile (0..=100) of sorted, non-empty `sorted`, interpolating linearly between
/// the two nearest order statistics.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// One interval of the run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Bucket {
    /// Interval start, seconds from the run start.
    pub t_s: f64,
    /// Requests that completed successfully in it.
    pub completed: u64,
    /// Requests that failed in it.
    pub failed: u64,
    /// Completed requests per second.
    pub rps: f64,
    /// Output tokens per second (of requests completed in it).
    pub output_tokens_per_s: f64,
    /// Median TTFT of requests completed in it, ms (0 when none streamed).
    pub ttft_p50_ms: f64,
    /// Median end-to-end latency of requests completed in it, ms.
    pub e2e_p50_ms: f64,
}

/// One finished request, as the timeline sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Completion {
    /// When it ended, seconds from the run start.
    pub end_s: f64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Its TTFT, ms (streaming only).
    pub ttft_ms: Option<f64>,
    /// Its end-to-end latency, ms.
    pub e2e_ms: f64,
    /// Tokens it generated.
    pub output_tokens: u32,
}

#[derive(Default, Clone)]
struct Acc {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    ok: u64,
    failed: u64,
    tokens: u64,
}

/// Buckets completions by end time into intervals of `width_s` seconds covering
/// `0..duration_s` (later ones land in the last interval).
pub fn timeline(events: &[Completion], duration_s: f64, width_s: f64) -> Vec<Bucket> {
    let n = ((duration_s / width_s).ceil() as usize).max(1);
    let mut groups = vec![Acc::default(); n];
    for e in events {
        let g = &mut groups[((e.end_s / width_s) as usize).min(n - 1)];
        if e.ok {
            g.ok += 1;
            g.tokens += u64::from(e.output_tokens);
            g.e2e.push(e.e2e_ms);
            g.ttft.extend(e.ttft_ms);
        } else {
            g.failed += 1;
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, mut g)| {
            let t_s = i as f64 * width_s;
            // The last interval may be cut short by the end of the run.
            let width = (duration_s - t_s).min(width_s).max(1e-3);
            Bucket {
                t_s,
                completed: g.ok,
                failed: g.failed,
                rps: g.ok as f64 / width,
                output_tokens_per_s: g.tokens as f64 / width,
                ttft_p50_ms: Dist::of(&mut g.ttft).p50,
                e2e_p50_ms: Dist::of(&mut g.e2e).p50,
            }
        })
        .collect()
}

/// An interval width that gives about 60 buckets: 1 s at least, rounded to whole seconds.
pub fn bucket_width(duration_s: f64) -> f64 {
    (duration_s / 60.0).ceil().max(1.0)
}
