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

/// Buckets `(end_s, ok, ttft_ms, e2e_ms, output_tokens)` per completion into intervals of
/// `width_s` seconds covering `0..duration_s`.
pub fn timeline(events: &[(f64, bool, Option<f64>, f64, u32)], duration_s: f64, width_s: f64) -> Vec<Bucket> {
    let n = ((duration_s / width_s).ceil() as usize).max(1);
    let mut groups: Vec<(Vec<f64>, Vec<f64>, u64, u64, u64)> = vec![Default::default(); n];
    for &(end, ok, ttft, e2e, out) in events {
        let g = &mut groups[((end / width_s) as usize).min(n - 1)];
        if ok {
            g.2 += 1;
            g.4 += u64::from(out);
            g.1.push(e2e);
            if let Some(t) = ttft {
                g.0.push(t);
            }
        } else {
            g.3 += 1;
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (mut ttft, mut e2e, ok, failed, out))| Bucket {
            t_s: i as f64 * width_s,
            completed: ok,
            failed,
            rps: ok as f64 / width_s,
            output_tokens_per_s: out as f64 / width_s,
            ttft_p50_ms: Dist::of(&mut ttft).p50,
            e2e_p50_ms: Dist::of(&mut e2e).p50,
        })
        .collect()
}

/// An interval width that gives about 60 buckets: 1 s at least, rounded to whole seconds.
pub fn bucket_width(duration_s: f64) -> f64 {
    (duration_s / 60.0).ceil().max(1.0)
}
