//! Active health checks: probe every engine's `/health` on an interval; thresholds of
//! consecutive results flip an engine down or back up. Passive ejection lives on the request
//! path (`forward.rs`); both only write the engine's atomics.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::config::HealthConf;
use crate::fleet::{EngineState, SharedFleet};
use crate::http::client::ClientConn;

/// `GET path` on an engine over a fresh `Connection: close` connection, all within `timeout`:
/// its status and body, or None on any failure.
async fn get(
    addr: std::net::SocketAddr,
    authority: &str,
    path: &str,
    timeout: Duration,
) -> Option<(u16, bytes::Bytes)> {
    let exchange = async {
        let mut c = ClientConn::connect(addr, timeout).await.ok()?;
        let (head, body) =
            c.request("GET", path, &[("host", authority.as_bytes()), ("connection", b"close")], b"").await.ok()?;
        Some((head.status, body))
    };
    monoio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// Probes one engine: true if `/health` answers 2xx within `timeout`.
pub async fn probe(addr: std::net::SocketAddr, authority: &str, timeout: Duration) -> bool {
    get(addr, authority, "/health", timeout).await.is_some_and(|(status, _)| (200..300).contains(&status))
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
                if e.max_model_len.load(Ordering::Relaxed) == 0 {
                    learn_max_model_len(e, timeout).await;
                }
                e.probe_fail_streak.store(0, Ordering::Relaxed);
                let n = e.probe_ok_streak.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= conf.healthy_threshold && e.probe_down.swap(false, Ordering::Relaxed) {
                    tracing::info!(engine = %e.url, "engine healthy again");
                    // It may have restarted with another context length: read it again.
                    e.max_model_len.store(0, Ordering::Relaxed);
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
        // The models' lengths from what their engines reported, in the fleet as it is now (a
        // reload or an admin edit may have swapped it during the round, or removed the engine
        // that set the least).
        fleet.load().relearn_max_model_len();
        monoio::time::sleep_until(round + interval).await;
    }
}

/// Reads a healthy engine's context length from its `/v1/models` (vLLM lists `max_model_len`
/// per served model), so prompts too long for it get a 400 at the proxy without a model
/// `max_model_len` in the config. Tried on each good probe until `/v1/models` answers; an engine
/// whose answer lists no length for its model is not asked again until it comes back from down.
async fn learn_max_model_len(e: &EngineState, timeout: Duration) {
    let Some((200, body)) = get(e.addr, &e.authority, "/v1/models", timeout).await else { return };
    let Some(len) = max_model_len_of(&body, &e.model) else {
        e.max_model_len.store(crate::fleet::NO_MAX_MODEL_LEN, Ordering::Relaxed);
        return;
    };
    e.max_model_len.store(len, Ordering::Relaxed);
    tracing::debug!(engine = %e.url, max_model_len = len, "engine context length learned");
}

/// `max_model_len` of `model` in a `/v1/models` body, if it is a positive integer.
pub fn max_model_len_of(body: &[u8], model: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let entry = v.get("data")?.as_array()?.iter().find(|m| m.get("id").and_then(|i| i.as_str()) == Some(model))?;
    entry.get("max_model_len")?.as_u64().filter(|&n| n > 0)
}

/// The sum of every sample of metric `name` in Prometheus text (labels ignored), if any. A
/// sample's value is the first field after its labels (a timestamp may follow); label values
/// may hold spaces and braces.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let after_labels = match rest.as_bytes().first() {
            Some(b'{') => match labels_end(rest) {
                Some(end) => &rest[end..],
                None => continue,
            },
            Some(b' ' | b'\t') => rest,
            _ => continue,
        };
        let value = after_labels.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value.filter(|v| v.is_finite()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Where the label set that `s` starts with (`{...}`) ends: just past its `}`, quotes and
/// escapes respected.
fn labels_end(s: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, b) in s.bytes().enumerate().skip(1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// Scrapes every engine's `/metrics` once per `interval` for the `kv` cost's engine-reported
/// pressure (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`). An engine that does not
/// answer keeps its last values until it does (its health is the prober's business).
pub async fn scrape_loop(fleet: SharedFleet, interval: Duration, timeout: Duration) {
    loop {
        let round = monoio::time::Instant::now();
        let snapshot = fleet.load_full();
        for (pool, e) in snapshot.engines() {
            if pool.policy != crate::config::PolicyKind::Kv {
                continue;
            }
            let Some((200, body)) = get(e.addr, &e.authority, "/metrics", timeout).await else { continue };
            let text = String::from_utf8_lossy(&body);
            if let Some(w) = metric_sum(&text, "vllm:num_requests_waiting") {
                e.waiting.store(w.max(0.0) as u64, Ordering::Relaxed);
            }
            if let Some(u) = metric_sum(&text, "vllm:kv_cache_usage_perc") {
                e.kv_usage_ppm.store((u.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
            }
        }
        monoio::time::sleep_until(round + interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{max_model_len_of, metric_sum};

    #[test]
    fn max_model_len_is_read_for_the_engines_model_only() {
        let body = br#"{"object":"list","data":[
            {"id":"other","object":"model","max_model_len":4096},
            {"id":"m","object":"model","root":"m","parent":null,"max_model_len":8192}]}"#;
        assert_eq!(max_model_len_of(body, "m"), Some(8192));
        assert_eq!(max_model_len_of(body, "other"), Some(4096));
        assert_eq!(max_model_len_of(body, "absent"), None);
        assert_eq!(max_model_len_of(br#"{"data":[{"id":"m","max_model_len":0}]}"#, "m"), None, "0 is no length");
        assert_eq!(max_model_len_of(br#"{"data":[{"id":"m","max_model_len":"8k"}]}"#, "m"), None);
        assert_eq!(max_model_len_of(b"not json", "m"), None);
    }

    #[test]
    fn metric_sum_adds_every_label_set_and_skips_look_alikes() {
        let text = "# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{engine=\"0\"} 3.0\nvllm:num_requests_waiting{engine=\"1\"} 2\nvllm:num_requests_waiting_total 99\nvllm:kv_cache_usage_perc 0.25\n";
        assert_eq!(metric_sum(text, "vllm:num_requests_waiting"), Some(5.0));
        assert_eq!(metric_sum(text, "vllm:kv_cache_usage_perc"), Some(0.25));
        assert_eq!(metric_sum(text, "vllm:absent"), None);
        // A timestamp after the value, and a label value with a space, a brace and a quote.
        let text = "x_total{model=\"a } b\\\" c\"} 4 1700000000\nx_total 1\nx_total{bad 9\n";
        assert_eq!(metric_sum(text, "x_total"), Some(5.0));
    }
}
