//! What to send: synthetic prompts with controlled lengths and shared prefixes, or a trace's
//! records expanded into text block by block.
//!
//! All text is made of the built-in tokenizer's words, each with a leading space (`" bado"`),
//! so under `gantry mock`'s built-in tokenizer **one word is exactly one token**; under a real
//! tokenizer a word is one to three tokens. A trace block (one Mooncake `hash_id`) expands to
//! [`DEFAULT_BLOCK_TOKENS`] × `--token-scale` words (512 at scale 1), chosen by
//! `splitmix64(hash_id, position)`, so equal hash ids give identical text wherever they appear
//! and the trace's prefix structure survives.

use gantry_tokenizer::builtin_words;

use super::trace::TraceRecord;

/// Tokens (built-in words) one Mooncake block expands to at `--token-scale 1`.
pub const DEFAULT_BLOCK_TOKENS: usize = 512;

use crate::mock::engine::splitmix;

/// Appends `n` words of the stream named by `key`: word `k` is `splitmix(key + k)`'s pick.
fn push_words(out: &mut String, key: u64, n: usize) {
    let words = builtin_words();
    for k in 0..n as u64 {
        out.push(' ');
        out.push_str(words[(splitmix(key.wrapping_add(k)) % words.len() as u64) as usize]);
    }
}

/// Distinct key spaces for block text, prefix-group text and per-request text.
const BLOCK_SALT: u64 = 0xB10C_0000_0000_0000;
const GROUP_SALT: u64 = 0x6A0F_0000_0000_0000;
const UNIQUE_SALT: u64 = 0x0A1C_0000_0000_0000;

/// Appends the first `n` words of trace block `hash_id` (a block is at most 2^20 words).
pub fn push_block(out: &mut String, hash_id: u64, n: usize) {
    push_words(out, splitmix(BLOCK_SALT ^ hash_id) << 20, n);
}

/// The text of trace block `hash_id`, `n` words long.
pub fn block_text(hash_id: u64, n: usize) -> String {
    let mut s = String::with_capacity(n * 5);
    push_block(&mut s, hash_id, n);
    s
}

/// One request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Prompt text (the user message for chat).
    pub prompt: String,
    /// Prompt tokens under the built-in tokenizer (words).
    pub input_tokens: u32,
    /// `max_tokens`, sent with `ignore_eos: true`.
    pub max_tokens: u32,
}

/// How a length is drawn around its mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthDist {
    /// Always the mean.
    Fixed,
    /// Uniform in [mean/2, 3·mean/2].
    Uniform,
    /// Exponential with this mean (at least 1).
    Exponential,
}

impl LengthDist {
    fn draw(self, mean: u32, rng: &mut fastrand::Rng) -> u32 {
        let m = mean.max(1);
        match self {
            LengthDist::Fixed => m,
            LengthDist::Uniform => rng.u32(m / 2..=m + m / 2).max(1),
            LengthDist::Exponential => {
                let u = 1.0 - rng.f64(); // (0, 1]
                ((-u.ln() * f64::from(m)).round() as u32).max(1)
            }
        }
    }
}

/// Synthetic prompts: lengths from distributions, optional shared-prefix groups.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Synthetic {
    /// Mean input length, tokens.
    pub isl: u32,
    /// Mean output length, tokens.
    pub osl: u32,
    /// Input length distribution.
    pub isl_dist: LengthDist,
    /// Output length distribution.
    pub osl_dist: LengthDist,
    /// Number of shared-prefix groups (request i is in group i mod G); 0 = no shared prefixes.
    pub prefix_groups: u32,
    /// Length of each group's shared prefix, tokens (the request's own text follows it).
    pub prefix_len: u32,
    /// Seed of every draw.
    pub seed: u64,
}

impl Synthetic {
    /// Request `i`: the group prefix (if any), then `isl - prefix_len` words of its own
    /// (so its input is `max(isl, prefix_len)` tokens). Deterministic in `(seed, i)`.
    pub fn job(&self, i: u64) -> Job {
        let mut rng = fastrand::Rng::with_seed(splitmix(self.seed ^ splitmix(i)));
        let isl = self.isl_dist.draw(self.isl, &mut rng);
        let osl = self.osl_dist.draw(self.osl, &mut rng);
        let mut prompt = String::with_capacity(isl as usize * 5 + self.prefix_len as usize * 5);
        let mut prefix = 0;
        if self.prefix_groups > 0 && self.prefix_len > 0 {
            let g = i % u64::from(self.prefix_groups);
            push_words(&mut prompt, splitmix(GROUP_SALT ^ self.seed ^ g) << 20, self.prefix_len as usize);
            prefix = self.prefix_len;
        }
        let own = isl.saturating_sub(prefix);
        push_words(&mut prompt, splitmix(UNIQUE_SALT ^ self.seed ^ splitmix(i)) << 20, own as usize);
        Job { prompt, input_tokens: prefix + own, max_tokens: osl }
    }
}

/// How a trace's records become requests.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TraceScale {
    /// Tokens of one trace block before scaling (Mooncake: 512).
    pub block_tokens: u32,
    /// Multiplies every block, input length and output length (at least 1 token each).
    pub token_scale: f64,
}

impl TraceScale {
    fn scale(&self, n: u32) -> u32 {
        ((f64::from(n) * self.token_scale).round() as u32).max(1)
    }

    /// Words per (scaled) block.
    pub fn block_words(&self) -> u32 {
        self.scale(self.block_tokens)
    }

    /// Record `i` as a request: its blocks' text in order (the last one cut to the scaled input
    /// length), then words of its own if its hash ids do not cover its input; `max_tokens` is the
    /// scaled output length.
    pub fn job(&self, i: u64, r: &TraceRecord) -> Job {
        let input = self.scale(r.input_length);
        let block = self.block_words();
        let mut prompt = String::with_capacity(input as usize * 5);
        let mut left = input;
        for &h in &r.hash_ids {
            if left == 0 {
                break;
            }
            let n = left.min(block);
            push_block(&mut prompt, h, n as usize);
            left -= n;
        }
        push_words(&mut prompt, splitmix(UNIQUE_SALT ^ splitmix(i)) << 20, left as usize);
        Job { prompt, input_tokens: input, max_tokens: self.scale(r.output_length) }
    }
}

/// Where requests come from.
#[derive(Debug, Clone)]
pub enum Workload {
    /// Synthetic prompts, as many as the run asks for.
    Synthetic(Synthetic),
    /// A trace's records, in order, with their arrival times.
    Trace {
        /// The records (arrival order).
        records: std::sync::Arc<Vec<TraceRecord>>,
        /// Expansion settings.
        scale: TraceScale,
    },
}

impl Workload {
    /// Request `i`.
    pub fn job(&self, i: u64) -> Job {
        match self {
            Workload::Synthetic(s) => s.job(i),
            Workload::Trace { records, scale } => scale.job(i, &records[i as usize]),
        }
    }

    /// How many requests it holds (`None`: unbounded).
    pub fn len(&self) -> Option<u64> {
        match self {
            Workload::Synthetic(_) => None,
            Workload::Trace { records, .. } => Some(records.len() as u64),
        }
    }

    /// Whether it is a trace with no records.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// Arrival time of request `i` in ms from the trace start (traces only).
    pub fn arrival_ms(&self, i: u64) -> Option<f64> {
        match self {
            Workload::Synthetic(_) => None,
            Workload::Trace { records, .. } => records.get(i as usize).map(|r| r.timestamp_ms),
        }
    }
}

/// A short request of its own for warm-up (never shares text with the measured requests).
pub fn warmup_job(i: u64) -> Job {
    let mut prompt = String::new();
    push_words(&mut prompt, splitmix(0x3A53_0000 ^ i) << 20, 16);
    Job { prompt, input_tokens: 16, max_tokens: 4 }
}
