//! `gantry-proxy`: Gantry's data plane on monoio.
//!
//! - [`http`]: one HTTP/1.1 server and client on monoio (httparse heads, keep-alive,
//!   Content-Length and chunked bodies both ways, limits and timeouts, client-disconnect
//!   detection that cancels the handler), plus an incremental SSE parser. Shared with the mock.
//! - [`rt`]: a monoio runtime per thread, io_uring with an automatic epoll fallback.
//! - `gantry serve`: [`config`] (the TOML file), [`fleet`] (pools and engines, swapped
//!   atomically), [`policy`] (engine choice), [`forward`] (the request path: route, forward,
//!   retry, relay, measure), [`health`] (active probes), [`admin`] (the admin API),
//!   [`metrics`] (`gantry_*`), [`serve`] (threads, reload, drain).
//! - [`alloc`]: the allocator the proxy runs on, and its settings.
//! - [`route`]: request routing; today [`route::grid`], pool choice by NVIDIA Dynamo's
//!   GlobalRouter grid (its JSON config read unchanged).
//!
//! Read `proxy/tests/http.rs` (the HTTP layer) and `proxy/tests/serve.rs` (the proxy in front
//! of mock engines) first.
#![deny(unsafe_code)] // allowed in `alloc` only (one mimalloc option call)

pub mod admin;
#[allow(unsafe_code)]
pub mod alloc;
pub mod config;
pub mod fleet;
pub mod forward;
pub mod health;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod route;
pub mod rt;
pub mod serve;

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;

/// Runs two futures until the first finishes; the other is dropped.
pub async fn race<A: Future<Output = ()>, B: Future<Output = ()>>(a: A, b: B) {
    let mut a = pin!(a);
    let mut b = pin!(b);
    poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() || b.as_mut().poll(cx).is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}
