//! `gantry serve`: worker threads, the health prober, the admin listener, reload and drain.
//!
//! Listeners are bound before any thread starts (one `SO_REUSEPORT` socket per worker, all on
//! the same address), so a busy port fails startup with the address named and a returned
//! [`ProxyServer`] already accepts. Each worker runs one monoio runtime with its own
//! [`Proxy`] handler and upstream pool. The prober runs on its own thread and only writes
//! atomics. Reload (SIGHUP or [`ProxyServer::reload`]) builds a new fleet and swaps it in;
//! connections in progress are untouched. Drain (SIGTERM) stops accepting, then waits for
//! in-flight requests up to a deadline.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::admin::Admin;
use crate::config::{Config, ConfigError, Overrides};
use crate::fleet::{Fleet, SharedFleet};
use crate::forward::{PathConf, Proxy};
use crate::http::server::{self, ServerConfig};
use crate::metrics::Metrics;
use crate::rt::{self, Driver};

/// How long a drain waits for in-flight requests by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// A thread could not start.
    #[error("starting a thread: {0}")]
    Thread(std::io::Error),
}

fn bind_reuseport(addr: SocketAddr, what: &'static str) -> Result<StdListener, ServeError> {
    let err = |source| ServeError::Bind { what, addr, source };
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None).map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    s.listen(4096).map_err(err)?;
    Ok(s.into())
}

/// The default segment of a `kv` pool's index: `/dev/shm/gantry-kvindex-<port>-<pool>`.
pub fn default_index_path(port: u16, pool: &str) -> PathBuf {
    let safe: String =
        pool.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    PathBuf::from(format!("/dev/shm/gantry-kvindex-{port}-{safe}"))
}

/// Starts the index of every `kv` pool that has none yet. A pool whose index cannot start
/// routes on load alone (logged, and `gantry_route_index_available` says 0).
fn attach_indexes(fleet: &mut Fleet, port: u16) {
    for pool in &mut fleet.pools {
        if pool.policy != crate::config::PolicyKind::Kv || pool.index.is_some() {
            continue;
        }
        let path = pool.conf.index_path.clone().unwrap_or_else(|| default_index_path(port, &pool.name));
        match crate::route::index::PoolIndex::start(&pool.conf, path) {
            Ok(index) => *pool = pool.with_index(Some(Arc::new(index))),
            Err(e) => {
                tracing::error!(pool = %pool.name, error = %e, "kv index unavailable: the pool routes on load alone")
            }
        }
    }
}

/// A running proxy. Dropping it stops every thread (without draining).
#[derive(Debug)]
pub struct ProxyServer {
    /// Client listener address (resolved).
    pub addr: SocketAddr,
    /// Admin listener address, if configured.
    pub admin: Option<SocketAddr>,
    /// The I/O driver the workers run.
    pub driver: &'static str,
    /// The fleet.
    pub fleet: SharedFleet,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    /// The command line's settings, applied again after each reload.
    overrides: Overrides,
    config: Config,
    stop_accepting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Waits until `flag` is set. Shutdown needs no promptness, so it looks a few times a second.
async fn wait_flag(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the proxy described by `cfg` (read from `config_path` if given, for reloads).
pub fn spawn(cfg: Config, config_path: Option<PathBuf>) -> Result<ProxyServer, ServeError> {
    spawn_with(cfg, config_path, Overrides::default())
}

/// [`spawn`] for a `cfg` that `overrides` (the command line's settings) were applied to: a
/// reload applies them again to what it reads from `config_path`.
pub fn spawn_with(cfg: Config, config_path: Option<PathBuf>, overrides: Overrides) -> Result<ProxyServer, ServeError> {
    cfg.validate()?;
    let driver = Driver::parse(&cfg.server.driver).unwrap_or_default();
    let workers = match cfg.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listen = cfg.listen_addr()?;
    let first = bind_reuseport(listen, "the client listener")?;
    let addr =
        first.local_addr().map_err(|source| ServeError::Bind { what: "the client listener", addr: listen, source })?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind_reuseport(addr, "the client listener")?);
    }
    let admin_listener = match &cfg.admin {
        Some(a) => {
            let a_addr: SocketAddr = a.listen.parse().map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
                key: "admin.listen".into(),
                problem: e.to_string(),
            })?;
            Some(bind_reuseport(a_addr, "the admin listener")?)
        }
        None => None,
    };
    let admin = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let mut built = Fleet::build(&cfg, None)?;
    attach_indexes(&mut built, addr.port());
    let fleet: SharedFleet = Arc::new(ArcSwap::from_pointee(built));
    let metrics = Arc::new(Metrics::default());
    let conf =
        Arc::new(PathConf { upstream: cfg.upstream.clone(), retry: cfg.retry.clone(), health: cfg.health.clone() });
    let server_cfg = ServerConfig { limits: cfg.limits(), open_connections: Some(metrics.open_connections.clone()) };
    let stop_accepting = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let (fleet, metrics, conf, server_cfg) = (fleet.clone(), metrics.clone(), conf.clone(), server_cfg.clone());
        let (stop_accepting, stop) = (stop_accepting.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name(format!("gantry-worker-{i}"))
            .spawn(move || {
                crate::metrics::set_worker(i);
                let res = rt::block_on(driver, async move {
                    let listener = match monoio::net::TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, worker = i, "cannot register the listener");
                            return;
                        }
                    };
                    let handler = Rc::new(Proxy::new(fleet, metrics, conf, 0x9e37_79b9 ^ i as u64));
                    let accept = server::serve(listener, handler, Rc::new(server_cfg));
                    crate::race(accept, wait_flag(&stop_accepting)).await;
                    // Not accepting any more; connections in progress finish on this runtime.
                    wait_flag(&stop).await;
                });
                if let Err(e) = res {
                    tracing::error!(error = %e, worker = i, "worker runtime failed to start");
                }
            })
            .map_err(ServeError::Thread)?;
        threads.push(t);
    }
    let (h_fleet, h_conf, h_stop) = (fleet.clone(), cfg.health.clone(), stop.clone());
    if cfg.health.interval_ms > 0 {
        let t = std::thread::Builder::new()
            .name("gantry-health".into())
            .spawn(move || {
                let _ = rt::block_on(
                    Driver::Legacy,
                    crate::race(crate::health::probe_loop(h_fleet, h_conf), wait_flag(&h_stop)),
                );
            })
            .map_err(ServeError::Thread)?;
        threads.push(t);
    }
    if cfg.routing.engine_metrics_interval_ms > 0 {
        let (s_fleet, s_stop) = (fleet.clone(), stop.clone());
        let interval = Duration::from_millis(cfg.routing.engine_metrics_interval_ms);
        let timeout = Duration::from_millis(cfg.health.timeout_ms);
        let t = std::thread::Builder::new()
            .name("gantry-scrape".into())
            .spawn(move || {
                let _ = rt::block_on(
                    Driver::Legacy,
                    crate::race(crate::health::scrape_loop(s_fleet, interval, timeout), wait_flag(&s_stop)),
                );
            })
            .map_err(ServeError::Thread)?;
        threads.push(t);
    }
    if let (Some(l), Some(a)) = (admin_listener, cfg.admin.clone()) {
        let (a_fleet, a_metrics, a_stop) = (fleet.clone(), metrics.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name("gantry-admin".into())
            .spawn(move || {
                let _ = rt::block_on(Driver::Legacy, async move {
                    let Ok(listener) = monoio::net::TcpListener::from_std(l) else { return };
                    let handler = Rc::new(Admin { fleet: a_fleet, metrics: a_metrics, token: a.token });
                    crate::race(server::serve(listener, handler, Rc::new(ServerConfig::default())), wait_flag(&a_stop))
                        .await;
                });
            })
            .map_err(ServeError::Thread)?;
        threads.push(t);
    }
    Ok(ProxyServer {
        addr,
        admin,
        driver: driver.resolved_name(),
        fleet,
        metrics,
        config_path,
        overrides,
        config: cfg,
        stop_accepting,
        stop,
        threads,
    })
}

impl ProxyServer {
    /// Re-reads the config file (if any) and swaps in the new pools and engines. Engines that
    /// stay keep their load and health; listener settings need a restart.
    pub fn reload(&mut self) -> Result<(), ConfigError> {
        let Some(path) = &self.config_path else {
            return Err(ConfigError::Invalid {
                key: "--config".into(),
                problem: "started without a config file".into(),
            });
        };
        let mut new = Config::load(path)?;
        self.overrides.apply(&mut new);
        self.apply(new)
    }

    /// Swaps in the pools and engines of `new`.
    pub fn apply(&mut self, new: Config) -> Result<(), ConfigError> {
        new.validate()?;
        if new.server.listen != self.config.server.listen {
            tracing::warn!("server.listen changed: a restart is needed for it to take effect");
        }
        let _changing = crate::fleet::change_lock();
        let old = self.fleet.load();
        let mut fleet = Fleet::build(&new, Some(&old))?;
        // Indexes the new fleet does not keep (a pool removed, or its index settings changed) stop
        // now: a replacement at the same path needs the old writer's lock.
        for index in old.pools.iter().filter_map(|p| p.index.as_ref()) {
            if !fleet.pools.iter().any(|p| p.index.as_ref().is_some_and(|kept| Arc::ptr_eq(kept, index))) {
                index.close();
            }
        }
        drop(old);
        // Pools that kept their index follow their new engines; the others get a new one.
        fleet.sync_indexes();
        attach_indexes(&mut fleet, self.addr.port());
        let engines = fleet.engines().count();
        self.fleet.store(Arc::new(fleet));
        self.config = new;
        tracing::info!(engines, "configuration reloaded");
        Ok(())
    }

    /// Requests in flight through this proxy.
    pub fn in_flight(&self) -> u64 {
        self.fleet.load().engines().map(|(_, e)| e.load()).sum()
    }

    /// Stops accepting, waits for in-flight requests (up to `timeout`), then stops.
    pub fn drain(mut self, timeout: Duration) {
        self.stop_accepting.store(true, Ordering::SeqCst);
        let end = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = self.in_flight();
        if left > 0 {
            tracing::warn!(left, "drain deadline reached with requests still in flight");
        }
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop_accepting.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for ProxyServer {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Runs the proxy in the foreground: SIGHUP reloads, SIGTERM or SIGINT drains and returns.
pub fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    drain_timeout: Duration,
) -> Result<(), ServeError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM]).map_err(ServeError::Thread)?;
    let mut server = spawn_with(cfg, config_path, overrides)?;
    tracing::info!(listen = %server.addr, admin = ?server.admin, driver = server.driver, "gantry serve is up");
    for sig in signals.forever() {
        match sig {
            SIGHUP => {
                if let Err(e) = server.reload() {
                    tracing::error!(error = %e, "reload failed; keeping the previous configuration");
                }
            }
            _ => {
                tracing::info!(in_flight = server.in_flight(), "draining");
                server.drain(drain_timeout);
                return Ok(());
            }
        }
    }
    Ok(())
}
