//! P/D between mock engines: the prefill side's KV side channel and the decode side's pull.
//!
//! vLLM's decode engine reads the prompt's KV from the prefill engine over NIXL after a
//! handshake on the prefill engine's side channel (`remote_host:remote_port`). The mock keeps
//! that shape without NIXL: the prefill engine serves `POST /kv/pull` on its side-channel port;
//! a pull names the lease (`remote_request_id`) and the blocks, and ends the lease (vLLM's
//! completion notification frees the blocks the same way). An unknown or expired lease gives
//! 404, which the decode engine turns into vLLM's KV-load failure (HTTP 500, or an SSE error
//! event). The transfer time comes from the timing model on the decode side.

use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use gantry_proxy::http::client::ClientConn;
use gantry_proxy::http::server::{Handler, Request, Responder, Response};
use serde::Deserialize;

use super::engine::{PullError, RemotePrefill};
use super::runner::Engine;

/// Time allowed for one pull exchange with a prefill engine.
const PULL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Deserialize)]
struct PullBody {
    remote_request_id: String,
    #[serde(default)]
    remote_block_ids: Vec<u64>,
}

/// The prefill engine's side-channel server.
#[derive(Debug)]
pub struct SideChannel {
    /// The engine whose leases it serves.
    pub engine: Rc<Engine>,
}

impl Handler for SideChannel {
    async fn handle(&self, req: Request, resp: &mut Responder) {
        if req.head.path() != "/kv/pull" {
            let _ = resp.send(Response::json(404, r#"{"error":"unknown side-channel path"}"#)).await;
            return;
        }
        let body: PullBody = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(e) => {
                let msg = serde_json::json!({ "error": format!("bad pull request: {e}") });
                let _ = resp.send(Response::json(400, msg.to_string())).await;
                return;
            }
        };
        let result =
            self.engine.core.borrow_mut().pull_lease(&body.remote_request_id, &body.remote_block_ids, Instant::now());
        self.engine.wake.notify();
        let r = match result {
            Ok(n) => Response::json(200, format!(r#"{{"num_blocks":{n}}}"#)),
            Err(PullError::Unknown) => Response::json(
                404,
                serde_json::json!({ "error": format!("no live KV lease for request {}", body.remote_request_id) }).to_string(),
            ),
            Err(PullError::BlockMismatch) => Response::json(
                409,
                serde_json::json!({ "error": format!("block ids do not match the lease of request {}", body.remote_request_id) }).to_string(),
            ),
        };
        let _ = resp.send(r).await;
    }
}

/// Decode side: pulls the KV described by `remote` from its prefill engine.
pub async fn pull_remote(remote: &RemotePrefill, engine_id: &str) -> Result<(), String> {
    let addr: SocketAddr = (remote.host.as_str(), remote.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve remote_host {}:{}", remote.host, remote.port))?;
    let body = serde_json::json!({
        "remote_request_id": remote.request_id,
        "remote_block_ids": remote.block_ids,
        "engine_id": engine_id,
    })
    .to_string();
    let exchange = async {
        let mut conn = ClientConn::connect(addr, PULL_TIMEOUT).await.map_err(|e| e.to_string())?;
        let host = addr.to_string();
        conn.request(
            "POST",
            "/kv/pull",
            &[("host", host.as_bytes()), ("content-type", b"application/json"), ("connection", b"close")],
            body.as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())
    };
    match monoio::time::timeout(PULL_TIMEOUT, exchange).await {
        Err(_) => Err(format!("KV transfer from {addr} timed out")),
        Ok(Err(e)) => Err(format!("KV transfer from {addr} failed: {e}")),
        Ok(Ok((head, _))) if head.status == 200 => Ok(()),
        Ok(Ok((head, body))) => Err(format!(
            "KV transfer of request {} from {addr} failed ({}): {}",
            remote.request_id,
            head.status,
            String::from_utf8_lossy(&body)
        )),
    }
}
