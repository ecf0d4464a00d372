//! Parsed request and response heads: the raw head bytes plus offsets into them.

use bytes::{Bytes, BytesMut};

use super::HttpError;

/// Most header lines any head may carry, whatever the configured limit (stack storage size).
pub const MAX_HEADERS_CAP: usize = 256;

/// A request method. The common ones are matched without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// HEAD
    Head,
    /// PUT
    Put,
    /// DELETE
    Delete,
    /// OPTIONS
    Options,
    /// PATCH
    Patch,
    /// Any other token.
    Other(String),
}

impl Method {
    fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "HEAD" => Method::Head,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            "PATCH" => Method::Patch,
            other => Method::Other(other.to_owned()),
        }
    }

    /// The method as sent on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Head => "HEAD",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Patch => "PATCH",
            Method::Other(s) => s,
        }
    }
}

/// Offsets of one header line inside a head buffer.
#[derive(Debug, Clone, Copy)]
struct HeaderSpan {
    name: (u32, u32),
    value: (u32, u32),
}

/// A view of the header lines of a head, in wire order, names as sent.
#[derive(Debug, Clone, Copy)]
pub struct Headers<'a> {
    raw: &'a [u8],
    spans: &'a [HeaderSpan],
}

impl<'a> Headers<'a> {
    /// Iterates `(name, value)` pairs in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let raw = self.raw;
        self.spans.iter().map(move |s| {
            let name = &raw[s.name.0 as usize..s.name.1 as usize];
            // httparse only accepts token characters in names, which are ASCII.
            let name = std::str::from_utf8(name).unwrap_or("");
            (name, &raw[s.value.0 as usize..s.value.1 as usize])
        })
    }

    /// The first value of the header `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    /// The first value of `name` as trimmed UTF-8, if present and valid.
    pub fn get_str(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(|v| std::str::from_utf8(v.trim_ascii()).ok())
    }

    /// Whether any `name` header contains the comma-separated token `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    /// Number of header lines.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are no header lines.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

fn span_of(base: *const u8, part: &[u8]) -> (u32, u32) {
    let start = part.as_ptr() as usize - base as usize;
    (start as u32, (start + part.len()) as u32)
}

fn collect_spans(base: &[u8], headers: &[httparse::Header<'_>]) -> Vec<HeaderSpan> {
    headers
        .iter()
        .map(|h| HeaderSpan { name: span_of(base.as_ptr(), h.name.as_bytes()), value: span_of(base.as_ptr(), h.value) })
        .collect()
}

/// The head's length if complete, None if more bytes are needed; limits applied either way.
fn head_len(
    parsed: httparse::Result<usize>,
    buffered: usize,
    max_headers: usize,
    max_head_bytes: usize,
) -> Result<Option<usize>, HttpError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n > max_head_bytes => {
            Err(HttpError::HeadTooLarge { limit: max_head_bytes })
        }
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buffered > max_head_bytes => {
            Err(HttpError::HeadTooLarge { limit: max_head_bytes })
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::TooManyHeaders { limit: max_headers }),
        Err(other) => Err(HttpError::Parse(other)),
    }
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct RequestHead {
    raw: Bytes,
    /// The request method.
    pub method: Method,
    target: (u32, u32),
    /// HTTP minor version (0 or 1).
    pub minor_version: u8,
    spans: Vec<HeaderSpan>,
}

impl RequestHead {
    /// Tries to parse a request head at the start of `buf`. On success the head's bytes are
    /// split off `buf` (zero-copy) and returned; `Ok(None)` means more bytes are needed.
    pub fn parse(
        buf: &mut BytesMut,
        max_headers: usize,
        max_head_bytes: usize,
    ) -> Result<Option<RequestHead>, HttpError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
        let max_headers = max_headers.min(MAX_HEADERS_CAP);
        let mut req = httparse::Request::new(&mut storage[..max_headers]);
        let Some(n) = head_len(req.parse(buf), buf.len(), max_headers, max_head_bytes)? else {
            return Ok(None);
        };
        let method = Method::parse(req.method.unwrap_or("GET"));
        let path = req.path.unwrap_or("/");
        let target = span_of(buf.as_ptr(), path.as_bytes());
        let minor_version = req.version.unwrap_or(1);
        let spans = collect_spans(buf, req.headers);
        let raw = buf.split_to(n).freeze();
        Ok(Some(RequestHead { raw, method, target, minor_version, spans }))
    }

    /// The request target as sent (path and query).
    pub fn target(&self) -> &str {
        let t = &self.raw[self.target.0 as usize..self.target.1 as usize];
        // httparse validates the target as visible ASCII.
        std::str::from_utf8(t).unwrap_or("/")
    }

    /// The path part of the target (without `?query`).
    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }

    /// The header lines.
    pub fn headers(&self) -> Headers<'_> {
        Headers { raw: &self.raw, spans: &self.spans }
    }

    /// Whether the connection stays open after this exchange (HTTP/1.1 default, 1.0 opt-in).
    pub fn keep_alive(&self) -> bool {
        let h = self.headers();
        if self.minor_version == 0 {
            h.has_token("connection", "keep-alive")
        } else {
            !h.has_token("connection", "close")
        }
    }

    /// The raw head bytes, request line through the blank line.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    raw: Bytes,
    /// The status code.
    pub status: u16,
    /// HTTP minor version (0 or 1).
    pub minor_version: u8,
    spans: Vec<HeaderSpan>,
}

impl ResponseHead {
    /// Tries to parse a response head at the start of `buf`; see [`RequestHead::parse`].
    pub fn parse(
        buf: &mut BytesMut,
        max_headers: usize,
        max_head_bytes: usize,
    ) -> Result<Option<ResponseHead>, HttpError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
        let max_headers = max_headers.min(MAX_HEADERS_CAP);
        let mut resp = httparse::Response::new(&mut storage[..max_headers]);
        let Some(n) = head_len(resp.parse(buf), buf.len(), max_headers, max_head_bytes)? else {
            return Ok(None);
        };
        let status = resp.code.unwrap_or(0);
        let minor_version = resp.version.unwrap_or(1);
        let spans = collect_spans(buf, resp.headers);
        let raw = buf.split_to(n).freeze();
        Ok(Some(ResponseHead { raw, status, minor_version, spans }))
    }

    /// The header lines.
    pub fn headers(&self) -> Headers<'_> {
        Headers { raw: &self.raw, spans: &self.spans }
    }

    /// Whether the connection may be reused after this response.
    pub fn keep_alive(&self) -> bool {
        let h = self.headers();
        if self.minor_version == 0 {
            h.has_token("connection", "keep-alive")
        } else {
            !h.has_token("connection", "close")
        }
    }

    /// The raw head bytes, status line through the blank line.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}
