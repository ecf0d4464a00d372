//! The step-time model: Dynamo mocker's polynomial fits, divided by `--speedup`.

use std::time::Duration;

/// Default prefill polynomial `a·N² + b·N + c` (ms, N = uncached tokens in the step).
pub const DEFAULT_PREFILL_MS: [f64; 3] = [4.209989e-7, 0.01518344, 16.50142];
/// Default decode polynomial `a·u² + b·u + c` (ms, u = KV usage 0..1).
pub const DEFAULT_DECODE_MS: [f64; 3] = [-25.74, 54.01, 5.74];
/// Default floor of a decode step, ms.
pub const DEFAULT_DECODE_MIN_MS: f64 = 1.0;
/// Default KV bytes per token (Llama-3-8B, bf16: 2 × 32 layers × 8 KV heads × 128 × 2 bytes).
pub const DEFAULT_KV_BYTES_PER_TOKEN: u64 = 131_072;
/// Default KV transfer bandwidth, bytes/s.
pub const DEFAULT_KV_BANDWIDTH: f64 = 64e9;

/// How long engine work takes.
#[derive(Debug, Clone)]
pub struct TimingModel {
    /// Prefill polynomial coefficients `[a, b, c]`, ms.
    pub prefill_ms: [f64; 3],
    /// Decode polynomial coefficients `[a, b, c]`, ms.
    pub decode_ms: [f64; 3],
    /// Floor of a decode step, ms.
    pub decode_min_ms: f64,
    /// KV bytes per token, for P/D transfers.
    pub kv_bytes_per_token: u64,
    /// KV transfer bandwidth, bytes/s.
    pub kv_bandwidth: f64,
    /// Every delay is divided by this; 0 means no delay at all.
    pub speedup: f64,
}

impl Default for TimingModel {
    fn default() -> Self {
        TimingModel {
            prefill_ms: DEFAULT_PREFILL_MS,
            decode_ms: DEFAULT_DECODE_MS,
            decode_min_ms: DEFAULT_DECODE_MIN_MS,
            kv_bytes_per_token: DEFAULT_KV_BYTES_PER_TOKEN,
            kv_bandwidth: DEFAULT_KV_BANDWIDTH,
            speedup: 1.0,
        }
    }
}

impl TimingModel {
    fn scaled(&self, ms: f64) -> Duration {
        if self.speedup <= 0.0 || !ms.is_finite() || ms <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(ms / 1000.0 / self.speedup)
    }

    /// Unscaled prefill time of `tokens` uncached tokens, ms.
    pub fn prefill_ms(&self, tokens: usize) -> f64 {
        let n = tokens as f64;
        let [a, b, c] = self.prefill_ms;
        (a * n * n + b * n + c).max(0.0)
    }

    /// Unscaled decode step time at KV usage `u`, ms.
    pub fn decode_ms(&self, usage: f64) -> f64 {
        let [a, b, c] = self.decode_ms;
        (a * usage * usage + b * usage + c).max(self.decode_min_ms)
    }

    /// Duration of one scheduler step that prefills `prefill_tokens` and decodes for
    /// `decode_reqs` requests at KV usage `usage`: the prefill time plus the decode time, each
    /// counted only if the step has that kind of work.
    pub fn step(&self, prefill_tokens: usize, decode_reqs: usize, usage: f64) -> Duration {
        let mut ms = 0.0;
        if prefill_tokens > 0 {
            ms += self.prefill_ms(prefill_tokens);
        }
        if decode_reqs > 0 {
            ms += self.decode_ms(usage);
        }
        self.scaled(ms)
    }

    /// Time to move the KV of `tokens` tokens between engines.
    pub fn transfer(&self, tokens: usize) -> Duration {
        if self.kv_bandwidth <= 0.0 {
            return Duration::ZERO;
        }
        self.scaled(tokens as f64 * self.kv_bytes_per_token as f64 / self.kv_bandwidth * 1000.0)
    }
}
