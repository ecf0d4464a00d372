//! HTTP/1.1 on monoio, written once and shared by the proxy and the mock engine.
//!
//! Heads are parsed with `httparse` and kept as the raw bytes plus offsets, so a request costs
//! one allocation for its head and none for its headers. Bodies are framed by Content-Length or
//! chunked transfer coding, both ways. Everything read from the peer is bounded by [`Limits`].
//!
//! - [`server`]: accept loop and per-connection keep-alive loop; a [`server::Handler`] answers
//!   each request through a [`server::Responder`] (whole body or chunked stream). A client that
//!   goes away while its handler runs cancels the handler (its future is dropped).
//! - [`client`]: one keep-alive connection to an upstream: write a request, read the head, then
//!   the body whole or chunk by chunk.
//! - [`sse`]: incremental parser for `text/event-stream` bodies.

mod body;
pub mod chunked;
pub mod client;
mod head;
pub mod server;
pub mod sse;

#[cfg(test)]
mod tests;

use std::time::Duration;

pub use body::{BodyReader, STREAM_READ_RESERVE};
pub use head::{Headers, Method, RequestHead, ResponseHead, MAX_HEADERS_CAP};

/// Largest request or response head accepted by default, in bytes.
pub const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header lines accepted in one head by default.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Largest body accepted by default, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Default time allowed to receive a complete request head once its first byte arrived.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time allowed to receive a complete request body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time an idle keep-alive connection is kept open.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// Bounds on what a peer may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest head (request line or status line plus headers), in bytes. Beyond it: 431.
    pub max_head_bytes: usize,
    /// Most header lines. Beyond it: 431.
    pub max_headers: usize,
    /// Largest body, in bytes. Beyond it: 413.
    pub max_body_bytes: usize,
    /// Time allowed for a whole head once its first byte arrived (slowloris guard). Beyond: 408.
    pub header_timeout: Duration,
    /// Time allowed for a whole body. Beyond it: 408.
    pub body_timeout: Duration,
    /// Time an idle keep-alive connection waits for its next request before it is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What went wrong reading or writing HTTP, with the status a server answers it with.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The head is not valid HTTP/1.x.
    #[error("malformed HTTP head: {0}")]
    Parse(httparse::Error),
    /// The head is larger than [`Limits::max_head_bytes`].
    #[error("HTTP head larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// More header lines than [`Limits::max_headers`].
    #[error("more than {limit} header lines")]
    TooManyHeaders {
        /// The limit in force.
        limit: usize,
    },
    /// The body is larger than [`Limits::max_body_bytes`].
    #[error("body larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// Content-Length is not a number, or several disagree.
    #[error("invalid Content-Length header")]
    BadContentLength,
    /// Transfer-Encoding other than chunked.
    #[error("unsupported Transfer-Encoding (only chunked is supported)")]
    UnsupportedTransferEncoding,
    /// The chunked framing is broken.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// A timer ran out while waiting for the named part.
    #[error("timed out waiting for the {0}")]
    Timeout(&'static str),
    /// The peer closed the connection before the named part was complete.
    #[error("connection closed before the {0} was complete")]
    UnexpectedEof(&'static str),
}

impl HttpError {
    /// The status a server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::Timeout(_) => 408,
            HttpError::UnsupportedTransferEncoding => 501,
            HttpError::Io(_) | HttpError::UnexpectedEof(_) => 400,
            HttpError::Parse(_) | HttpError::BadContentLength | HttpError::BadChunk(_) => 400,
        }
    }
}

/// The reason phrase for a status code (HTTP/1.1 still sends one).
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// How a message body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (e.g. a response to HEAD, 204, 304).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// Determines a message's body framing from its headers (RFC 9112 §6.3).
pub(crate) fn framing_from_headers(headers: &Headers<'_>) -> Result<BodyFraming, HttpError> {
    let mut te_chunked = None;
    let mut length: Option<u64> = None;
    for (name, value) in headers.iter() {
        if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(|&b| b == b',').next().map(|v| v.trim_ascii()).unwrap_or_default();
            te_chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            let s = std::str::from_utf8(value.trim_ascii()).map_err(|_| HttpError::BadContentLength)?;
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadContentLength);
            }
            let n: u64 = s.parse().map_err(|_| HttpError::BadContentLength)?;
            if length.is_some_and(|old| old != n) {
                return Err(HttpError::BadContentLength);
            }
            length = Some(n);
        }
    }
    match (te_chunked, length) {
        (Some(true), _) => Ok(BodyFraming::Chunked),
        (Some(false), _) => Err(HttpError::UnsupportedTransferEncoding),
        (None, Some(n)) => Ok(BodyFraming::Length(n)),
        (None, None) => Ok(BodyFraming::None),
    }
}
