//! `gantry mock`: vLLM-faithful mock engines, many per process.
//!
//! Every engine has its own HTTP port, KV-event publisher and replay socket, KV cache and
//! scheduler, and lives on one thread (engine i on worker thread i mod `--workers`), so no
//! engine state is ever shared between threads. All sockets are bound before any thread starts:
//! a port in use fails startup with the port named, and a returned [`MockServer`] is ready.
//!
//! Modules: [`config`] (flags), [`engine`] (scheduler), [`kv_cache`] (block pool),
//! [`timing`] (step times), [`api`] (HTTP surface), [`pd`] (P/D side channel), [`metrics`],
//! [`faults`], [`runner`] (the step loop).

pub mod api;
pub mod config;
pub mod engine;
pub mod faults;
pub mod kv_cache;
pub mod metrics;
pub mod pd;
pub mod runner;
pub mod timing;

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry_kvindex::publisher::{PublisherConfig, ReplayFraming};
use gantry_kvindex::Publisher;
use gantry_proxy::http::server::{self, ServerConfig};
use gantry_proxy::http::Limits;
use gantry_proxy::rt;
use gantry_tokenizer::Tokenizer;

pub use config::MockArgs;
use config::{port_for, Role};
use engine::{splitmix, EngineCore};
use faults::Faults;
use runner::{Engine, EngineInfo, ExitAfter};

/// Why the mock could not start.
#[derive(Debug, thiserror::Error)]
pub enum MockError {
    /// A flag is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The tokenizer could not be loaded.
    #[error("loading the tokenizer: {0}")]
    Tokenizer(#[from] gantry_tokenizer::TokenizerError),
    /// A socket could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which socket.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A KV-event socket could not be set up.
    #[error("engine {engine}: {source}")]
    Publisher {
        /// The engine index.
        engine: usize,
        /// The publisher error.
        source: gantry_kvindex::publisher::PublisherError,
    },
    /// A worker thread could not start.
    #[error("starting worker thread: {0}")]
    Thread(std::io::Error),
}

/// Addresses of one running engine.
#[derive(Debug, Clone)]
pub struct EngineAddrs {
    /// HTTP server.
    pub http: SocketAddr,
    /// KV events PUB endpoint.
    pub kv_events: Option<String>,
    /// KV events replay ROUTER endpoint.
    pub kv_replay: Option<String>,
    /// P/D side channel (prefill role).
    pub side_channel: Option<SocketAddr>,
}

impl EngineAddrs {
    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

/// Running mock engines. Dropping it stops them and joins their threads.
#[derive(Debug)]
pub struct MockServer {
    /// One entry per engine, by index.
    pub engines: Vec<EngineAddrs>,
    /// The I/O driver the worker threads run.
    pub driver: &'static str,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl MockServer {
    /// Stops the engines and waits for their threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    /// Blocks until the worker threads end (they end only when stopped).
    pub fn wait(mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Everything one engine needs, built on the main thread and moved to its worker.
struct EngineSeed {
    info: EngineInfo,
    listener: StdListener,
    side: Option<StdListener>,
    publisher: Option<Publisher>,
    faults: Faults,
}

fn bind(what: String, addr: SocketAddr) -> Result<StdListener, MockError> {
    let l = StdListener::bind(addr).map_err(|source| MockError::Bind { what, addr, source })?;
    l.set_nonblocking(true).map_err(|source| MockError::Bind { what: "listener".into(), addr, source })?;
    Ok(l)
}

/// Starts the engines described by `args` on background threads.
pub fn spawn(args: &MockArgs) -> Result<MockServer, MockError> {
    args.validate()?;
    let tokenizer = Arc::new(Tokenizer::load(args.tokenizer.as_deref())?);
    let driver = config::proxy_driver(&args.driver).unwrap_or_default();
    let workers = match args.workers {
        0 => args.engines.min(std::thread::available_parallelism().map_or(1, |n| n.get())),
        w => w.min(args.engines),
    };
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let zmq_ctx = zmq::Context::new();
    let mut seeds = Vec::with_capacity(args.engines);
    let mut addrs = Vec::with_capacity(args.engines);
    for i in 0..args.engines {
        let http_addr = SocketAddr::new(args.host, port_for(args.port, i));
        let listener = bind(format!("engine {i} HTTP"), http_addr)?;
        let http = listener.local_addr().map_err(|source| MockError::Bind {
            what: "listener".into(),
            addr: http_addr,
            source,
        })?;
        let side = if args.role == Role::Prefill {
            let a = SocketAddr::new(args.host, port_for(args.kv_side_channel_port, i));
            Some(bind(format!("engine {i} KV side channel"), a)?)
        } else {
            None
        };
        let side_channel = side.as_ref().and_then(|l| l.local_addr().ok());
        let publisher = match args.kv_events_port {
            None => None,
            Some(p) => {
                let ep = |port: u16| format!("tcp://{}:{}", args.host, port_for(port, i));
                let cfg = PublisherConfig {
                    endpoint: ep(p),
                    replay_endpoint: args.kv_replay_port.map(ep),
                    topic: args.kv_events_topic.clone(),
                    buffer_steps: args.kv_events_buffer_steps,
                    format: args.wire_format(),
                    replay_framing: ReplayFraming::V033,
                    bind: true,
                    ..PublisherConfig::default()
                };
                Some(Publisher::start(&zmq_ctx, cfg).map_err(|source| MockError::Publisher { engine: i, source })?)
            }
        };
        let info = EngineInfo {
            index: i,
            model: args.model.clone(),
            lora_modules: args.lora_modules.clone(),
            http,
            kv_events: publisher.as_ref().map(|p| p.endpoint().to_owned()),
            kv_replay: publisher.as_ref().and_then(|p| p.replay_endpoint().map(str::to_owned)),
            kv_topic: args.kv_events_topic.clone(),
            kv_buffer_steps: args.kv_events_buffer_steps,
            side_channel,
            role: args.role,
            engine_id: format!("{:08x}-mock-{i}", splitmix(started ^ http.port() as u64) as u32),
            api_key: args.api_key.clone(),
            max_body_bytes: args.max_body_bytes,
            hash_algo: args.hash_algo_name(),
            fault_seed: splitmix(args.seed ^ i as u64),
        };
        addrs.push(EngineAddrs {
            http,
            kv_events: info.kv_events.clone(),
            kv_replay: info.kv_replay.clone(),
            side_channel,
        });
        let faults = Faults {
            fail_rate: args.fail_rate,
            fail_status: args.fail_status,
            stall_after: args.stall_after,
            cut_after: args.cut_after,
            flap_health: args.flap_health,
            ..Faults::default()
        };
        seeds.push(EngineSeed { info, listener, side, publisher, faults });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let exit_after = Arc::new(ExitAfter::new(args.exit_after));
    let engine_cfg = args.engine_config();
    let mut per_thread: Vec<Vec<EngineSeed>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, seed) in seeds.into_iter().enumerate() {
        per_thread[i % workers].push(seed);
    }
    let mut threads = Vec::with_capacity(workers);
    for (t, seeds) in per_thread.into_iter().enumerate() {
        let (stop, tokenizer, exit_after, engine_cfg) =
            (stop.clone(), tokenizer.clone(), exit_after.clone(), engine_cfg.clone());
        let handle = std::thread::Builder::new()
            .name(format!("gantry-mock-{t}"))
            .spawn(move || {
                let res = rt::block_on(driver, async move {
                    for seed in seeds {
                        start_engine(seed, &engine_cfg, &tokenizer, &exit_after, started);
                    }
                    // Shutdown is rare and needs no promptness: look at the flag a few times a second.
                    while !stop.load(Ordering::SeqCst) {
                        monoio::time::sleep(Duration::from_millis(50)).await;
                    }
                });
                if let Err(e) = res {
                    tracing::error!(error = %e, "mock worker runtime failed to start");
                }
            })
            .map_err(MockError::Thread)?;
        threads.push(handle);
    }
    Ok(MockServer { engines: addrs, driver: driver.resolved_name(), stop, threads })
}

fn start_engine(
    seed: EngineSeed,
    cfg: &engine::EngineConfig,
    tokenizer: &Arc<Tokenizer>,
    exit_after: &Arc<ExitAfter>,
    started: u64,
) {
    let core = EngineCore::new(cfg.clone(), tokenizer.output_tokens().to_vec(), tokenizer.eos_token_id());
    let seed_port = u64::from(seed.info.http.port());
    let limits = Limits { max_body_bytes: seed.info.max_body_bytes, ..Limits::default() };
    let engine = Rc::new(Engine {
        core: RefCell::new(core),
        wake: runner::Notify::default(),
        publisher: seed.publisher,
        info: seed.info,
        tokenizer: tokenizer.clone(),
        faults: RefCell::new(seed.faults),
        exit_after: exit_after.clone(),
        started,
        request_seq: Cell::new(0),
        id_salt: splitmix(
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ (seed_port << 48),
        ),
    });
    let server_cfg = Rc::new(ServerConfig { limits, ..ServerConfig::default() });
    match monoio::net::TcpListener::from_std(seed.listener) {
        Ok(l) => {
            monoio::spawn(server::serve(l, Rc::new(api::Api { engine: engine.clone() }), server_cfg.clone()));
        }
        Err(e) => tracing::error!(error = %e, engine = engine.info.index, "cannot register the HTTP listener"),
    }
    if let Some(side) = seed.side {
        match monoio::net::TcpListener::from_std(side) {
            Ok(l) => {
                monoio::spawn(server::serve(l, Rc::new(pd::SideChannel { engine: engine.clone() }), server_cfg));
            }
            Err(e) => {
                tracing::error!(error = %e, engine = engine.info.index, "cannot register the side-channel listener")
            }
        }
    }
    monoio::spawn(runner::run_loop(engine));
}

/// Runs the mock in the foreground until the process is stopped.
pub fn run(args: &MockArgs) -> Result<(), MockError> {
    let server = spawn(args)?;
    for (i, e) in server.engines.iter().enumerate() {
        tracing::info!(
            engine = i,
            url = %e.url(),
            kv_events = e.kv_events.as_deref().unwrap_or("off"),
            kv_replay = e.kv_replay.as_deref().unwrap_or("off"),
            side_channel = ?e.side_channel,
            "serving {} ({:?}) with the {} driver",
            args.model,
            args.role,
            server.driver,
        );
    }
    server.wait();
    Ok(())
}
