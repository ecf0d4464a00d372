//! `--engine-metrics`: scrape engines' Prometheus `/metrics` before and after a run and report
//! what changed: prefix-cache hits and queries (tokens) and finished requests.

use std::time::Duration;

use gantry_proxy::health::metric_sum;
use gantry_proxy::http::client::ClientConn;
use gantry_proxy::rt::{self, Driver};

use super::client::Url;

/// The counters read from one engine at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    /// `vllm:prefix_cache_hits_total` (tokens), summed over label sets.
    pub prefix_hits: f64,
    /// `vllm:prefix_cache_queries_total` (tokens), summed over label sets.
    pub prefix_queries: f64,
    /// `vllm:request_success_total`, summed over finish reasons.
    pub requests: f64,
}

impl Counters {
    /// `self - before`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters {
            prefix_hits: self.prefix_hits - before.prefix_hits,
            prefix_queries: self.prefix_queries - before.prefix_queries,
            requests: self.requests - before.requests,
        }
    }
}

/// Sums the samples of the three counters in a Prometheus text page.
pub fn parse(text: &str) -> Counters {
    let sum = |name| metric_sum(text, name).unwrap_or(0.0);
    Counters {
        prefix_hits: sum("vllm:prefix_cache_hits_total"),
        prefix_queries: sum("vllm:prefix_cache_queries_total"),
        requests: sum("vllm:request_success_total"),
    }
}

/// GETs `url`'s `/metrics` (the URL may already end in `/metrics`) and reads the counters.
pub fn scrape(url: &str) -> Result<Counters, String> {
    let u = Url::parse(url)?;
    let path = if u.prefix.ends_with("/metrics") { u.prefix.clone() } else { format!("{}/metrics", u.prefix) };
    let res = rt::block_on(Driver::Legacy, async {
        let mut c = ClientConn::connect(u.addr, Duration::from_secs(5)).await.map_err(|e| e.to_string())?;
        let headers = [("host", u.authority.as_bytes())];
        let fut = c.request("GET", &path, &headers, b"");
        match monoio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timed out after 10 s".to_owned()),
        }
    })
    .map_err(|e| format!("scraping {url}: cannot start a runtime: {e}"))?;
    let (head, body) = res.map_err(|e| format!("scraping {url}{path}: {e}"))?;
    if head.status != 200 {
        return Err(format!("scraping {url}: {path} answered {}", head.status));
    }
    Ok(parse(&String::from_utf8_lossy(&body)))
}

/// Scrapes every URL (in order), failing on the first that cannot be read.
pub fn scrape_all(urls: &[String]) -> Result<Vec<Counters>, String> {
    urls.iter().map(|u| scrape(u)).collect()
}
