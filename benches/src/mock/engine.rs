//! The mock engine's core: vLLM V1-style continuous batching over the paged KV cache.
//!
//! Pure logic, driven by the runner: [`EngineCore::schedule`] picks one step's batch (running
//! requests first, preempting the newest when blocks run out; then waiting requests while the
//! token budget, `max_num_seqs` and free blocks allow, with chunked prefill and prefix hits),
//! and [`EngineCore::complete`] applies it once the step's time has passed: KV computed,
//! full blocks cached (`BlockStored`), one token sampled per request whose KV is complete.
//! Output goes to each request's [`Output`], shared with the HTTP handler waiting on it.
//!
//! P/D: a request marked `remote_decode` (prefill side) keeps its blocks after finishing, under
//! a lease that a decode engine's pull or the lease's expiry ends. A request with a
//! [`RemotePrefill`] (decode side) first has its prompt KV pulled (see `pd.rs`), then decodes.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::task::Waker;
use std::time::{Duration, Instant};

use gantry_kvindex::vllm_hash::{self, VllmExtraKey, VllmHashAlgo};

use super::kv_cache::{BlockHash, BlockId, KvCache};
use super::metrics::EngineMetrics;
use super::timing::TimingModel;

/// Identifies a request inside one engine.
pub type ReqId = u64;

/// Hashes sequential request ids with one multiplication (they are not attacker-chosen).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type ReqMap<V> = HashMap<ReqId, V, BuildHasherDefault<IdHasher>>;

/// Engine settings (resolved from the CLI).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks, including vLLM's reserved null block.
    pub num_gpu_blocks: usize,
    /// Most requests in the running batch.
    pub max_num_seqs: usize,
    /// Token budget of one step.
    pub max_num_batched_tokens: usize,
    /// Most requests waiting; beyond it new requests get 503.
    pub max_num_queued_reqs: usize,
    /// Longest prompt + output.
    pub max_model_len: usize,
    /// Prefix caching on.
    pub prefix_caching: bool,
    /// Block hash function (vLLM's `--prefix-caching-hash-algo`).
    pub hash_algo: VllmHashAlgo,
    /// Without `ignore_eos`, a request stops with EOS after this many tokens (None: never).
    pub eos_after: Option<usize>,
    /// Step times.
    pub timing: TimingModel,
    /// Produce KV events.
    pub events_enabled: bool,
    /// How long a prefill engine holds a finished P/D request's blocks.
    pub kv_lease: Duration,
    /// Decode side: fewer remote tokens than this are recomputed instead of pulled.
    pub kv_recompute_threshold: usize,
}

/// Why a request finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// EOS sampled.
    Stop,
    /// The request failed (e.g. remote KV could not be loaded).
    Error(String),
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Error(_) => "error",
        }
    }
}

/// What a prefill engine hands back for a P/D request.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// Blocks holding the prompt KV.
    pub block_ids: Vec<BlockId>,
    /// Prompt tokens computed.
    pub num_tokens: usize,
}

/// Output of one request, shared between the engine (writer) and its handler (reader).
#[derive(Debug, Default)]
pub struct Output {
    /// Tokens produced and not yet taken by the handler.
    pub new_tokens: Vec<u32>,
    /// Set once the request is over.
    pub finished: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Output tokens produced so far (including taken ones).
    pub num_output: usize,
    /// Prefill side of P/D: the leased blocks.
    pub lease: Option<LeaseInfo>,
    /// Set by the handler when it goes away; the engine drops the request.
    pub aborted: bool,
    /// The handler wants every step's tokens (streaming); otherwise it is woken only at the end.
    pub stream: bool,
    waker: Option<Waker>,
}

impl Output {
    /// Registers the waker to call when output arrives.
    pub fn set_waker(&mut self, w: &Waker) {
        if !self.waker.as_ref().is_some_and(|old| old.will_wake(w)) {
            self.waker = Some(w.clone());
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Shared handle to a request's output.
pub type OutputRef = Rc<RefCell<Output>>;

/// Decode side of P/D: where the prompt's KV is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePrefill {
    /// Prefill engine's side channel `host:port`.
    pub host: String,
    /// Side channel port.
    pub port: u16,
    /// The prefill engine's request id (its lease key).
    pub request_id: String,
    /// Blocks on the prefill engine.
    pub block_ids: Vec<u64>,
    /// Tokens the prefill engine computed.
    pub num_tokens: usize,
}

/// A request to admit.
#[derive(Debug)]
pub struct NewRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most output tokens.
    pub max_tokens: usize,
    /// Never stop on EOS.
    pub ignore_eos: bool,
    /// Seeds the deterministic output tokens.
    pub seed: u64,
    /// Prefill side of P/D: keep the blocks after finishing, under `lease_id`.
    pub lease_id: Option<String>,
    /// Decode side of P/D: load the prompt KV from a prefill engine first.
    pub remote_prefill: Option<RemotePrefill>,
    /// vLLM's `cache_salt`: keys the first block, so only requests with the same salt share
    /// cached blocks.
    pub cache_salt: Option<String>,
    /// The LoRA adapter the request names as its model: keys every block.
    pub lora: Option<LoraModule>,
}

/// A LoRA adapter the engine serves (`--lora-modules NAME=PATH`). The mock computes nothing with
/// it; like vLLM it keys the request's KV blocks, so adapters and the base model never share
/// cached blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraModule {
    /// The model name requests use.
    pub name: String,
    /// Where it was loaded from (hashed, not published).
    pub path: String,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full (503).
    QueueFull,
}

/// A remote KV pull the runner must perform (decode side).
#[derive(Debug, Clone)]
pub struct PullJob {
    /// The request.
    pub req: ReqId,
    /// Where the KV is.
    pub remote: RemotePrefill,
    /// Tokens to load.
    pub tokens: usize,
}

/// One step's batch.
#[derive(Debug, Default)]
pub struct StepPlan {
    items: Vec<(ReqId, usize)>,
    /// Uncached prompt tokens computed in this step.
    pub prefill_tokens: usize,
    /// Requests decoding one token in this step.
    pub decode_reqs: usize,
    /// Pulls to start (decode side).
    pub pulls: Vec<PullJob>,
}

impl StepPlan {
    /// Whether the step computes anything.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RemoteState {
    None,
    Pending(RemotePrefill),
    Pulling,
}

#[derive(Debug)]
struct Req {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    ignore_eos: bool,
    seed: u64,
    cache_salt: Option<String>,
    lora: Option<LoraModule>,
    hashes: Vec<BlockHash>,
    blocks: Vec<BlockId>,
    num_computed: usize,
    num_cached_blocks: usize,
    queried: bool,
    lease_id: Option<String>,
    remote: RemoteState,
    out: OutputRef,
    arrival: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

#[derive(Debug)]
struct Lease {
    blocks: Vec<BlockId>,
    expires: Instant,
}

/// Result of a P/D pull on the prefill side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullError {
    /// No live lease under that id (never existed, expired, or already pulled).
    Unknown,
    /// The lease exists but holds other blocks than those asked for.
    BlockMismatch,
}

/// The engine state.
#[derive(Debug)]
pub struct EngineCore {
    cfg: EngineConfig,
    kv: KvCache,
    reqs: ReqMap<Req>,
    pending_aborts: usize,
    next_id: ReqId,
    waiting: VecDeque<ReqId>,
    running: Vec<ReqId>,
    pulling: usize,
    leases: HashMap<String, Lease>,
    none_hash: [u8; 32],
    output_tokens: Vec<u32>,
    eos_token: Option<u32>,
    /// vLLM metrics of this engine.
    pub metrics: EngineMetrics,
}

impl EngineCore {
    /// An idle engine. `output_tokens` is the pool output is drawn from; `eos_token` is
    /// appended when a request stops on EOS.
    pub fn new(cfg: EngineConfig, output_tokens: Vec<u32>, eos_token: Option<u32>) -> EngineCore {
        let kv = KvCache::new(cfg.num_gpu_blocks, cfg.block_size, cfg.prefix_caching, cfg.events_enabled);
        let none_hash = vllm_hash::none_hash(cfg.hash_algo);
        let output_tokens = if output_tokens.is_empty() { vec![0] } else { output_tokens };
        EngineCore {
            cfg,
            kv,
            reqs: ReqMap::default(),
            pending_aborts: 0,
            next_id: 1,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pulling: 0,
            leases: HashMap::new(),
            none_hash,
            output_tokens,
            eos_token,
            metrics: EngineMetrics::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Requests in the running batch.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting (including those loading remote KV, as vLLM counts them).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len() + self.pulling
    }

    /// KV usage 0..1.
    pub fn kv_usage(&self) -> f64 {
        self.kv.usage()
    }

    /// Live P/D leases (prefill side).
    pub fn num_leases(&self) -> usize {
        self.leases.len()
    }

    /// Whether a step has anything to do.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Events produced since the last call.
    pub fn take_events(&mut self) -> Vec<gantry_kvindex::events::KvEvent> {
        self.kv.take_events()
    }

    /// Admits a request into the waiting queue.
    pub fn submit(&mut self, req: NewRequest, now: Instant) -> Result<(ReqId, OutputRef), SubmitError> {
        if self.waiting.len() >= self.cfg.max_num_queued_reqs {
            return Err(SubmitError::QueueFull);
        }
        let id = self.next_id;
        self.next_id += 1;
        let out: OutputRef = Rc::default();
        let remote = match req.remote_prefill {
            Some(r) => RemoteState::Pending(r),
            None => RemoteState::None,
        };
        let prompt_len = req.prompt.len();
        let mut r = Req {
            tokens: req.prompt,
            prompt_len,
            max_tokens: req.max_tokens.max(1),
            ignore_eos: req.ignore_eos,
            seed: req.seed,
            cache_salt: req.cache_salt,
            lora: req.lora,
            hashes: Vec::new(),
            blocks: Vec::new(),
            num_computed: 0,
            num_cached_blocks: 0,
            queried: false,
            lease_id: req.lease_id,
            remote,
            out: out.clone(),
            arrival: now,
            first_token_at: None,
            last_token_at: None,
        };
        Self::extend_hashes(&self.cfg, &self.none_hash, &mut r);
        self.reqs.insert(id, r);
        self.waiting.push_back(id);
        Ok((id, out))
    }

    /// Hashes every full block of the request's tokens not hashed yet.
    fn extend_hashes(cfg: &EngineConfig, none_hash: &[u8; 32], r: &mut Req) {
        let bs = cfg.block_size;
        let full = r.tokens.len() / bs;
        while r.hashes.len() < full {
            let i = r.hashes.len();
            let parent = r.hashes.last().map_or(none_hash, |h| &h.digest);
            // vLLM's order: the adapter on every block, then the salt on the first.
            let mut keys = Vec::with_capacity(2);
            if let Some(l) = &r.lora {
                keys.push(VllmExtraKey::Lora { name: &l.name, path: &l.path });
            }
            if let (0, Some(salt)) = (i, r.cache_salt.as_deref()) {
                keys.push(VllmExtraKey::CacheSalt(salt));
            }
            let digest = vllm_hash::hash_block_keyed(cfg.hash_algo, parent, &r.tokens[i * bs..(i + 1) * bs], &keys);
            r.hashes.push(BlockHash { digest, external: vllm_hash::digest_to_u64(&digest) });
        }
    }

    /// Notes that a handler marked its request aborted; the next step reaps it.
    pub fn note_abort(&mut self) {
        self.pending_aborts += 1;
    }

    /// Removes aborted requests, releasing their blocks.
    fn reap_aborted(&mut self) {
        if self.pending_aborts == 0 {
            return;
        }
        self.pending_aborts = 0;
        let aborted: Vec<ReqId> = self
            .reqs
            .iter()
            .filter(|(_, r)| r.out.borrow().aborted && r.remote != RemoteState::Pulling)
            .map(|(id, _)| *id)
            .collect();
        for id in aborted {
            self.waiting.retain(|&w| w != id);
            self.running.retain(|&w| w != id);
            if let Some(r) = self.reqs.remove(&id) {
                self.kv.free(&r.blocks);
                self.metrics.finished("abort");
            }
        }
    }

    /// Picks the next step's batch and reserves its blocks.
    pub fn schedule(&mut self) -> StepPlan {
        self.reap_aborted();
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let bs = self.cfg.block_size;
        let mut preempted = false;

        // Running requests first, in arrival order; the newest is preempted when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (need, num_computed, have) = {
                let r = &self.reqs[&id];
                (r.tokens.len() - r.num_computed, r.num_computed, r.blocks.len())
            };
            let n = need.min(budget);
            let blocks_needed = (num_computed + n).div_ceil(bs).saturating_sub(have);
            let mut scheduled = false;
            loop {
                if blocks_needed <= self.kv.num_free() {
                    let r = self.reqs.get_mut(&id).expect("running request exists");
                    self.kv.allocate(blocks_needed, &mut r.blocks).expect("checked free blocks");
                    scheduled = true;
                    break;
                }
                // Preempt the newest running request (possibly this one).
                let victim = *self.running.last().expect("running is non-empty");
                self.preempt(victim);
                preempted = true;
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            self.plan_item(&mut plan, id, n);
            budget -= n;
            i += 1;
        }

        // Then waiting requests, unless this step had to preempt.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            match self.admit(id, budget, &mut plan) {
                Admit::Scheduled(n) => {
                    self.waiting.pop_front();
                    self.running.push(id);
                    budget -= n;
                }
                Admit::Pulling => {
                    self.waiting.pop_front();
                    self.pulling += 1;
                }
                Admit::NoSpace => break,
            }
        }
        plan
    }

    fn plan_item(&mut self, plan: &mut StepPlan, id: ReqId, n: usize) {
        let r = &self.reqs[&id];
        if r.num_computed + n <= r.prompt_len || n > 1 {
            plan.prefill_tokens += n;
        } else {
            plan.decode_reqs += 1;
        }
        plan.items.push((id, n));
    }

    fn preempt(&mut self, id: ReqId) {
        self.running.retain(|&r| r != id);
        if let Some(r) = self.reqs.get_mut(&id) {
            self.kv.free(&r.blocks);
            r.blocks.clear();
            r.num_computed = 0;
            r.num_cached_blocks = 0;
            self.waiting.push_front(id);
            self.metrics.preemptions += 1;
        }
    }

    fn admit(&mut self, id: ReqId, budget: usize, plan: &mut StepPlan) -> Admit {
        let bs = self.cfg.block_size;
        let r = &self.reqs[&id];
        // A request that already holds KV (pulled from a prefill engine) continues from there.
        if r.num_computed > 0 {
            let n = (r.tokens.len() - r.num_computed).min(budget);
            let need = (r.num_computed + n).div_ceil(bs).saturating_sub(r.blocks.len());
            if need > self.kv.num_free() {
                return Admit::NoSpace;
            }
            let r = self.reqs.get_mut(&id).expect("exists");
            self.kv.allocate(need, &mut r.blocks).expect("checked free blocks");
            self.plan_item(plan, id, n);
            return Admit::Scheduled(n);
        }
        let num_tokens = r.tokens.len();
        let hits = self.kv.longest_prefix(&r.hashes, (num_tokens - 1) / bs);
        // Hit blocks that nobody holds come out of the free queue when touched.
        let hits_free = self.kv.free_in_prefix(&r.hashes, hits);
        let hit_tokens = hits * bs;
        let remote = std::mem::replace(&mut self.reqs.get_mut(&id).expect("exists").remote, RemoteState::None);
        if let RemoteState::Pending(spec) = remote {
            // Decode side: pull what the prefill engine computed, minus local hits; the last
            // prompt token is always computed here (it samples the first output token).
            let target = spec.num_tokens.min(num_tokens - 1);
            let load = target.saturating_sub(hit_tokens);
            if load >= self.cfg.kv_recompute_threshold.max(1) {
                let fresh = target.div_ceil(bs).saturating_sub(hits);
                if fresh + hits_free > self.kv.num_free() {
                    self.reqs.get_mut(&id).expect("exists").remote = RemoteState::Pending(spec);
                    return Admit::NoSpace;
                }
                self.take_blocks(id, hits, fresh, num_tokens);
                self.reqs.get_mut(&id).expect("exists").remote = RemoteState::Pulling;
                plan.pulls.push(PullJob { req: id, remote: spec, tokens: load });
                return Admit::Pulling;
            }
            // Too little to pull: compute it here (the prefill engine's lease just expires).
        }
        let n = (num_tokens - hit_tokens).min(budget);
        let fresh = (hit_tokens + n).div_ceil(bs) - hits;
        if fresh + hits_free > self.kv.num_free() {
            return Admit::NoSpace;
        }
        self.take_blocks(id, hits, fresh, num_tokens);
        self.plan_item(plan, id, n);
        Admit::Scheduled(n)
    }

    /// Gives a request its `hits` cached prefix blocks plus `fresh` new ones (space checked).
    fn take_blocks(&mut self, id: ReqId, hits: usize, fresh: usize, num_tokens: usize) {
        let r = self.reqs.get_mut(&id).expect("exists");
        self.kv.touch_prefix(&r.hashes, hits, &mut r.blocks);
        self.kv.allocate(fresh, &mut r.blocks).expect("checked free blocks");
        r.num_computed = hits * self.cfg.block_size;
        r.num_cached_blocks = hits;
        self.record_query(id, num_tokens, hits * self.cfg.block_size);
    }

    /// Counts a request's prefix-cache lookup once (not again after a preemption).
    fn record_query(&mut self, id: ReqId, num_tokens: usize, hit_tokens: usize) {
        let r = self.reqs.get_mut(&id).expect("exists");
        if !r.queried {
            r.queried = true;
            r.out.borrow_mut().cached_tokens = hit_tokens;
            self.metrics.prefix_queries += num_tokens as u64;
            self.metrics.prefix_hits += hit_tokens as u64;
        }
    }

    /// Applies a step whose time has passed: KV computed, blocks cached, tokens sampled.
    pub fn complete(&mut self, plan: StepPlan, now: Instant) {
        self.metrics.iteration(plan.prefill_tokens + plan.decode_reqs);
        for (id, n) in plan.items {
            let Some(r) = self.reqs.get_mut(&id) else { continue };
            r.num_computed += n;
            let done = r.num_computed == r.tokens.len();
            Self::cache_full_blocks(&mut self.kv, r, self.cfg.block_size);
            if !done {
                continue;
            }
            // Sample the next token.
            let pos = r.tokens.len() - r.prompt_len;
            let stop = !r.ignore_eos && self.cfg.eos_after.is_some_and(|k| pos >= k);
            let token = if stop {
                self.eos_token
            } else {
                let idx = splitmix(r.seed ^ (pos as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) as usize
                    % self.output_tokens.len();
                Some(self.output_tokens[idx])
            };
            if let Some(t) = token {
                r.tokens.push(t);
            }
            let first = r.first_token_at.is_none();
            if first {
                r.first_token_at = Some(now);
                self.metrics.ttft.observe(now.duration_since(r.arrival).as_secs_f64());
                self.metrics.prompt_tokens += r.prompt_len as u64;
            } else if let Some(last) = r.last_token_at {
                self.metrics.itl.observe(now.duration_since(last).as_secs_f64());
            }
            r.last_token_at = Some(now);
            self.metrics.generation_tokens += 1;
            let num_output = r.tokens.len() - r.prompt_len;
            let finish = if stop {
                Some(FinishReason::Stop)
            } else if num_output >= r.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            {
                let mut out = r.out.borrow_mut();
                if let (Some(t), false) = (token, stop) {
                    out.new_tokens.push(t);
                }
                out.num_output = num_output;
                if finish.is_none() && out.stream {
                    out.wake();
                }
            }
            if let Some(reason) = finish {
                self.finish(id, reason, now);
            } else {
                Self::extend_hashes(&self.cfg, &self.none_hash, r);
            }
        }
    }

    fn cache_full_blocks(kv: &mut KvCache, r: &mut Req, bs: usize) {
        let full = (r.num_computed / bs).min(r.hashes.len()).min(r.blocks.len());
        if full <= r.num_cached_blocks {
            return;
        }
        let a = r.num_cached_blocks;
        let parent = a.checked_sub(1).map(|p| r.hashes[p].external);
        let tokens = &r.tokens[a * bs..full * bs];
        let lora = r.lora.as_ref().map(|l| l.name.as_str());
        kv.cache_blocks(&r.blocks[a..full], &r.hashes[a..full], parent, tokens, r.cache_salt.as_deref(), lora);
        r.num_cached_blocks = full;
    }

    fn finish(&mut self, id: ReqId, reason: FinishReason, now: Instant) {
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
        let Some(r) = self.reqs.remove(&id) else { return };
        self.metrics.e2e.observe(now.duration_since(r.arrival).as_secs_f64());
        self.metrics.finished(reason.as_str());
        let mut out = r.out.borrow_mut();
        match (&reason, r.lease_id) {
            (FinishReason::Length | FinishReason::Stop, Some(lease_id)) => {
                out.lease = Some(LeaseInfo { block_ids: r.blocks.clone(), num_tokens: r.prompt_len });
                self.leases.insert(lease_id, Lease { blocks: r.blocks, expires: now + self.cfg.kv_lease });
            }
            _ => self.kv.free(&r.blocks),
        }
        out.finished = Some(reason);
        out.wake();
    }

    /// Frees the blocks of leases that expired by `now`. Returns how many expired.
    pub fn expire_leases(&mut self, now: Instant) -> usize {
        let expired: Vec<String> =
            self.leases.iter().filter(|(_, l)| l.expires <= now).map(|(k, _)| k.clone()).collect();
        for k in &expired {
            if let Some(l) = self.leases.remove(k) {
                self.kv.free(&l.blocks);
            }
        }
        expired.len()
    }

    /// The earliest lease expiry, if any lease is live.
    pub fn next_lease_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires).min()
    }

    /// Prefill side: a decode engine reads lease `id`'s blocks; the lease ends.
    pub fn pull_lease(&mut self, id: &str, block_ids: &[u64], now: Instant) -> Result<usize, PullError> {
        match self.leases.get(id) {
            None => return Err(PullError::Unknown),
            Some(l) if l.expires <= now => return Err(PullError::Unknown),
            Some(l) => {
                if !block_ids.is_empty() && !block_ids.iter().copied().eq(l.blocks.iter().map(|&b| u64::from(b))) {
                    return Err(PullError::BlockMismatch);
                }
            }
        }
        let l = self.leases.remove(id).expect("checked above");
        self.kv.free(&l.blocks);
        Ok(l.blocks.len())
    }

    /// Decode side: a pull finished. On success the loaded KV counts as computed and the
    /// request goes to the front of the queue; on failure it ends with an error.
    pub fn pull_done(&mut self, id: ReqId, result: Result<(), String>, now: Instant) {
        self.pulling = self.pulling.saturating_sub(1);
        let bs = self.cfg.block_size;
        let Some(r) = self.reqs.get_mut(&id) else { return };
        r.remote = RemoteState::None;
        if r.out.borrow().aborted {
            let r = self.reqs.remove(&id).expect("exists");
            self.kv.free(&r.blocks);
            self.metrics.finished("abort");
            return;
        }
        match result {
            Ok(()) => {
                r.num_computed = (r.blocks.len() * bs).min(r.tokens.len() - 1);
                Self::cache_full_blocks(&mut self.kv, r, bs);
                self.waiting.push_front(id);
            }
            Err(msg) => self.finish(id, FinishReason::Error(msg), now),
        }
    }

    /// Resets the prefix cache (fails while any block is in use).
    pub fn reset_prefix_cache(&mut self) -> Result<(), usize> {
        self.kv.reset()
    }
}

enum Admit {
    Scheduled(usize),
    Pulling,
    NoSpace,
}

/// SplitMix64 finalizer: a cheap, well-mixed deterministic hash.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
