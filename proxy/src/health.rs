//! Active health checks: probe every engine's `/health` on an interval; thresholds of
//! consecutive results flip an engine down or back up. Passive ejection lives on the request
//! path (`forward.rs`); both only write the engine's atomics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::config::HealthConf;
use crate::fleet::SharedFleet;
use crate::http::client::ClientConn;

/// Probes one engine: true if `/health` answers 2xx within `timeout`.
pub async fn probe(addr: std::net::SocketAddr, authority: &str, timeout: Duration) -> bool {
    let exchange = async {
        let mut c = ClientConn::connect(addr, timeout).await.ok()?;
        let (head, _) =
            c.request("GET", "/health", &[("host", authority.as_bytes()), ("connection", b"close")], b"").await.ok()?;
        Some((200..300).contains(&head.status))
    };
    matches!(monoio::time::timeout(timeout, exchange).await, Ok(Some(true)))
}

/// Probes the current fleet forever, one round per `interval_ms`.
pub async fn probe_loop(fleet: SharedFleet, conf: HealthConf) {
    let timeout = Duration::from_millis(conf.timeout_ms);
    let interval = Duration::from_millis(conf.interval_ms.max(1));
    loop {
        let round = monoio::time::Instant::now();
        let snapshot = fleet.load_full();
        for (_, e) in snapshot.engines() {
            let ok = probe(e.addr, &e.authority, timeout).await;
            if ok {
                e.probe_fail_streak.store(0, Ordering::Relaxed);
                let n = e.probe_ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= conf.healthy_threshold && e.probe_down.swap(false, Ordering::Relaxed) {
                    tracing::info!(engine = %e.url, "engine healthy again");
                }
            } else {
                e.probe_ok_streak.store(0, Ordering::Relaxed);
                let n = e.probe_fail_streak.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= conf.unhealthy_threshold && !e.probe_down.swap(true, Ordering::Relaxed) {
                    e.counters.ejections.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(engine = %e.url, failures = n, "engine marked down by health probes");
                }
            }
        }
        monoio::time::sleep_until(round + interval).await;
    }
}
