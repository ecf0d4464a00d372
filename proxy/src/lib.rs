//! `gantry-proxy`: Gantry's data plane on monoio.
//!
//! Today this crate holds the pieces the proxy and the mock engine share:
//! - [`http`]: one HTTP/1.1 server and client on monoio (httparse heads, keep-alive,
//!   Content-Length and chunked bodies both ways, limits and timeouts, client-disconnect
//!   detection that cancels the handler), plus an incremental SSE parser.
//! - [`rt`]: building a monoio runtime per thread, io_uring with an automatic epoll fallback.
//!
//! The OpenAI-facing proxy (`gantry serve`), routing and P/D orchestration come next and build
//! on these. Read `proxy/tests/http.rs` first: it drives the server and client over loopback.
#![forbid(unsafe_code)]

pub mod http;
pub mod rt;
