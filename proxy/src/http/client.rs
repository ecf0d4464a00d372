//! The HTTP/1.1 client: one keep-alive connection to an upstream.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use super::body::{fill, BodyReader, READ_RESERVE};
use super::{framing_from_headers, BodyFraming, HttpError, Limits, ResponseHead};

/// One client connection. Send a request, read the response head, then its body, then reuse
/// the connection if [`ClientConn::reusable`] says so.
#[derive(Debug)]
pub struct ClientConn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    limits: Limits,
    body: Option<BodyReader>,
    reusable: bool,
}

impl ClientConn {
    /// Connects to `addr`, failing after `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<ClientConn> {
        let stream = match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
            Ok(s) => s?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out after {timeout:?}"),
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(ClientConn {
            stream,
            buf: BytesMut::with_capacity(READ_RESERVE),
            out: Vec::with_capacity(1024),
            limits: Limits::default(),
            body: None,
            reusable: true,
        })
    }

    /// Replaces the limits applied to responses.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Whether the previous exchange completed and the server allows reuse.
    pub fn reusable(&self) -> bool {
        self.reusable && self.body.as_ref().is_none_or(BodyReader::is_done)
    }

    /// Writes a request with a Content-Length body (none for an empty GET/HEAD/DELETE).
    /// `headers` must not contain Content-Length or Transfer-Encoding.
    pub async fn send(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<(), HttpError> {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body);
        self.write_out().await
    }

    /// Writes raw bytes (a head built by the caller, or body bytes).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), HttpError> {
        self.out.clear();
        self.out.extend_from_slice(bytes);
        self.write_out().await
    }

    async fn write_out(&mut self) -> Result<(), HttpError> {
        let out = std::mem::take(&mut self.out);
        let (res, out) = self.stream.write_all(out).await;
        self.out = out;
        if let Err(e) = res {
            self.reusable = false;
            return Err(HttpError::Io(e));
        }
        Ok(())
    }

    /// Reads the response head (skipping 1xx interim responses) and prepares the body reader.
    /// `head_request` says the request was HEAD, whose response has no body.
    pub async fn read_head(&mut self, head_request: bool) -> Result<ResponseHead, HttpError> {
        loop {
            let head = loop {
                match ResponseHead::parse(&mut self.buf, self.limits.max_headers, self.limits.max_head_bytes) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(e) => {
                        self.reusable = false;
                        return Err(e);
                    }
                }
                match fill(&mut self.stream, &mut self.buf).await {
                    Ok(0) => {
                        self.reusable = false;
                        return Err(HttpError::UnexpectedEof("response head"));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.reusable = false;
                        return Err(HttpError::Io(e));
                    }
                }
            };
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            let framing = if head_request || head.status == 204 || head.status == 304 {
                BodyFraming::None
            } else {
                match framing_from_headers(&head.headers()) {
                    Ok(BodyFraming::None) => BodyFraming::Close,
                    Ok(f) => f,
                    Err(e) => {
                        self.reusable = false;
                        return Err(e);
                    }
                }
            };
            if framing == BodyFraming::Close || !head.keep_alive() {
                self.reusable = false;
            }
            self.body = Some(BodyReader::new(framing, self.limits.max_body_bytes).inspect_err(|_| {
                self.reusable = false;
            })?);
            return Ok(head);
        }
    }

    /// Reads the rest of this response's body in larger pieces (for long streams).
    pub fn stream_reads(&mut self, reserve: usize) {
        if let Some(b) = self.body.as_mut() {
            b.set_read_reserve(reserve);
        }
    }

    /// The next piece of the response body as it arrives, or `None` at its end.
    pub async fn read_chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        let Some(body) = self.body.as_mut() else {
            return Ok(None);
        };
        let res = body.next(&mut self.stream, &mut self.buf).await;
        if res.is_err() {
            self.reusable = false;
        }
        res
    }

    /// The rest of the response body.
    pub async fn read_body(&mut self) -> Result<Bytes, HttpError> {
        let Some(body) = self.body.as_mut() else {
            return Ok(Bytes::new());
        };
        let res = body.read_all(&mut self.stream, &mut self.buf).await;
        if res.is_err() {
            self.reusable = false;
        }
        res
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<(ResponseHead, Bytes), HttpError> {
        self.send(method, target, headers, body).await?;
        let head = self.read_head(method == "HEAD").await?;
        let body = self.read_body().await?;
        Ok((head, body))
    }
}
