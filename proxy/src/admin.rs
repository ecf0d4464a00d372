//! The admin API, on its own listener, behind a bearer token: list engines with health and
//! load, add, remove and drain engines. Changes swap in a new fleet snapshot.
//!
//! - `GET /admin/engines` → `{"engines": [{pool, url, model, healthy, in_flight, draining, ...}]}`
//! - `POST /admin/engines` `{"pool", "url", "model"}` → 201
//! - `DELETE /admin/engines` `{"url"}` → 200 (404 if unknown)
//! - `POST /admin/engines/drain` `{"url"}` → 200: no new requests go to it

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Deserialize;

use crate::fleet::{now_ms, EngineState, SharedFleet};
use crate::forward::error_response;
use crate::http::server::{Handler, Request, Responder, Response};
use crate::http::Method;
use crate::metrics::Metrics;

/// The admin handler.
#[derive(Debug)]
pub struct Admin {
    /// The fleet it edits.
    pub fleet: SharedFleet,
    /// Metrics (for `GET /metrics` on the admin port too).
    pub metrics: Arc<Metrics>,
    /// Required bearer token.
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineBody {
    #[serde(default)]
    pool: Option<String>,
    url: String,
    #[serde(default)]
    model: Option<String>,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Admin {
    fn list(&self) -> Response {
        let fleet = self.fleet.load();
        let now = now_ms();
        let engines: Vec<serde_json::Value> = fleet
            .engines()
            .map(|(p, e)| {
                serde_json::json!({
                    "pool": p.name, "url": e.url, "model": e.model, "healthy": e.healthy(now),
                    "in_flight": e.load(), "draining": e.draining.load(Ordering::Relaxed),
                    "probe_down": e.probe_down.load(Ordering::Relaxed),
                    "ejected_ms": e.ejected_until.load(Ordering::Relaxed).saturating_sub(now),
                })
            })
            .collect();
        Response::json(200, serde_json::json!({"engines": engines}).to_string())
    }

    fn edit(&self, method: &Method, path: &str, body: &[u8]) -> Response {
        let b: EngineBody = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => return error_response(400, &format!("invalid body: {e}"), None),
        };
        let url = b.url.trim_end_matches('/').to_owned();
        let _changing = crate::fleet::change_lock();
        let fleet = self.fleet.load_full();
        let exists = fleet.engines().any(|(_, e)| e.url == url);
        match (method, path) {
            (Method::Post, "/admin/engines") => {
                let Some(model) = b.model else { return error_response(400, "`model` is required", Some("model")) };
                match fleet.model(&model) {
                    None => return error_response(400, &format!("`{model}` is not a configured model"), Some("model")),
                    Some(info) if info.lora.is_some() => {
                        let base = &info.served_by;
                        let msg =
                            format!("`{model}` is a LoRA adapter: register the engine under its base model `{base}`");
                        return error_response(400, &msg, Some("model"));
                    }
                    Some(_) => {}
                }
                let pool = b.pool.unwrap_or_else(|| fleet.pools[0].name.clone());
                if !fleet.pools.iter().any(|p| p.name == pool) {
                    return error_response(404, &format!("no pool `{pool}`"), Some("pool"));
                }
                if exists {
                    return error_response(409, &format!("engine {url} is already registered"), Some("url"));
                }
                let state = match EngineState::new(&url, &model) {
                    Ok(s) => Arc::new(s),
                    Err(m) => return error_response(400, &m, Some("url")),
                };
                let mut state = Some(state);
                let new = fleet.edit(|name, engines| {
                    if name == pool {
                        engines.extend(state.take());
                    }
                });
                self.fleet.store(Arc::new(new));
                tracing::info!(%url, %pool, "engine added");
                Response::json(201, serde_json::json!({"added": url, "pool": pool}).to_string())
            }
            (Method::Delete, "/admin/engines") => {
                if !exists {
                    return error_response(404, &format!("no engine {url}"), Some("url"));
                }
                let new = fleet.edit(|_, engines| engines.retain(|e| e.url != url));
                self.fleet.store(Arc::new(new));
                tracing::info!(%url, "engine removed");
                Response::json(200, serde_json::json!({"removed": url}).to_string())
            }
            (Method::Post, "/admin/engines/drain") => match fleet.engines().find(|(_, e)| e.url == url) {
                Some((_, e)) => {
                    e.draining.store(true, Ordering::Relaxed);
                    tracing::info!(%url, "engine draining");
                    Response::json(200, serde_json::json!({"draining": url, "in_flight": e.load()}).to_string())
                }
                None => error_response(404, &format!("no engine {url}"), Some("url")),
            },
            _ => error_response(405, "method not allowed", None),
        }
    }
}

impl Handler for Admin {
    async fn handle(&self, req: Request, resp: &mut Responder) {
        let authorized = req
            .head
            .headers()
            .get_str("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), self.token.as_bytes()));
        let r = if !authorized {
            error_response(401, "missing or wrong admin bearer token", None)
        } else {
            match (&req.head.method, req.head.path()) {
                (Method::Get, "/admin/engines") => self.list(),
                (Method::Get, "/metrics") => Response::new(200)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(self.metrics.render(&self.fleet.load())),
                (m, p @ ("/admin/engines" | "/admin/engines/drain")) => self.edit(m, p, &req.body),
                (_, p) => error_response(404, &format!("no admin route {p}"), None),
            }
        };
        let _ = resp.send(r).await;
    }
}
