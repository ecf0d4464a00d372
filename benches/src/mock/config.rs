//! `gantry mock` flags, their defaults, and validation into per-engine settings.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use gantry_kvindex::vllm_hash::VllmHashAlgo;
use gantry_kvindex::WireFormat;

use super::engine::{EngineConfig, LoraModule};
use super::timing::{TimingModel, DEFAULT_KV_BANDWIDTH, DEFAULT_KV_BYTES_PER_TOKEN};

/// The vLLM release whose surface the mock reproduces (reported by `/version`).
pub const VLLM_VERSION: &str = "0.33.0";

/// Engine role in prefill/decode disaggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Aggregated: no KV connector; `kv_transfer_params` is ignored and answered with null.
    Agg,
    /// Prefill (KV producer): honours `do_remote_decode`, leases the prompt's blocks.
    Prefill,
    /// Decode (KV consumer): honours `do_remote_prefill`, pulls the prompt's KV.
    Decode,
}

/// KV event encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventsFormat {
    /// Tagged maps (vLLM >= 0.24).
    Map,
    /// Tagged arrays (vLLM <= 0.23).
    Array,
}

/// Block hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HashAlgo {
    /// sha256 over pickle (vLLM's default).
    Sha256,
    /// sha256 over canonical CBOR.
    #[value(name = "sha256_cbor")]
    Sha256Cbor,
}

/// `gantry mock`: one or more vLLM-faithful mock engines in one process.
#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    /// Address every socket binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// HTTP port of engine 0; engine i listens on PORT+i (0: ephemeral ports).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Number of engines in this process.
    #[arg(long, default_value_t = 1)]
    pub engines: usize,
    /// Threads serving the engines (engine i runs on thread i mod WORKERS); 0 = min(engines, cores).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// I/O driver: legacy (epoll), io_uring, or auto (io_uring, else epoll). The default is
    /// epoll because it measured faster for the mock's small request/response exchanges
    /// (scripts/bench-mock.sh: 64.5 k vs 53.8 k req/s on a 2-core VM, kernel 6.18).
    #[arg(long, default_value = "legacy")]
    pub driver: String,
    /// Served model name.
    #[arg(long, default_value = "mock-model")]
    pub model: String,
    /// LoRA adapters served beside the model, vLLM's `NAME=PATH` (repeatable): requests name
    /// them as their model; their KV blocks are keyed by the adapter, as vLLM keys them.
    #[arg(long = "lora-modules", value_name = "NAME=PATH", value_parser = parse_lora_module, num_args = 1..)]
    pub lora_modules: Vec<LoraModule>,
    /// HF model directory (tokenizer.json, tokenizer_config.json); default: the built-in tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Longest prompt + output; default min(32768, KV capacity in tokens).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// KV blocks per engine (including vLLM's reserved null block).
    #[arg(long, default_value_t = 16384)]
    pub num_gpu_blocks: usize,
    /// Most requests in the running batch.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one scheduler step (chunked prefill splits longer prompts).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    /// Most waiting requests; beyond it requests get 503.
    #[arg(long, default_value_t = 4096)]
    pub max_num_queued_reqs: usize,
    /// Disable prefix caching.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
    /// Block hash function, as vLLM's --prefix-caching-hash-algo.
    #[arg(long, value_enum, default_value = "sha256")]
    pub prefix_caching_hash_algo: HashAlgo,
    /// Divides every delay; 0 = no delay at all.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Prefill step time a·N²+b·N+c in ms (N = uncached tokens in the step), as "a,b,c".
    #[arg(long, value_delimiter = ',', value_name = "A,B,C", default_values_t = super::timing::DEFAULT_PREFILL_MS)]
    pub prefill_ms_coeffs: Vec<f64>,
    /// Decode step time a·u²+b·u+c in ms (u = KV usage 0..1), as "a,b,c".
    #[arg(long, value_delimiter = ',', value_name = "A,B,C", default_values_t = super::timing::DEFAULT_DECODE_MS, allow_hyphen_values = true)]
    pub decode_ms_coeffs: Vec<f64>,
    /// Floor of a decode step, ms.
    #[arg(long, default_value_t = super::timing::DEFAULT_DECODE_MIN_MS)]
    pub decode_min_ms: f64,
    /// KV bytes per token, for P/D transfer time.
    #[arg(long, default_value_t = DEFAULT_KV_BYTES_PER_TOKEN)]
    pub kv_bytes_per_token: u64,
    /// KV transfer bandwidth in bytes/s, for P/D transfer time.
    #[arg(long, default_value_t = DEFAULT_KV_BANDWIDTH)]
    pub kv_transfer_bandwidth: f64,
    /// Without ignore_eos, a request samples EOS after this many tokens (0 = never).
    #[arg(long, default_value_t = 0)]
    pub eos_after: usize,
    /// KV events: engine i publishes on tcp://HOST:PORT+i (PUB). Off when not given.
    #[arg(long)]
    pub kv_events_port: Option<u16>,
    /// KV event replay: engine i answers replay requests on tcp://HOST:PORT+i (ROUTER).
    #[arg(long)]
    pub kv_replay_port: Option<u16>,
    /// KV event encoding: map (vLLM >= 0.24) or array (vLLM <= 0.23).
    #[arg(long, value_enum, default_value = "map")]
    pub kv_events_format: EventsFormat,
    /// KV event topic (first frame of every message).
    #[arg(long, default_value = "kv-events")]
    pub kv_events_topic: String,
    /// Batches kept for replay.
    #[arg(long, default_value_t = 10_000)]
    pub kv_events_buffer_steps: usize,
    /// P/D role.
    #[arg(long, value_enum, default_value = "agg")]
    pub role: Role,
    /// Prefill role: seconds a finished request's blocks stay leased for a decode engine.
    #[arg(long, default_value_t = 30)]
    pub kv_lease_secs: u64,
    /// Prefill role: engine i serves KV pulls on HOST:PORT+i (vLLM's side channel, 5600).
    #[arg(long, default_value_t = 5600)]
    pub kv_side_channel_port: u16,
    /// Decode role: fewer remote tokens than this are recomputed instead of pulled.
    #[arg(long, default_value_t = 64)]
    pub kv_recompute_threshold: usize,
    /// Require `Authorization: Bearer KEY` on /v1 paths.
    #[arg(long, env = "VLLM_API_KEY")]
    pub api_key: Option<String>,
    /// Largest request body, bytes (413 beyond).
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Seed of fault injection draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fault: fail this fraction (0..1) of completion requests with --fail-status.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Fault: the status of injected failures.
    #[arg(long, default_value_t = 500)]
    pub fail_status: u16,
    /// Fault: streams stop sending (but stay open) after this many tokens.
    #[arg(long)]
    pub stall_after: Option<usize>,
    /// Fault: connections are cut mid-stream after this many tokens.
    #[arg(long)]
    pub cut_after: Option<usize>,
    /// Fault: the process exits (status 3) after serving this many completion requests.
    #[arg(long)]
    pub exit_after: Option<u64>,
    /// Fault: /health alternates between N answers of 200 and N answers of 503.
    #[arg(long)]
    pub flap_health: Option<u64>,
}

/// A flag with a bad value.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {problem}")]
pub struct ConfigError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { flag, problem: problem.into() }
}

impl MockArgs {
    /// Checks every flag, naming the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.engines == 0 {
            return Err(bad("engines", "must be at least 1"));
        }
        if self.block_size == 0 || self.block_size > 4096 {
            return Err(bad("block-size", "must be in 1..=4096"));
        }
        if self.num_gpu_blocks < 2 || self.num_gpu_blocks > (1 << 30) {
            return Err(bad("num-gpu-blocks", "must be in 2..=2^30 (block 0 is reserved)"));
        }
        if self.max_num_seqs == 0 {
            return Err(bad("max-num-seqs", "must be at least 1"));
        }
        for (i, l) in self.lora_modules.iter().enumerate() {
            if l.name == self.model || self.lora_modules[..i].iter().any(|o| o.name == l.name) {
                return Err(bad("lora-modules", format!("`{}` is already a served model name", l.name)));
            }
        }
        if self.max_num_batched_tokens == 0 {
            return Err(bad("max-num-batched-tokens", "must be at least 1"));
        }
        if !(self.speedup >= 0.0 && self.speedup.is_finite()) {
            return Err(bad("speedup", "must be a finite number >= 0"));
        }
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(bad("fail-rate", "must be in 0..=1"));
        }
        if !(400..=599).contains(&self.fail_status) {
            return Err(bad("fail-status", "must be an error status (400..=599)"));
        }
        if self.prefill_ms_coeffs.len() != 3 || self.prefill_ms_coeffs.iter().any(|c| !c.is_finite()) {
            return Err(bad("prefill-ms-coeffs", "must be three finite numbers a,b,c"));
        }
        if self.decode_ms_coeffs.len() != 3 || self.decode_ms_coeffs.iter().any(|c| !c.is_finite()) {
            return Err(bad("decode-ms-coeffs", "must be three finite numbers a,b,c"));
        }
        if proxy_driver(&self.driver).is_none() {
            return Err(bad("driver", format!("unknown driver `{}` (auto, io_uring, legacy)", self.driver)));
        }
        let capacity = (self.num_gpu_blocks - 1) * self.block_size;
        if let Some(len) = self.max_model_len {
            if len == 0 {
                return Err(bad("max-model-len", "must be at least 1"));
            }
            if len > capacity {
                return Err(bad(
                    "max-model-len",
                    format!("{len} tokens do not fit in the KV cache ({capacity} tokens); raise --num-gpu-blocks"),
                ));
            }
        }
        for (flag, base) in [
            ("port", Some(self.port)),
            ("kv-events-port", self.kv_events_port),
            ("kv-replay-port", self.kv_replay_port),
            ("kv-side-channel-port", Some(self.kv_side_channel_port)),
        ] {
            if let Some(base) = base {
                if base != 0 && usize::from(base) + self.engines - 1 > usize::from(u16::MAX) {
                    return Err(bad(flag, format!("{base} + {} engines runs past port 65535", self.engines)));
                }
            }
        }
        if self.kv_replay_port.is_some() && self.kv_events_port.is_none() {
            return Err(bad("kv-replay-port", "needs --kv-events-port"));
        }
        if self.model.is_empty() {
            return Err(bad("model", "must not be empty"));
        }
        Ok(())
    }

    /// The longest prompt + output.
    pub fn max_model_len(&self) -> usize {
        let capacity = (self.num_gpu_blocks - 1) * self.block_size;
        self.max_model_len.unwrap_or(capacity.min(32_768))
    }

    /// The engine settings these flags describe.
    pub fn engine_config(&self) -> EngineConfig {
        let c = |v: &[f64]| [v[0], v[1], v[2]];
        EngineConfig {
            block_size: self.block_size,
            num_gpu_blocks: self.num_gpu_blocks,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_queued_reqs: self.max_num_queued_reqs,
            max_model_len: self.max_model_len(),
            prefix_caching: !self.no_enable_prefix_caching,
            hash_algo: match self.prefix_caching_hash_algo {
                HashAlgo::Sha256 => VllmHashAlgo::Sha256,
                HashAlgo::Sha256Cbor => VllmHashAlgo::Sha256Cbor,
            },
            eos_after: (self.eos_after > 0).then_some(self.eos_after),
            timing: TimingModel {
                prefill_ms: c(&self.prefill_ms_coeffs),
                decode_ms: c(&self.decode_ms_coeffs),
                decode_min_ms: self.decode_min_ms,
                kv_bytes_per_token: self.kv_bytes_per_token,
                kv_bandwidth: self.kv_transfer_bandwidth,
                speedup: self.speedup,
            },
            events_enabled: self.kv_events_port.is_some(),
            kv_lease: Duration::from_secs(self.kv_lease_secs),
            kv_recompute_threshold: self.kv_recompute_threshold,
        }
    }

    /// The wire format for KV events.
    pub fn wire_format(&self) -> WireFormat {
        match self.kv_events_format {
            EventsFormat::Map => WireFormat::Map,
            EventsFormat::Array => WireFormat::Array,
        }
    }

    /// The name `vllm:cache_config_info` reports for the hash function.
    pub fn hash_algo_name(&self) -> &'static str {
        match self.prefix_caching_hash_algo {
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha256Cbor => "sha256_cbor",
        }
    }
}

/// `--lora-modules NAME=PATH`: both parts non-empty, the name not containing `=`.
fn parse_lora_module(s: &str) -> Result<LoraModule, String> {
    match s.split_once('=') {
        Some((name, path)) if !name.trim().is_empty() && !path.trim().is_empty() => {
            Ok(LoraModule { name: name.trim().to_owned(), path: path.trim().to_owned() })
        }
        _ => Err(format!("`{s}` is not NAME=PATH")),
    }
}

/// Parses the `--driver` value.
pub fn proxy_driver(s: &str) -> Option<gantry_proxy::rt::Driver> {
    gantry_proxy::rt::Driver::parse(s)
}

/// `port + i`, or 0 (ephemeral) when `port` is 0.
pub fn port_for(port: u16, i: usize) -> u16 {
    if port == 0 {
        0
    } else {
        port + i as u16
    }
}
