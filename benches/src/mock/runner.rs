//! One engine at run time: its shared state on its thread, and the loop that steps it.

use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Instant;

use gantry_kvindex::Publisher;
use gantry_tokenizer::Tokenizer;

use super::config::Role;
use super::engine::{EngineCore, PullJob};
use super::faults::Faults;
use super::pd;

/// Static facts about one engine, fixed at startup.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Index of the engine in this process.
    pub index: usize,
    /// Served model name.
    pub model: String,
    /// LoRA adapters it also serves (`--lora-modules`).
    pub lora_modules: Vec<super::engine::LoraModule>,
    /// Where its HTTP server listens.
    pub http: SocketAddr,
    /// KV event PUB endpoint, if events are on.
    pub kv_events: Option<String>,
    /// KV event replay ROUTER endpoint, if on.
    pub kv_replay: Option<String>,
    /// KV event topic.
    pub kv_topic: String,
    /// Batches kept for replay.
    pub kv_buffer_steps: usize,
    /// Prefill role: where KV pulls are served.
    pub side_channel: Option<SocketAddr>,
    /// P/D role.
    pub role: Role,
    /// vLLM's `engine_id` (appears as `remote_engine_id`).
    pub engine_id: String,
    /// Required bearer token on /v1 paths.
    pub api_key: Option<String>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Hash algorithm name for `vllm:cache_config_info`.
    pub hash_algo: &'static str,
    /// Seeds fault-injection draws (`--seed`, mixed with the engine index).
    pub fault_seed: u64,
}

/// Wakes one waiter (the engine loop). A notification before the wait is not lost.
#[derive(Debug, Default)]
pub struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Wakes the waiter, or makes its next wait return at once.
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits for a notification, or until `deadline` if given.
    pub async fn wait(&self, deadline: Option<Instant>) {
        let mut sleep = deadline.map(|d| Box::pin(monoio::time::sleep_until(monoio::time::Instant::from_std(d))));
        poll_fn(|cx| {
            if self.flag.replace(false) {
                return Poll::Ready(());
            }
            if let Some(s) = sleep.as_mut() {
                if s.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// Process-wide count of served completion requests, for `--exit-after`.
#[derive(Debug)]
pub struct ExitAfter {
    served: AtomicU64,
    limit: Option<u64>,
}

impl ExitAfter {
    /// Exits after `limit` requests (never if None).
    pub fn new(limit: Option<u64>) -> Self {
        ExitAfter { served: AtomicU64::new(0), limit }
    }

    /// Counts one served request; exits the process (status 3) at the limit.
    pub fn served_one(&self) {
        let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
        if self.limit.is_some_and(|l| n >= l) {
            tracing::warn!(served = n, "--exit-after reached: exiting with status 3");
            std::process::exit(3);
        }
    }
}

/// One engine's state, shared by its HTTP handlers and its loop (all on one thread).
pub struct Engine {
    /// The scheduler and KV cache.
    pub core: RefCell<EngineCore>,
    /// Wakes the loop (new request, abort, freed blocks).
    pub wake: Notify,
    /// KV event publisher.
    pub publisher: Option<Publisher>,
    /// Static facts.
    pub info: EngineInfo,
    /// The tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Injected faults (changeable at run time).
    pub faults: RefCell<Faults>,
    /// `--exit-after` bookkeeping.
    pub exit_after: Arc<ExitAfter>,
    /// Seconds since the epoch at startup (`created` of /v1/models).
    pub started: u64,
    /// Requests seen, for ids.
    pub request_seq: Cell<u64>,
    /// Makes generated request ids differ across engines and restarts.
    pub id_salt: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("info", &self.info).finish_non_exhaustive()
    }
}

/// Steps the engine forever: schedule, wait the step's time, complete, publish events.
pub async fn run_loop(engine: Rc<Engine>) {
    let mut clock = Instant::now();
    loop {
        let now = Instant::now();
        let (plan, lease_deadline) = {
            let mut core = engine.core.borrow_mut();
            core.expire_leases(now);
            let plan = core.schedule();
            (plan, core.next_lease_expiry())
        };
        for job in &plan.pulls {
            monoio::spawn(pull(engine.clone(), job.clone()));
        }
        if plan.is_empty() {
            publish(&engine);
            engine.wake.wait(lease_deadline).await;
            clock = Instant::now();
            continue;
        }
        let dur = {
            let core = engine.core.borrow();
            core.config().timing.step(plan.prefill_tokens, plan.decode_reqs, core.kv_usage())
        };
        if dur.is_zero() {
            yield_now().await;
        } else {
            clock = clock.max(now) + dur;
            monoio::time::sleep_until(monoio::time::Instant::from_std(clock)).await;
        }
        engine.core.borrow_mut().complete(plan, Instant::now());
        publish(&engine);
    }
}

fn publish(engine: &Engine) {
    let events = engine.core.borrow_mut().take_events();
    if let (Some(p), false) = (&engine.publisher, events.is_empty()) {
        p.publish(events);
    }
}

async fn pull(engine: Rc<Engine>, job: PullJob) {
    let result = pd::pull_remote(&job.remote, &engine.info.engine_id).await;
    if result.is_ok() {
        let dur = engine.core.borrow().config().timing.transfer(job.tokens);
        if !dur.is_zero() {
            monoio::time::sleep(dur).await;
        }
    }
    engine.core.borrow_mut().pull_done(job.req, result, Instant::now());
    engine.wake.notify();
}

/// Yields once to the other tasks on this thread.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
